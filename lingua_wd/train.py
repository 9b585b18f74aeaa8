"""The trainer: `python apps/train.py config=FILE.yaml key=value ...` (or under torchrun).

One code path from a 2-layer model on a laptop CPU to the 20-block d=2048 reference model on
8 H200s: FSDP2 per block and at the root, bf16 params / fp32 reduce on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from lingua_wd import checkpoint as ckpt
from lingua_wd import rundir
from lingua_wd.args import ConfigError, check, check_values, dump_config, run_cli, to_dict, to_yaml, upgrade_keys
from lingua_wd.checkpoint import CheckpointArgs, check_checkpoint_args
from lingua_wd.data import (
    DataArgs,
    TrainLoader,
    build_tokenizer,
    check_data_args,
    check_sources,
    prepare_data,
    val_batches,
)
from lingua_wd.distributed import (
    DistEnv,
    DistributedArgs,
    all_reduce_max,
    all_reduce_mean,
    check_distributed_args,
    init_distributed,
    parallelize,
    reshard_all,
    rng_state,
    seed_everything,
    set_rng_state,
    shutdown,
    world_size_from_env,
)
from lingua_wd.guard import GuardArgs, SpikeDetector, check_guard_args, inject_nan, optimizer_step, resume_conflicts
from lingua_wd.metrics import (
    LoggingArgs,
    MetricLogger,
    Throughput,
    check_logging_args,
    console_line,
    eta_seconds,
    peak_flops,
    run_summary,
    setup_logging,
)
from lingua_wd.model import ModelArgs, Transformer, count_params, flops_per_token
from lingua_wd.optim import OptimArgs, build_optimizer, check_plan_args, clip_grad_norm_
from lingua_wd.probes import ProbeArgs, build_probes, check_probe_args, match_layers
from lingua_wd.rundir import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DIVERGED, EXIT_NO_CHECKPOINT, EXIT_REQUEUE, RunDir
from lingua_wd.scaling import ScalingArgs, init_std_fn, param_classes
from lingua_wd.schedule import ScheduleArgs

log = logging.getLogger("lingua_wd")
LAST_N = 100  # the paper reports the mean training loss of the last 100 steps
BYTES_PER_PARAM = 16  # fp32 parameter (the master copy under bf16) + fp32 gradient + AdamW's two fp32 moments
MAX_ELEMENTS = 2**50  # a model this big is refused everywhere (the device-dependent check is check_memory)
INT_REPEAT_S = 1.0  # a second SIGINT sooner than this is the launcher forwarding the same Ctrl-C, not a second one


@dataclass
class TrainArgs:
    dump_dir: str = "dumps/debug"  # run directory: config.yaml, metrics.jsonl, checkpoints/
    name: str = ""  # run name for logs and wandb ("" = the dump_dir's name)
    seed: int = 0  # seeds init and everything random
    steps: int = 100  # optimizer steps in the run
    log_freq: int = 10  # steps between console / metrics.jsonl lines
    eval_freq: int = 0  # steps between validation losses (0 = only at the end)
    eval_batches: int = 8  # validation set: the first eval_batches x data.batch_size val sequences, on any rank count
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    scaling: ScalingArgs = field(default_factory=ScalingArgs)
    probes: ProbeArgs = field(default_factory=ProbeArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    guard: GuardArgs = field(default_factory=GuardArgs)


def param_estimate(m: ModelArgs) -> int:
    """Parameters of the model, by arithmetic (no tensor is made): a huge width or vocabulary is refused
    before anything tries to allocate it."""
    q, kv = m.dim, (m.n_kv_heads or m.dim // m.head_dim) * m.head_dim
    block = m.dim * (2 * q + 2 * kv) + 3 * m.dim * m.ffn_mult * m.dim + 2 * m.dim
    return m.n_layers * block + 2 * m.vocab_size * m.dim + m.dim


def device_memory(args: DistributedArgs) -> tuple[int, str, bool]:
    """Bytes one rank may use, what they are, and whether they are a GPU's (else the host's available RAM)."""
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if use_cuda:
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        return props.total_memory, f"the {props.name}'s memory", True
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(info["MemAvailable"].split()[0]) * 1024, "the available RAM", False
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the RAM", False


def check_memory(args: TrainArgs, world: int) -> None:
    """Refuse a model whose parameters, gradients and AdamW state (sharded over the ranks), plus one
    batch of tokens and a lower bound of its activations, cannot fit: one line with the estimate."""
    m, d = args.model, args.data
    params = param_estimate(m)
    per_rank = params * BYTES_PER_PARAM // world
    per_rank += m.max_seq_len * m.head_dim * 4  # the RoPE table
    per_rank += d.batch_size // world * (d.seq_len + 1) * 8  # the step's int64 tokens
    per_rank += d.micro_batch_size * d.seq_len * m.dim * 4 * 2 * m.n_layers  # >= the residual stream kept per block
    have, what, cuda = device_memory(args.distributed)
    here = per_rank if cuda else per_rank * int(os.environ.get("LOCAL_WORLD_SIZE", world))  # CPU ranks share RAM
    check(
        here <= have,
        "model",
        f"needs ~{here / 1e9:,.1f} GB for {params:,} parameters with their gradients and AdamW state "
        f"({BYTES_PER_PARAM} bytes each over {world} rank{'s' if world > 1 else ''}) and one batch, "
        f"more than {what} ({have / 1e9:,.1f} GB); use a smaller model or more ranks",
    )


def check_machine(args: TrainArgs, world: int) -> None:
    """What depends on this machine rather than on the config (so not in resolve_and_check, which
    other tools run on configs meant for elsewhere): the data paths exist, the model fits."""
    check_sources(args.data)
    check_memory(args, world)


def resolve_and_check(args: TrainArgs, world: int) -> None:
    """Fill derived values (vocab size, RoPE length) and reject invalid configs before any work."""
    check_values(args)  # finite floats, 64-bit ints, typed values under mappings and lists
    check(0 <= args.seed < 2**32, "seed", f"must be in [0, 2**32), got {args.seed}")
    check(args.steps > 0, "steps", f"must be positive, got {args.steps}")
    check(args.log_freq > 0, "log_freq", f"must be positive, got {args.log_freq}")
    check(args.eval_freq >= 0, "eval_freq", f"must be >= 0, got {args.eval_freq}")
    check(args.eval_batches >= 0, "eval_batches", f"must be >= 0, got {args.eval_batches}")
    check(bool(args.dump_dir), "dump_dir", "must be set")
    check_data_args(args.data, world)
    vocab = build_tokenizer(args.data.tokenizer).vocab_size
    if args.model.vocab_size == 0:
        args.model.vocab_size = vocab
    check(
        args.model.vocab_size >= vocab,
        "model.vocab_size",
        f"{args.model.vocab_size} is smaller than the tokenizer's {vocab}",
    )
    if args.model.max_seq_len == 0:
        args.model.max_seq_len = args.data.seq_len
    check(
        args.model.max_seq_len >= args.data.seq_len, "model.max_seq_len", f"must be >= data.seq_len={args.data.seq_len}"
    )
    tokens_per_step = args.data.seq_len * args.data.batch_size
    p = check_plan_args(
        args.model, args.optim, args.schedule, args.scaling, args.steps, tokens_per_step, args.data.batch_size
    )
    n = param_estimate(args.model) + args.model.max_seq_len * args.model.head_dim  # + the RoPE table
    check(n < MAX_ELEMENTS, "model", f"{n:,} parameters and RoPE table entries: beyond any machine")
    if args.model.residual_mult == 0 and p.residual_mult != 1.0:  # derived, like vocab_size (0 stays 0 at 1)
        args.model.residual_mult = p.residual_mult
    check_distributed_args(args.distributed)
    check_checkpoint_args(args.checkpoint)
    check_logging_args(args.logging)
    check_guard_args(args.guard)
    check_probe_args(args.probes)
    with torch.device("meta"):  # patterns are checked against the real parameter names, at no cost
        meta = Transformer(args.model)
    param_classes(meta, args.scaling)
    if args.probes.every and args.probes.layers:
        match_layers(meta, args.probes.layers)
    args.name = args.name or Path(args.dump_dir).name


def check_dump_dir(path: Path, rank: int, key: str = "dump_dir") -> None:
    """An unwritable or full dump (or checkpoint) dir is a clear error at start-up, not a crash at
    the first checkpoint."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-rank{rank}"  # one per rank: ranks share the directory
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {path} ({err.strerror or err})") from None


class OtherRankFailed(ConfigError):
    """Raised on the ranks that did not fail themselves (the failing rank prints why)."""


class Diverged(RuntimeError):
    """The run diverged (non-finite steps, weights, or a streak at the end): exit 3, nothing saved from it."""


def build_model(args: TrainArgs, env: DistEnv) -> Transformer:
    """Meta device -> fully_shard -> to_empty -> init_weights: no rank ever holds the full fp32 model."""
    with torch.device("meta"):
        model = Transformer(args.model)
    parallelize(model, args.distributed, env.device)
    model.to_empty(device=env.device)
    model.init_weights(init_std_fn(args.scaling, args.model.dim), seed=args.seed)
    return model


def train_step(model, batch, optimizer, scheduler, args: TrainArgs, n_micro: int, step: int, probes=None):
    """One optimizer step over this rank's share of the global batch, in n_micro micro-batches.

    Each micro-batch loss is divided by n_micro and FSDP averages over ranks, so the gradient is
    that of the mean loss over the global batch. A non-finite gradient norm skips the update.
    Returns device tensors (loss, grad_norm, skipped) and the probe metrics of a probe step.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B_local, T)
    loss_sum = torch.zeros((), device=batch.device)
    for x, y in zip(inputs.chunk(n_micro), targets.chunk(n_micro), strict=True):
        loss = inject_nan(model(x, y), args.guard, step) / n_micro
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = clip_grad_norm_(model, args.optim.clip)
    probing = probes is not None and probes.due(step)
    if probing:
        probes.before_step(step, inputs[: inputs.shape[0] // n_micro])
    skipped = optimizer_step(optimizer, grad_norm)
    optimizer.zero_grad(set_to_none=True)
    probe_metrics = probes.after_step(step, optimizer) if probing else {}  # reads this step's LR and WD
    scheduler.step()
    return loss_sum, grad_norm, skipped, probe_metrics


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device: torch.device) -> Optional[float]:
    """Mean loss over the validation set: every rank holds as many micro-batches (data.val_batches)."""
    if not batches:
        return None
    total = torch.zeros((), device=device)
    for b in batches:
        b = b.to(device)
        total += model(b[:, :-1], b[:, 1:])
    reshard_all(model)
    return all_reduce_mean(total / len(batches)).item()


def all_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """1.0 on the device when this rank's shards of the weights and the optimizer state are all finite."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    for st in optimizer.state.values():
        local += [v.to_local() if hasattr(v, "to_local") else v for v in st.values() if isinstance(v, torch.Tensor)]
    flags = [torch.isfinite(t).all() for t in local if t.is_floating_point() and t.numel()]
    return torch.stack(flags).all().float() if flags else torch.ones((), device=device)


class StopFlag:
    """SIGTERM, SIGUSR1 (SLURM preemption, time limit) and SIGINT (Ctrl-C) ask for a checkpoint and exit 75.

    The handler only sets a flag; every rank all-reduces it after every step over a CPU (gloo) group,
    which costs no device sync, so all ranks stop after the same step: the one in progress when the
    signal came (whether it reached one rank, every rank as under srun, or torchrun first). A second
    Ctrl-C, at least INT_REPEAT_S after the first, calls `abort` (exit at once, nothing saved); a
    SIGINT sooner than that is the launcher forwarding the same Ctrl-C (torchrun does).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, abort: Callable[[], None]):
        self.signum, self.first_int, self.abort = 0, None, abort
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if signum == signal.SIGINT:
            if self.first_int is not None and now - self.first_int >= INT_REPEAT_S:
                self.abort()
            self.first_int = self.first_int if self.first_int is not None else now
        if not self.signum:
            self.signum = signum
            again = "; Ctrl-C again to exit now without saving" if signum == signal.SIGINT else ""
            log.warning(
                "received %s: saving a checkpoint after this step, then exiting with code 75%s",
                signal.Signals(signum).name,
                again,
            )

    def agreed(self, group) -> bool:
        """Collective, every step: whether any rank was signalled."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return bool(self.signum)
        flag = torch.tensor([float(bool(self.signum))])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Builds everything from TrainArgs, resumes from the dump dir's last checkpoint, runs the loop."""

    def __init__(self, args: TrainArgs, env: DistEnv, run: RunDir, lock: Optional[rundir.RunLock], control=None):
        self.args, self.env, self.run_dir, self.lock, self.control = args, env, run, lock, control
        self.dump_dir = run.path
        self.tokenizer = build_tokenizer(args.data.tokenizer)
        self.model = build_model(args, env)
        self.n_micro = args.data.batch_size // (env.world * args.data.micro_batch_size)
        self.tokens_per_step = args.data.batch_size * args.data.seq_len
        self.optimizer, self.scheduler = build_optimizer(
            self.model,
            args.optim,
            args.scaling,
            args.schedule,
            args.steps,
            self.tokens_per_step,
            str(self.dump_dir) if env.is_main else None,
            args.data.batch_size,
        )
        # the logged "lr" is that of the hidden matrices (the width-scaled eta_base / m under muP)
        groups = self.optimizer.param_groups
        self.lr_group = next((i for i, g in enumerate(groups) if g.get("class") == "hidden"), 0)
        self.loader = TrainLoader(args.data, self.tokenizer, env.rank, env.world)
        self.val = val_batches(args.data, self.tokenizer, env.rank, env.world, args.eval_batches)
        self.probes = build_probes(args.probes, self.model, args.scaling)
        self.logger = MetricLogger(self.dump_dir, args.logging, to_dict(args), args.name, enabled=env.is_main)
        self.ckpt_root = Path(args.checkpoint.dir) if args.checkpoint.dir else run.checkpoints
        self.spikes = SpikeDetector(args.guard.spike_factor)
        self.step, self.nonfinite, self.val_loss = 0, 0, None
        # the log state: everything the next metrics line depends on lives in the checkpoint
        self.pending: list[torch.Tensor] = []  # per step since the last line: (local loss, skipped) on the device
        self.recent: list[float] = []  # the last LAST_N global mean losses, for DONE
        self.deferred = False  # a checkpoint was due during a divergence streak
        self.stop_cause = ""
        self.start_step = 0  # the step this session started (resumed) at
        self.loop_t0 = time.perf_counter()  # when this session's loop started (ETA, summary)
        self.forced: list[str] = []  # config changes accepted by guard.force_resume
        self.config_yaml = to_yaml(args)  # saved with every checkpoint; OmegaConf takes ~50 ms to write it

    def config_for_resume(self) -> dict:
        return {**to_dict(self.args), "world_size": self.env.world}

    def _accept(self, path: Path) -> None:
        saved = upgrade_keys(TrainArgs, ckpt.saved_config(path))  # keys renamed since: compared by their new names
        conflicts = resume_conflicts(saved, self.config_for_resume()) if saved else []
        if conflicts and not self.args.guard.force_resume:
            raise ConfigError(
                f"{conflicts[0].split()[0]}: changed since checkpoint {path.name}: {'; '.join(conflicts)}. "
                f"A new config is a new run: give it a new dump_dir (this one holds the old run); "
                f"only to continue this run with the change, set guard.force_resume=true"
            )
        self.forced = conflicts

    def resume(self) -> None:
        path, states = ckpt.load_latest(self.ckpt_root, self.model, self.optimizer, self._accept)
        if path is None:
            self.logger.truncate_to(0)  # no checkpoint: the run starts afresh, and so does metrics.jsonl
            return
        mine = states[self.env.rank] if len(states) == self.env.world else states[0]
        self.step = self.start_step = mine["step"]
        self.scheduler.load_state_dict(mine["scheduler"])
        self.spikes.load_state_dict(mine["spikes"])
        if self.probes is not None and "probes" in mine:
            self.probes.load_state_dict(mine["probes"])
        self.loader.load_states([s["data"] for s in states])
        set_rng_state(mine["rng"])
        logged = mine.get("log")
        if logged is not None:
            self.nonfinite, self.recent, self.val_loss = logged["nonfinite"], list(logged["recent"]), logged["val_loss"]
            self.pending = [row.to(self.env.device) for row in logged["pending"]]
            self.logger.truncate_to(states[0]["log"]["metrics_bytes"])
        else:  # a checkpoint of an older version: its log state was not saved
            self.nonfinite = mine["nonfinite"]
            self.logger.truncate_after(self.step)
        forced = f" (forced: {self.forced})" if self.forced else ""
        log.info("resumed from %s at step %d%s", path, self.step, forced)

    def save(self) -> None:
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": rng_state(),
            "spikes": self.spikes.state_dict(),
            "probes": self.probes.state_dict() if self.probes is not None else {},
            "world_size": self.env.world,
            "log": {
                "pending": torch.stack(self.pending).cpu() if self.pending else torch.zeros(0, 2),
                "nonfinite": self.nonfinite,
                "recent": list(self.recent),
                "val_loss": self.val_loss,
                "metrics_bytes": self.logger.size(),  # rank 0's: where a resumed run continues the file
            },
        }
        crash = self.args.guard.crash_in_checkpoint == self.step
        need = ckpt.checkpoint_bytes(self.ckpt_root, self.model, self.optimizer)
        path = ckpt.save(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            state,
            self.args.checkpoint.keep,
            config=self.config_yaml,
            crash_before_manifest=crash,
            need=need,
        )
        log.info("saved checkpoint %s", path)

    def health(self) -> Optional[int]:
        """Collective, before a save: the step the current divergence streak started at (None if
        there is none), judged on the steps logged so far and those since (without logging them).
        Raises Diverged for non-finite weights, LockHeld if another trainer took the lock."""
        lost = float(self.lock is not None and not self.lock.held())
        head = torch.stack(
            [1 - all_finite(self.model, self.optimizer, self.env.device), torch.tensor(lost, device=self.env.device)]
        )
        rows = torch.stack(self.pending) if self.pending else torch.zeros(0, 2, device=self.env.device)
        flat = all_reduce_mean(torch.cat([head, rows.flatten()])).tolist()
        if flat[1] > 0:
            raise rundir.LockHeld(
                "dump_dir: another trainer took over this run directory's lock; stopping without saving"
            )
        if flat[0] > 0:
            raise Diverged(
                f"the weights or optimizer state are non-finite after step {self.step} (an update overflowed)"
            )
        peek = copy.deepcopy(self.spikes)
        first = self.step - len(self.pending) + 1
        for i in range(len(self.pending)):
            loss, bad = flat[2 + 2 * i : 4 + 2 * i]
            peek.update(first + i, loss, bad > 0 or not math.isfinite(loss))
        return peek.streak_start

    def checkpoint(self, last: bool, stopping: bool) -> bool:
        """Save, unless the loss is diverging: then defer (the next steps retry), skip (a stop: the
        restart resumes from the last good checkpoint) or stop (the run's end: exit 3)."""
        streak = self.health()
        if streak is None:
            self.save()
            self.deferred = False
            return True
        if last:
            raise Diverged(
                f"the run ended in a divergence streak (loss spikes or non-finite steps since step {streak})"
            )
        if stopping:
            log.warning(
                "not saving the diverging weights (since step %d): a restart resumes from the last good checkpoint",
                streak,
            )
        elif not self.deferred:
            log.warning(
                "checkpoint of step %d deferred: the loss is diverging since step %d (spike or non-finite); "
                "it is written at the first healthy step",
                self.step,
                streak,
            )
            self.deferred = True
        return False

    def log(self, grad_norm, lr: float, meter: Throughput) -> None:
        """One sync per log step: losses, skip flags and counters come to the host together."""
        env = self.env
        rows = torch.stack(self.pending)  # (n, 2): local loss, skipped
        skipped_data = torch.tensor([float(self.loader.skipped)], device=env.device)
        flat = all_reduce_mean(torch.cat([rows.flatten(), skipped_data])).tolist()
        data_skipped = round(flat[-1] * env.world)
        first = self.step - len(self.pending) + 1
        losses = flat[0:-1:2]
        for i, (loss, bad) in enumerate(zip(losses, flat[1:-1:2], strict=True)):
            skipped = bad > 0 or not math.isfinite(loss)
            self.nonfinite += skipped
            self.recent = [*self.recent[-(LAST_N - 1) :], loss]
            event = self.spikes.update(first + i, loss, skipped)
            if event:
                self.logger.log(event)
                log.warning(
                    "loss spike at step %d: %.4f (running mean %.4f)", event["step"], loss, event["running_mean"]
                )
        self.pending = []
        record = {
            "step": self.step,
            "loss": sum(losses) / len(losses),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            **meter.read(),
            "data/skipped": data_skipped,
            "nonfinite_steps": self.nonfinite,
        }
        if env.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 1e9
        self.logger.log(record)
        elapsed = time.perf_counter() - self.loop_t0
        eta = eta_seconds(self.step - self.start_step, self.args.steps - self.start_step, elapsed)
        log.info(console_line(record, self.args.steps, elapsed, eta))
        self.loader.flush_warnings()

    def evaluate(self) -> None:
        width = len(str(self.args.steps))
        if self.val:  # a large validation set on a slow device takes minutes: say what is running
            n = sum(b.shape[0] for b in self.val) * self.env.world
            log.info(f"step {self.step:>{width}d}/{self.args.steps} | validating on {n:,} sequences")
        self.val_loss = evaluate(self.model, self.val, self.env.device)
        if self.val_loss is not None:
            self.logger.log({"step": self.step, "val/loss": self.val_loss})
            log.info(f"step {self.step:>{width}d}/{self.args.steps} | val loss {self.val_loss:.4f}")

    def run(self, stop: StopFlag) -> int:
        """The loop; after each step: log, eval, then (stop or checkpoint due) save, in that order, so
        a stop on an eval step still writes its eval line. Returns 0 or EXIT_REQUEUE."""
        args, env = self.args, self.env
        log.info(
            "model: %s parameters (%d blocks, dim %d), %d ranks on %s, %d micro-batches per step",
            f"{count_params(self.model):,}",
            args.model.n_layers,
            args.model.dim,
            env.world,
            env.device,
            self.n_micro,
        )
        if env.is_main and self.run_dir.done.exists():  # continuing a finished run (more steps, forced)
            self.run_dir.done.unlink()
        meter = Throughput(flops_per_token(self.model, args.data.seq_len), peak_flops(env.device), env.world)
        started = self.start_step = self.step
        self.loop_t0 = time.perf_counter()
        while self.step < args.steps:
            batch = self.loader.next_batch().to(env.device, non_blocking=True)
            lr = self.optimizer.param_groups[self.lr_group]["lr"]
            loss, grad_norm, bad, probe_metrics = train_step(
                self.model, batch, self.optimizer, self.scheduler, args, self.n_micro, self.step, self.probes
            )
            self.step += 1
            if args.guard.step_sleep_s:  # testing: a slow run (a signal or time limit has time to arrive)
                time.sleep(args.guard.step_sleep_s)
            self.pending.append(torch.stack([loss.float(), bad.float()]))
            meter.add(self.tokens_per_step // env.world)
            last = self.step == args.steps
            if probe_metrics:  # their own record at their own steps: the loss lines keep their cadence
                self.logger.log({"step": self.step, **probe_metrics})
            if self.step % args.log_freq == 0 or last:
                self.log(grad_norm, lr, meter)
                if args.guard.max_nonfinite and self.nonfinite >= args.guard.max_nonfinite:
                    raise Diverged(
                        f"{self.nonfinite} steps had a non-finite loss or gradient norm "
                        f"(guard.max_nonfinite={args.guard.max_nonfinite})"
                    )
            if (args.eval_freq and self.step % args.eval_freq == 0) or last:
                self.evaluate()
            stopping = stop.agreed(self.control)
            due = (args.checkpoint.every and self.step % args.checkpoint.every == 0) or last or self.deferred
            saved = (due or (stopping and self.step > started)) and self.checkpoint(last, stopping)
            if stopping:
                self.stop_cause = f"stopped by a signal at step {self.step}, " + (
                    "checkpoint saved" if saved else "nothing saved (diverging): resume from the last good checkpoint"
                )
                log.warning("%s: exit %d (requeue)", self.stop_cause, EXIT_REQUEUE)
                return EXIT_REQUEUE
        if self.finish() and env.is_main:
            log.info(self.summary(meter))
        return 0

    def final_train_loss(self) -> tuple[float, int]:
        """(mean, n): the global mean training loss over the last n = min(LAST_N, steps) steps, non-finite
        steps left out (the paper's final loss, App. G.3)."""
        finite = [v for v in self.recent if math.isfinite(v)]
        return (sum(finite) / len(finite) if finite else math.nan), len(finite)

    def finish(self) -> bool:
        """DONE (rank 0): the final step, tokens, the global mean loss of the last LAST_N steps and its n,
        the last val loss. Returns whether it was written (False on other ranks)."""
        if not self.env.is_main:
            return False
        if self.lock is not None and not self.lock.held():
            log.error("dump_dir: another trainer took over this run directory's lock; DONE not written")
            self.lock = None
            return False
        loss, n = self.final_train_loss()
        record = {"step": self.step, "train_loss_last": loss, "val_loss": self.val_loss}
        self.run_dir.write_done({**record, "last_n": n, "tokens": self.step * self.tokens_per_step})
        return True

    def summary(self, meter: Throughput) -> str:
        """The end-of-run paragraph: final losses, tokens, this session's wall time, tokens/s and MFU."""
        wall = time.perf_counter() - self.loop_t0
        steps = self.step - self.start_step
        tps = steps * self.tokens_per_step / wall if wall > 0 else math.nan
        mfu = tps * meter.fpt / (meter.peak * meter.world) if meter.peak else None
        loss, n = self.final_train_loss()
        return run_summary(
            {
                "step": self.step,
                "tokens": self.step * self.tokens_per_step,
                "train_loss": loss,
                "last_n": n,
                "val_loss": self.val_loss,
                "session_steps": steps,
                "wall_s": wall,
                "resumed_from": self.start_step,
                "tokens_per_s": tps,
                "mfu": mfu,
            }
        )

    def last_good(self) -> str:
        found = ckpt.list_checkpoints(self.ckpt_root, warn=False) if self.ckpt_root.is_dir() else []
        if not found:
            return "no checkpoint was written before it"
        return f"the last good checkpoint is step {int(found[-1].name)} ({found[-1]})"

    def close(self) -> None:
        self.logger.close()
        self.loader.close()


class ExitRecord:
    """Rank 0's EXIT.json, written on every exit the trainer controls, and the second-Ctrl-C exit."""

    def __init__(self, run: RunDir, is_main: bool):
        self.run, self.is_main = run, is_main
        self.started = rundir.process_start_time()  # this session's start, imports included: status's ETA
        self.lock: Optional[rundir.RunLock] = None
        self.trainer: Optional[Trainer] = None
        self.refused = False  # another live trainer holds the directory: write nothing into it

    def step(self) -> int:
        return self.trainer.step if self.trainer is not None else 0

    def write(self, code: int, cause: str = "") -> None:
        if not self.is_main or self.refused:
            return
        if self.lock is None and not may_record(self.run):
            return
        start_step = self.trainer.start_step if self.trainer is not None else None
        try:
            self.run.write_exit(code, self.step(), cause, started=self.started, start_step=start_step)
        except OSError as err:
            log.warning("could not write %s (%s)", self.run.exit_file, err.strerror or err)

    def abort(self) -> None:
        """A second Ctrl-C: one line, EXIT.json, the lock released, exit at once (nothing saved)."""
        print(f"interrupted again at step {self.step()}: exiting now without saving", file=sys.stderr, flush=True)
        self.write(rundir.EXIT_INTERRUPTED, "interrupted twice, nothing saved")
        if self.lock is not None:
            self.lock.release()
        os._exit(rundir.EXIT_INTERRUPTED)


def may_record(run: RunDir) -> bool:
    """EXIT.json of a run that never took the lock: only into an existing dir that no live trainer holds."""
    holder = run.lock_holder()
    return run.path.is_dir() and (holder is None or not rundir.holder_alive(holder))


def start(run: RunDir, args: TrainArgs, env: DistEnv) -> Optional[rundir.RunLock]:
    """Collective: every rank checks that it can write the dump (and checkpoint) dir; rank 0 takes
    the run's lock. Any failure stops every rank with exit 2; the failing rank says why."""
    error: Optional[Exception] = None
    lock = None
    try:
        check_dump_dir(run.path, env.rank)
        if args.checkpoint.dir:
            check_dump_dir(Path(args.checkpoint.dir), env.rank, "checkpoint.dir")
        if env.is_main:
            lock = rundir.RunLock(run)
            stale = lock.acquire()
            if stale is not None:
                log.warning(
                    "dump_dir: taking over the lock of %s, which is no longer running", rundir.describe_holder(stale)
                )
    except (ConfigError, rundir.LockHeld) as err:
        error = err
    if all_reduce_max(torch.tensor(float(error is not None), device=env.device)).item():
        if lock is not None:
            lock.release()
        raise error or OtherRankFailed("")
    return lock


def train(args: TrainArgs) -> int:
    run = RunDir(args.dump_dir)
    record = ExitRecord(run, os.environ.get("RANK", "0") == "0")
    stop = StopFlag(record.abort)  # before the rendezvous: a Ctrl-C while waiting is no traceback either
    try:
        env = init_distributed(args.distributed)
    except BaseException:
        stop.restore()
        raise
    setup_logging(env.rank)
    seed_everything(args.seed, args.distributed.deterministic)
    trainer, cause, clean = None, "", True
    try:
        record.lock = start(run, args, env)
        control = dist.new_group(backend="gloo") if env.world > 1 and dist.get_backend() != "gloo" else None
        finished = run.read_done()
        if finished is not None and finished.get("step", -1) >= args.steps:  # even if its checkpoints were deleted
            log.info("run already complete (DONE at step %d): nothing to do", finished["step"])
            record.write(0, "finished")
            stop.restore()
            if record.lock is not None:
                record.lock.release()
            shutdown()
            return 0
        if env.is_main:
            prepare_data(args.data)
            dump_config(args, run.config)
        dist.barrier()
        trainer = record.trainer = Trainer(args, env, run, record.lock, control)
        trainer.resume()
        if trainer.step >= args.steps:
            log.info("run already complete (%d steps): nothing to do", trainer.step)
            if not run.is_done():
                trainer.finish()
            code = 0
        else:
            code = trainer.run(stop)
        cause = "" if code == 0 else trainer.stop_cause
    except rundir.LockHeld as err:
        print(f"config error: {err}", file=sys.stderr)
        record.refused, code, clean = True, EXIT_CONFIG, False
    except ConfigError as err:  # possibly on some ranks only: no barrier (torchrun stops the others)
        if not isinstance(err, OtherRankFailed):
            print(f"config error: {err}", file=sys.stderr)
        code, cause, clean = EXIT_CONFIG, f"config error: {err}", False
    except Diverged as err:
        cause = f"stopping at step {trainer.step if trainer else 0}: {err}; {trainer.last_good() if trainer else ''}"
        log.error("%s", cause)
        code = EXIT_DIVERGED
    except ckpt.CheckpointWriteError as err:  # every rank gets it: e.g. the disk is full
        log.error("%s", err)
        code, cause = EXIT_CHECKPOINT, str(err)
    except ckpt.CheckpointReadError as err:  # every rank gets it
        log.error("%s", err)
        code, cause = EXIT_NO_CHECKPOINT, str(err)
    except BaseException:
        stop.restore()
        if record.lock is not None:
            record.lock.release()
        dist.destroy_process_group()  # no barrier: the other ranks may be anywhere
        raise
    record.write(code, cause)
    stop.restore()
    if record.lock is not None:
        record.lock.release()
    if trainer is not None:
        trainer.close()
    if clean:
        shutdown()
    else:
        dist.destroy_process_group()
    return code


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, TrainArgs, _checked_train, USAGE, __doc__)


USAGE = "usage: python apps/train.py [config=]FILE.yaml [key=value ...]   (or torchrun ... apps/train.py ...)"


def _checked_train(args: TrainArgs) -> int:
    world = world_size_from_env()
    try:
        resolve_and_check(args, world)
        check_machine(args, world)
    except ConfigError as err:  # run_cli prints it and exits 2; the run directory records why
        if os.environ.get("RANK", "0") == "0":
            ExitRecord(RunDir(args.dump_dir), True).write(EXIT_CONFIG, f"config error: {err}")
        raise
    return train(args)
