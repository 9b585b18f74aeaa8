"""The trainer: `python apps/train.py config=FILE.yaml key=value ...` (or under torchrun).

One code path from a 2-layer model on a laptop CPU to the 20-block d=2048 reference model on
8 H200s: FSDP2 per block and at the root, bf16 params / fp32 reduce on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lingua_wd import checkpoint as ckpt
from lingua_wd.args import ConfigError, check, dump_config, run_cli, to_dict, to_yaml, upgrade_keys
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
    peak_flops,
    setup_logging,
)
from lingua_wd.model import ModelArgs, Transformer, count_params, flops_per_token
from lingua_wd.optim import OptimArgs, build_optimizer, check_plan_args, clip_grad_norm_
from lingua_wd.probes import ProbeArgs, build_probes, check_probe_args, match_layers
from lingua_wd.scaling import ScalingArgs, init_std_fn, param_classes
from lingua_wd.schedule import ScheduleArgs

log = logging.getLogger("lingua_wd")
EXIT_REQUEUE = 75  # stopped by SIGTERM / SIGUSR1 after saving a checkpoint: requeue and resume
EXIT_DIVERGED = 3  # too many non-finite steps: stopped without saving (the last good checkpoint stays)
EXIT_CHECKPOINT = 4  # a checkpoint could not be written (disk full, I/O error): the previous one stays the latest
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
    guard: GuardArgs = field(default_factory=GuardArgs)


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


def check_dump_dir(path: Path, rank: int) -> None:
    """An unwritable or full dump dir is a clear error at start-up, not a crash at the first checkpoint."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-rank{rank}"  # one per rank: ranks share the directory
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"dump_dir: cannot write to {path} ({err.strerror or err})") from None


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
    if not batches:
        return None
    total = torch.zeros((), device=device)
    for b in batches:
        b = b.to(device)
        total += model(b[:, :-1], b[:, 1:])
    reshard_all(model)
    return all_reduce_mean(total / len(batches)).item()


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM preemption, time limit) ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received signal %d: will save a checkpoint and exit at the next log step", signum)
        self.raised = True

    def agreed(self, device: torch.device) -> bool:
        """Collective: every rank stops if any rank was signalled."""
        return bool(all_reduce_max(torch.tensor(float(self.raised), device=device)).item())


class Trainer:
    """Builds everything from TrainArgs, resumes from the dump dir's last checkpoint, runs the loop."""

    def __init__(self, args: TrainArgs, env: DistEnv):
        self.args, self.env = args, env
        self.dump_dir = Path(args.dump_dir)
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
        self.ckpt_root = Path(args.checkpoint.dir or self.dump_dir / "checkpoints")
        self.spikes = SpikeDetector(args.guard.spike_factor)
        self.step, self.nonfinite, self.val_loss = 0, 0, None
        self.recent = torch.zeros(LAST_N, device=env.device)  # last 100 step losses, for DONE

    def config_for_resume(self) -> dict:
        return {**to_dict(self.args), "world_size": self.env.world}

    def resume(self) -> None:
        path = ckpt.latest(self.ckpt_root)
        if path is None:
            return
        saved = upgrade_keys(TrainArgs, ckpt.saved_config(path))  # keys renamed since: compared by their new names
        conflicts = resume_conflicts(saved, self.config_for_resume()) if saved else []
        if conflicts and not self.args.guard.force_resume:
            raise ConfigError(
                f"{conflicts[0].split()[0]}: changed since checkpoint {path.name}: "
                f"{'; '.join(conflicts)} (set guard.force_resume=true to resume anyway)"
            )
        states = ckpt.load(path, self.model, self.optimizer)
        mine = states[self.env.rank] if len(states) == self.env.world else states[0]
        self.step, self.nonfinite = mine["step"], mine["nonfinite"]
        self.recent = mine["recent_losses"].to(self.env.device)
        self.scheduler.load_state_dict(mine["scheduler"])
        self.spikes.load_state_dict(mine["spikes"])
        if self.probes is not None and "probes" in mine:
            self.probes.load_state_dict(mine["probes"])
        self.loader.load_states([s["data"] for s in states])
        set_rng_state(mine["rng"])
        self.logger.truncate_after(self.step)
        log.info("resumed from %s at step %d%s", path, self.step, f" (forced: {conflicts})" if conflicts else "")

    def save(self) -> None:
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "rng": rng_state(),
            "recent_losses": self.recent.cpu(),
            "nonfinite": self.nonfinite,
            "spikes": self.spikes.state_dict(),
            "probes": self.probes.state_dict() if self.probes is not None else {},
            "world_size": self.env.world,
        }
        crash = self.args.guard.crash_in_checkpoint == self.step
        path = ckpt.save(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            state,
            self.args.checkpoint.keep,
            config=to_yaml(self.args),
            crash_before_manifest=crash,
        )
        log.info("saved checkpoint %s", path)

    def log(
        self,
        step_losses: list[torch.Tensor],
        grad_norm,
        skipped: torch.Tensor,
        lr: float,
        meter: Throughput,
        probe_metrics: dict,
    ) -> None:
        """One sync per log step: losses, norms and counters come to the host together."""
        env = self.env
        host = all_reduce_mean(torch.stack(step_losses)).tolist()
        counts = all_reduce_sum(torch.stack([skipped, torch.tensor(float(self.loader.skipped), device=env.device)]))
        skipped_steps, data_skipped = (int(c) for c in counts.tolist())
        self.nonfinite += skipped_steps
        first = self.step - len(host) + 1
        for i, loss in enumerate(host):
            event = self.spikes.update(first + i, loss)
            if event:
                self.logger.log(event)
                log.warning(
                    "loss spike at step %d: %.4f (running mean %.4f)", event["step"], loss, event["running_mean"]
                )
        record = {
            "step": self.step,
            "loss": sum(host) / len(host),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            **meter.read(),
            "data/skipped": data_skipped,
            "nonfinite_steps": self.nonfinite,
        }
        if env.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 1e9
        record.update(probe_metrics)
        self.logger.log(record)
        log.info(console_line(record))

    def evaluate(self) -> None:
        self.val_loss = evaluate(self.model, self.val, self.env.device)
        if self.val_loss is not None:
            self.logger.log({"step": self.step, "val/loss": self.val_loss})
            log.info("step %6d | val loss %.4f", self.step, self.val_loss)

    def run(self) -> int:
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
        meter = Throughput(flops_per_token(self.model, args.data.seq_len), peak_flops(env.device), env.world)
        stop, step_losses, skipped = StopFlag(), [], torch.zeros((), device=env.device)
        while self.step < args.steps:
            batch = self.loader.next_batch().to(env.device, non_blocking=True)
            lr = self.optimizer.param_groups[self.lr_group]["lr"]
            loss, grad_norm, bad, probe_metrics = train_step(
                self.model, batch, self.optimizer, self.scheduler, args, self.n_micro, self.step, self.probes
            )
            self.recent[self.step % LAST_N] = loss
            self.step += 1
            step_losses.append(loss)
            skipped = skipped + bad
            meter.add(self.tokens_per_step // env.world)
            last = self.step == args.steps
            if self.step % args.log_freq == 0 or last or probe_metrics:
                self.log(step_losses, grad_norm, skipped, lr, meter, probe_metrics)
                step_losses, skipped = [], torch.zeros((), device=env.device)
                if args.guard.max_nonfinite and self.nonfinite >= args.guard.max_nonfinite:
                    log.error(
                        "stopping: %d steps had a non-finite loss or gradient norm (guard.max_nonfinite=%d); "
                        "the last good checkpoint is kept",
                        self.nonfinite,
                        args.guard.max_nonfinite,
                    )
                    return EXIT_DIVERGED
                if stop.agreed(env.device):
                    self.save()
                    return EXIT_REQUEUE
            if (args.eval_freq and self.step % args.eval_freq == 0) or last:
                self.evaluate()
            if (args.checkpoint.every and self.step % args.checkpoint.every == 0) or last:
                self.save()
        if env.is_main:
            done = {
                "step": self.step,
                "train_loss_last": float(self.recent[: min(self.step, LAST_N)].nanmean()),
                "val_loss": self.val_loss,
            }
            (self.dump_dir / "DONE").write_text(json.dumps(done))
        return 0

    def close(self) -> None:
        self.logger.close()
        self.loader.close()


def train(args: TrainArgs) -> int:
    env = init_distributed(args.distributed)
    setup_logging(env.rank)
    seed_everything(args.seed, args.distributed.deterministic)
    trainer = None
    try:
        check_dump_dir(Path(args.dump_dir), env.rank)
        if env.is_main:
            prepare_data(args.data)
            dump_config(args, Path(args.dump_dir) / "config.yaml")
        torch.distributed.barrier()
        trainer = Trainer(args, env)
        trainer.resume()
        if trainer.step >= args.steps:
            log.info("run already complete (%d steps): nothing to do", trainer.step)
            code = 0
        else:
            code = trainer.run()
    except ConfigError as err:  # possibly on some ranks only: no barrier (torchrun stops the others)
        print(f"config error: {err}", file=sys.stderr)
        torch.distributed.destroy_process_group()
        return 2
    except ckpt.CheckpointWriteError as err:  # every rank gets it: e.g. the disk is full
        log.error("%s", err)
        torch.distributed.destroy_process_group()
        return EXIT_CHECKPOINT
    except BaseException:
        torch.distributed.destroy_process_group()  # no barrier: the other ranks may be anywhere
        raise
    if trainer is not None:
        trainer.close()
    shutdown()
    return code


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, TrainArgs, _checked_train, USAGE, __doc__)


USAGE = "usage: python apps/train.py [config=]FILE.yaml [key=value ...]   (or torchrun ... apps/train.py ...)"


def _checked_train(args: TrainArgs) -> int:
    resolve_and_check(args, world_size_from_env())
    return train(args)
