"""Process group, device, FSDP2 sharding, mixed precision, per-block compile, activation checkpointing.

The same code path runs as `python apps/train.py` (a one-rank process group), under torchrun, and
as the tasks of an `srun` step (one task per rank: the rank layout comes from SLURM's variables).
"""

from __future__ import annotations

import os
import random
import re
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lingua_wd.args import check

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class DistributedArgs:
    compile: bool = False  # torch.compile each transformer block (in place, names unchanged)
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (False: keep them for backward)
    param_dtype: str = "bf16"  # FSDP2 compute dtype on CUDA (bf16 | fp32); CPU always runs fp32
    reduce_dtype: str = "fp32"  # FSDP2 gradient reduce-scatter dtype on CUDA
    device: str = "auto"  # auto | cuda | cpu
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)


def check_distributed_args(args: DistributedArgs) -> None:
    check(
        args.param_dtype in DTYPES,
        "distributed.param_dtype",
        f"must be one of {sorted(DTYPES)}, got {args.param_dtype!r}",
    )
    check(
        args.reduce_dtype in DTYPES,
        "distributed.reduce_dtype",
        f"must be one of {sorted(DTYPES)}, got {args.reduce_dtype!r}",
    )
    check(
        args.device in ("auto", "cuda", "cpu"), "distributed.device", f"must be auto, cuda or cpu, got {args.device!r}"
    )
    if args.device == "cuda":
        check(torch.cuda.is_available(), "distributed.device", "cuda requested but no CUDA device is available")


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Under a launcher (torchrun, srun), ask Linux to SIGKILL this rank when its parent dies, so a
    killed launcher leaves no orphan rank writing into the run directory (prctl PR_SET_PDEATHSIG).
    A plain `python` launch is left alone (it may be meant to outlive its shell, e.g. under nohup)."""
    if not ("TORCHELASTIC_RUN_ID" in os.environ or "SLURM_STEP_ID" in os.environ) or not sys.platform.startswith(
        "linux"
    ):
        return
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        return
    if os.getppid() != parent:  # the launcher died before the call: no signal will come
        os._exit(137)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[07-09,12],cpu1` -> `gpu07`."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        return nodelist
    first = re.split(r"[,-]", m.group(2))[0] if m.group(2) else ""
    return m.group(1) + first


def env_from_slurm(environ: os._Environ | dict = os.environ) -> None:
    """Under `srun` without torchrun (one task per rank) set RANK, WORLD_SIZE, LOCAL_RANK and the
    rendezvous from SLURM's task variables. Only inside a job step (SLURM_STEP_ID): a batch script
    also has SLURM_PROCID=0 but is no rank. A step of one task is a plain launch; a launcher's own
    RANK (torchrun inside srun) wins. MASTER_ADDR defaults to the step's first node, MASTER_PORT to
    one derived from the job id (the same on every node, and again after a requeue)."""
    e = environ
    if "RANK" in e or "SLURM_STEP_ID" not in e or "SLURM_PROCID" not in e:
        return
    world = int(e.get("SLURM_STEP_NUM_TASKS") or e.get("SLURM_NTASKS") or 1)
    if world == 1:
        return
    e.update(RANK=e["SLURM_PROCID"], WORLD_SIZE=str(world), LOCAL_RANK=e.get("SLURM_LOCALID", "0"))
    e.setdefault("MASTER_ADDR", first_host(e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST", "")))
    e.setdefault("MASTER_PORT", str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000))


def world_size_from_env() -> int:
    env_from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(args: DistributedArgs) -> DistEnv:
    """Join (or, for a plain `python` launch, create) the process group: nccl on CUDA, gloo on CPU."""
    env_from_slurm()
    die_with_parent()
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # a cluster may bind one GPU per task (it then sees only cuda:0) or show each task all of the node's
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain python: a process group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()  # torch 2.13 gloo processes can abort at exit without it
        dist.destroy_process_group()


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def parallelize(model: nn.Module, args: DistributedArgs, device: torch.device) -> nn.Module:
    """Compile each block in place, then FSDP2 `fully_shard` each block and the root.

    On CUDA the params are gathered in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy);
    on CPU everything stays fp32 (gloo has no bf16 reduce worth using).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if args.compile:
        for block in model.layers:
            block.compile()
    model.activation_checkpointing = args.activation_checkpointing
    model.compile_loss = args.compile and device.type == "cuda"
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[args.param_dtype], reduce_dtype=DTYPES[args.reduce_dtype])
    else:
        mp = MixedPrecisionPolicy()
    for i, block in enumerate(model.layers):
        # the last block's params are needed right away by backward: never reshard them after forward
        reshard = args.reshard_after_forward and i < len(model.layers) - 1
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mp, reshard_after_forward=args.reshard_after_forward)
    return model


def reshard_all(model: nn.Module) -> None:
    """After a no-grad forward FSDP2 leaves modules built with reshard_after_forward=False unsharded
    (no backward comes to reshard them): reshard so parameters are the sharded DTensors again."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG if t.device.type == "cuda" else dist.ReduceOp.SUM)
        if t.device.type != "cuda":  # gloo has no AVG
            t /= dist.get_world_size()
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
