"""The trainer: `python apps/train.py config=FILE.yaml key=value ...` (or under torchrun).

One code path from a 2-layer model on a laptop CPU to the 20-block d=2048 reference model on
8 H200s: FSDP2 per block and at the root, bf16 params / fp32 reduce on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lingua_wd import checkpoint as ckpt
from lingua_wd.args import ConfigError, check, dump_config, parse_args, to_dict
from lingua_wd.checkpoint import CheckpointArgs, check_checkpoint_args
from lingua_wd.data import DataArgs, TrainLoader, build_tokenizer, check_data_args, prepare_data, val_batches
from lingua_wd.distributed import (
    DistEnv,
    DistributedArgs,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    check_distributed_args,
    init_distributed,
    parallelize,
    rng_state,
    seed_everything,
    set_rng_state,
    shutdown,
    world_size_from_env,
)
from lingua_wd.metrics import LoggingArgs, MetricLogger, Throughput, check_logging_args, console_line, peak_flops, setup_logging
from lingua_wd.model import ModelArgs, Transformer, check_model_args, count_params, flops_per_token
from lingua_wd.optim import OptimArgs, build_optimizer, check_optim_args, clip_grad_norm_
from lingua_wd.probes import ProbeArgs, build_probes
from lingua_wd.scaling import ScalingArgs, check_scaling_args, init_std_fn
from lingua_wd.schedule import ScheduleArgs, check_schedule_args

log = logging.getLogger("lingua_wd")
EXIT_REQUEUE = 75  # stopped by SIGTERM / SIGUSR1 after saving a checkpoint: requeue and resume
LAST_N = 100  # the paper reports the mean training loss of the last 100 steps


@dataclass
class TrainArgs:
    dump_dir: str = "dumps/debug"  # run directory: config.yaml, metrics.jsonl, checkpoints/
    name: str = ""  # run name for logs and wandb ("" = the dump_dir's name)
    seed: int = 0  # seeds init and everything random
    steps: int = 100  # optimizer steps in the run
    log_freq: int = 10  # steps between console / metrics.jsonl lines
    eval_freq: int = 0  # steps between validation losses (0 = only at the end)
    eval_batches: int = 8  # micro-batches per rank in each validation
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    scaling: ScalingArgs = field(default_factory=ScalingArgs)
    probes: ProbeArgs = field(default_factory=ProbeArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)


def resolve_and_check(args: TrainArgs, world: int) -> None:
    """Fill derived values (vocab size, RoPE length) and reject invalid configs before any work."""
    check(args.steps > 0, "steps", f"must be positive, got {args.steps}")
    check(args.log_freq > 0, "log_freq", f"must be positive, got {args.log_freq}")
    check(args.eval_freq >= 0, "eval_freq", f"must be >= 0, got {args.eval_freq}")
    check(args.eval_batches >= 0, "eval_batches", f"must be >= 0, got {args.eval_batches}")
    check(bool(args.dump_dir), "dump_dir", "must be set")
    check_data_args(args.data, world)
    vocab = build_tokenizer(args.data.tokenizer).vocab_size
    if args.model.vocab_size == 0:
        args.model.vocab_size = vocab
    check(args.model.vocab_size >= vocab, "model.vocab_size", f"{args.model.vocab_size} is smaller than the tokenizer's {vocab}")
    if args.model.max_seq_len == 0:
        args.model.max_seq_len = args.data.seq_len
    check(args.model.max_seq_len >= args.data.seq_len, "model.max_seq_len", f"must be >= data.seq_len={args.data.seq_len}")
    check_model_args(args.model)
    check_optim_args(args.optim)
    check_schedule_args(args.schedule, args.steps)
    check_scaling_args(args.scaling, args.model)
    check_distributed_args(args.distributed)
    check_checkpoint_args(args.checkpoint)
    check_logging_args(args.logging)
    args.name = args.name or Path(args.dump_dir).name


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_model(args: TrainArgs, env: DistEnv) -> Transformer:
    """Meta device -> fully_shard -> to_empty -> init_weights: no rank ever holds the full fp32 model."""
    with torch.device("meta"):
        model = Transformer(args.model)
    parallelize(model, args.distributed, env.device)
    model.to_empty(device=env.device)
    model.init_weights(init_std_fn(args.scaling, args.model), seed=args.seed)
    return model


def train_step(model, batch, optimizer, scheduler, n_micro: int, clip: float, probes=None, step: int = 0):
    """One optimizer step over this rank's share of the global batch, in n_micro micro-batches.

    Each micro-batch loss is divided by n_micro and FSDP averages over ranks, so the gradient is
    that of the mean loss over the global batch. Returns (loss, grad_norm) as device tensors.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B_local, T)
    loss_sum = torch.zeros((), device=batch.device)
    for x, y in zip(inputs.chunk(n_micro), targets.chunk(n_micro)):
        loss = cross_entropy(model(x), y) / n_micro
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = clip_grad_norm_(model, clip)
    probing = probes is not None and probes.due(step)
    if probing:
        probes.before_step(step, inputs[: inputs.shape[0] // n_micro])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    probe_metrics = probes.after_step(step, optimizer) if probing else {}
    return loss_sum, grad_norm, probe_metrics


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device: torch.device) -> Optional[float]:
    if not batches:
        return None
    total = torch.zeros((), device=device)
    for b in batches:
        b = b.to(device)
        total += cross_entropy(model(b[:, :-1]), b[:, 1:])
    return all_reduce_mean(total / len(batches)).item()


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM preemption, time limit) ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received signal %d: will save a checkpoint and exit after this step", signum)
        self.raised = True

    def agreed(self, device: torch.device) -> bool:
        """Collective: every rank stops if any rank was signalled."""
        return bool(all_reduce_max(torch.tensor(float(self.raised), device=device)).item())


def train(args: TrainArgs) -> int:
    env = init_distributed(args.distributed)
    setup_logging(env.rank)
    seed_everything(args.seed, args.distributed.deterministic)
    dump_dir = Path(args.dump_dir)
    if env.is_main:
        prepare_data(args.data)
        dump_config(args, dump_dir / "config.yaml")
    torch.distributed.barrier()

    tokenizer = build_tokenizer(args.data.tokenizer)
    model = build_model(args, env)
    n_micro = args.data.batch_size // (env.world * args.data.micro_batch_size)
    tokens_per_step = args.data.batch_size * args.data.seq_len
    optimizer, scheduler = build_optimizer(
        model, args.optim, args.scaling, args.schedule, args.steps, tokens_per_step, str(dump_dir) if env.is_main else None
    )
    loader = TrainLoader(args.data, tokenizer, env.rank, env.world)
    val = val_batches(args.data, tokenizer, env.rank, env.world, args.eval_batches)
    probes = build_probes(args.probes, model, args.scaling)
    logger = MetricLogger(dump_dir, args.logging, to_dict(args), args.name, enabled=env.is_main)
    ckpt_root = Path(args.checkpoint.dir or dump_dir / "checkpoints")

    step, recent, val_loss = 0, torch.zeros(LAST_N, device=env.device), None
    resume_from = ckpt.latest(ckpt_root)
    if resume_from is not None:
        states = ckpt.load(resume_from, model, optimizer)
        mine = states[env.rank] if len(states) == env.world else states[0]
        step, recent = mine["step"], mine["recent_losses"].to(env.device)
        scheduler.load_state_dict(mine["scheduler"])
        loader.load_states([s["data"] for s in states])
        set_rng_state(mine["rng"])
        logger.truncate_after(step)
        log.info("resumed from %s at step %d", resume_from, step)
        if step >= args.steps:
            log.info("run already complete (%d steps): nothing to do", step)
            shutdown()
            return 0

    n_params = count_params(model)
    log.info("model: %s parameters (%d blocks, dim %d), %d ranks on %s, %d micro-batches per step",
             f"{n_params:,}", args.model.n_layers, args.model.dim, env.world, env.device, n_micro)
    meter = Throughput(flops_per_token(model, args.data.seq_len), peak_flops(env.device), env.world)
    stop = StopFlag()
    loss_acc, n_acc = torch.zeros((), device=env.device), 0

    def save() -> None:
        state = {"step": step, "scheduler": scheduler.state_dict(), "data": loader.state_dict(),
                 "rng": rng_state(), "recent_losses": recent.cpu(), "world_size": env.world}
        path = ckpt.save(ckpt_root, step, model, optimizer, state, args.checkpoint.keep)
        log.info("saved checkpoint %s", path)

    while step < args.steps:
        batch = loader.next_batch().to(env.device, non_blocking=True)
        lr = optimizer.param_groups[0]["lr"]
        loss, grad_norm, probe_metrics = train_step(
            model, batch, optimizer, scheduler, n_micro, args.optim.clip, probes, step
        )
        recent[step % LAST_N] = loss
        step += 1
        loss_acc, n_acc = loss_acc + loss, n_acc + 1
        meter.add(tokens_per_step // env.world)

        last = step == args.steps
        if step % args.log_freq == 0 or last or probe_metrics:
            record = {"step": step, "loss": all_reduce_mean(loss_acc / n_acc).item(), "lr": lr,
                      "grad_norm": grad_norm.item(), **meter.read(),
                      "data/skipped": int(all_reduce_sum(torch.tensor(float(loader.skipped), device=env.device)).item())}
            if env.device.type == "cuda":
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 1e9
            record.update(probe_metrics)
            loss_acc, n_acc = torch.zeros((), device=env.device), 0
            logger.log(record)
            log.info(console_line(record))
            if stop.agreed(env.device):
                save()
                logger.close()
                shutdown()
                return EXIT_REQUEUE
        if (args.eval_freq and step % args.eval_freq == 0) or last:
            val_loss = evaluate(model, val, env.device)
            if val_loss is not None:
                logger.log({"step": step, "val/loss": val_loss})
                log.info("step %6d | val loss %.4f", step, val_loss)
        if (args.checkpoint.every and step % args.checkpoint.every == 0) or last:
            save()

    if env.is_main:
        final = {"step": step, "train_loss_last": float(recent[: min(step, LAST_N)].mean()), "val_loss": val_loss}
        (dump_dir / "DONE").write_text(json.dumps(final))
    logger.close()
    loader.close()
    shutdown()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(TrainArgs, argv)
        resolve_and_check(args, world_size_from_env())
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return train(args)
