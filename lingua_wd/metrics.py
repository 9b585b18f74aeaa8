"""Metrics: console lines, `<dump_dir>/metrics.jsonl`, wandb; MFU against the device's bf16 peak.

MFU = tokens/s x FLOPs/token / (ranks x peak), FLOPs/token = 6 x (params of the blocks + output
layer) + 12 x n_layers x dim x seq_len, peak = dense bf16 tensor-core FLOP/s (989 TFLOP/s on H100
and H200 SXM). On a CPU no MFU is reported.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lingua_wd.args import check
from lingua_wd.rundir import RunDir, format_duration

log = logging.getLogger("lingua_wd")

# dense bf16 peak FLOP/s by device-name fragment (first match wins)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
WANDB_MODES = ("disabled", "offline", "online")
# metrics.jsonl fields that measure the wall clock or the process, not the training: the only ones a
# resumed run may log differently from an uninterrupted one (tests/test_reliability.py compares the rest)
WALL_CLOCK_KEYS = ("tokens_per_s", "mfu", "peak_mem_gb")


@dataclass
class LoggingArgs:
    wandb_mode: str = "disabled"  # disabled | offline | online
    wandb_project: str = "lingua_wd"  # wandb project
    wandb_entity: str = ""  # wandb entity ("" = your default)
    wandb_group: str = ""  # wandb group (e.g. a sweep name)


def check_logging_args(args: LoggingArgs) -> None:
    check(
        args.wandb_mode in WANDB_MODES, "logging.wandb_mode", f"must be one of {WANDB_MODES}, got {args.wandb_mode!r}"
    )


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = "%(asctime)s %(levelname).1s " + (f"[rank{rank}] " if rank else "") + "%(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", force=True)


class MetricLogger:
    """Rank 0 writes metrics.jsonl (appending, so a resumed run continues the file) and wandb."""

    def __init__(self, dump_dir: Path, args: LoggingArgs, config: dict, run_name: str, enabled: bool):
        self.enabled = enabled
        self.path = RunDir(dump_dir).metrics
        self.wandb = None
        if enabled and args.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=args.wandb_project,
                entity=args.wandb_entity or None,
                group=args.wandb_group or None,
                name=run_name,
                config=config,
                mode=args.wandb_mode,
                dir=str(dump_dir),
                id=run_name.replace("/", "_"),
                resume="allow",
            )

    def size(self) -> int:
        """Bytes written so far (saved in each checkpoint: a resumed run continues the file from there)."""
        try:
            return self.path.stat().st_size if self.enabled else 0
        except FileNotFoundError:
            return 0

    def truncate_to(self, size: int) -> None:
        """On resume: drop everything written after the checkpoint (lines, events, a torn last line),
        so the resumed run's lines follow exactly; 0 on a start without a checkpoint."""
        if not (self.enabled and self.path.exists()):
            return
        have = self.path.stat().st_size
        if have < size:
            log.warning(
                "metrics: %s is shorter (%d bytes) than at the checkpoint (%d): kept as it is", self.path, have, size
            )
            return
        if have > size:
            with open(self.path, "r+b") as f:
                f.truncate(size)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records past the checkpoint's step (they will be logged again)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", -1)
    except ValueError:
        return math.inf  # a torn last line from a crash: drop it


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def console_line(r: dict[str, Any], total: int, elapsed: float, eta: Optional[float]) -> str:
    """One log line: step k/N, losses and rates of the record, then the session's elapsed time and the ETA."""
    width = len(str(total))
    parts = [f"step {r['step']:>{width}d}/{total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    parts += [f"gnorm {r['grad_norm']:.3f}", f"tok/s {r['tokens_per_s']:,.0f}"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if r.get("peak_mem_gb") is not None:
        parts.append(f"mem {r['peak_mem_gb']:.1f}GB")
    if r.get("data/skipped"):
        parts.append(f"skipped {r['data/skipped']}")
    parts.append(f"elapsed {format_duration(elapsed)}")
    parts.append(f"eta {format_duration(eta) if eta is not None else '?'}")
    return " | ".join(parts)


def eta_seconds(done: int, total: int, elapsed: float) -> Optional[float]:
    """Seconds left at this session's mean pace (its evals and checkpoints included); None before a step."""
    return (total - done) * elapsed / done if done > 0 and elapsed > 0 else None


def run_summary(s: dict[str, Any]) -> str:
    """The paragraph printed at the end of a run (keys: step, tokens, session_steps, session_tokens,
    wall_s, train_loss, last_n, val_loss, tokens_per_s, mfu, resumed_from)."""
    val = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "none (no validation set)"
    since = f", resumed at step {s['resumed_from']}" if s.get("resumed_from") else ""
    mfu = f"MFU {100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "no MFU (no known bf16 peak on this device)"
    return (
        f"run finished: {s['step']:,} steps, {s['tokens']:,} tokens. Final train loss {s['train_loss']:.4f} "
        f"(mean of the last {s['last_n']} steps), val loss {val}. This session: {s['session_steps']:,} steps "
        f"in {format_duration(s['wall_s'])}{since}, {s['tokens_per_s']:,.0f} tokens/s on average, {mfu}."
    )


class Throughput:
    """Tokens/s and MFU over the steps since the last call (wall clock, synchronized by the caller)."""

    def __init__(self, flops_per_token: float, peak: Optional[float], world: int):
        self.fpt, self.peak, self.world = flops_per_token, peak, world
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict[str, Optional[float]]:
        now = time.perf_counter()
        tps = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        mfu = tps * self.fpt / (self.peak * self.world) if self.peak else None
        return {"tokens_per_s": tps, "mfu": mfu}
