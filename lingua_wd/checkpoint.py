"""Checkpoints with torch.distributed.checkpoint (DCP): sharded model + optimizer, plus per-rank state.

Layout: `<dir>/<step:010d>/` holds the DCP files of {"model", "optim"}, one `rank<r>.pt` per rank
(step, scheduler, data-loader state, RNG states) and `MANIFEST.json`, written last, naming every
file with its size. A checkpoint is written into `.tmp-<step>` and renamed only when complete, so a
crash at any moment leaves the previous checkpoint intact; a directory without a valid manifest is
never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lingua_wd.args import check
from lingua_wd.distributed import all_reduce_max

log = logging.getLogger(__name__)
MANIFEST = "MANIFEST.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written on some rank; nothing was marked as the latest."""


def _first_line(err: BaseException) -> str:
    """The root cause's message (DCP wraps each rank's error in a long CheckpointException)."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))
        err = err[0] if isinstance(err, tuple) else getattr(err, "exc", err)  # DCP's (exception, traceback)
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@dataclass
class CheckpointArgs:
    every: int = 1000  # save every N steps (0: only at the end and on preemption)
    keep: int = 2  # keep the last K checkpoints (older ones are deleted)
    dir: str = ""  # where checkpoints go ("" = <dump_dir>/checkpoints)


def check_checkpoint_args(args: CheckpointArgs) -> None:
    check(args.every >= 0, "checkpoint.every", f"must be >= 0, got {args.every}")
    check(args.keep >= 1, "checkpoint.keep", f"must be >= 1, got {args.keep}")


def step_dir(root: Path, step: int) -> Path:
    return root / f"{step:010d}"


def is_complete(path: Path) -> bool:
    """True when the manifest exists and every file it names is there with its recorded size."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / f).stat().st_size == size for f, size in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first; incomplete ones are skipped with a warning."""
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if not (p.is_dir() and p.name.isdigit()):
            continue
        if is_complete(p):
            out.append(p)
        else:
            log.warning("skipping incomplete checkpoint %s (no valid %s)", p, MANIFEST)
    return out


def latest(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    keep: int,
    config: str = "",
    crash_before_manifest: bool = False,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    If any rank fails to write (disk full, I/O error) every rank raises and nothing is renamed:
    the previous checkpoint stays the latest.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    final, tmp = step_dir(root, step), root / f".tmp-{step:010d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    error: Optional[BaseException] = None
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))  # collective: fails on every rank
        _atomic_torch_save(rank_state, tmp / f"rank{rank}.pt")
        if rank == 0 and config:
            _atomic_write(tmp / "config.yaml", config)
    except (Exception, CheckpointException) as err:  # disk full, I/O error (CheckpointException is a BaseException)
        error = err
    flag_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    if all_reduce_max(torch.tensor(float(error is not None), device=flag_device)).item():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint stays the latest
        why = _first_line(error) if error is not None else "failed on another rank"
        free = shutil.disk_usage(root).free / 2**20
        raise CheckpointWriteError(
            f"checkpoint {step} could not be written ({why}; {free:.1f} MiB free in {root}); the previous one is kept"
        )
    if crash_before_manifest:  # fault injection (guard.crash_in_checkpoint): die with the data written
        os._exit(137)
    dist.barrier()
    if rank == 0:
        files = {f.name: f.stat().st_size for f in tmp.iterdir()}
        _atomic_write(tmp / MANIFEST, json.dumps({"step": step, "world_size": world, "files": files}, indent=1))
        if final.exists():  # a stale directory of the same step (e.g. from a run that was rolled back)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def saved_config(path: Path) -> Optional[dict]:
    """The resolved config the checkpoint was written with (None for checkpoints without one)."""
    f = path / "config.yaml"
    if not f.exists():
        return None
    import yaml

    cfg = yaml.safe_load(f.read_text())
    cfg["world_size"] = json.loads((path / MANIFEST).read_text())["world_size"]
    return cfg


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Load model and optimizer in place; return every saved rank's state (index = saved rank)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    manifest = json.loads((path / MANIFEST).read_text())
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(manifest["world_size"])]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# =============================================================================
# Reading our checkpoints outside training (export, eval, generate): no process group, any rank count.
# =============================================================================


@dataclass
class Run:
    """A checkpoint and the config it was trained with."""

    ckpt: Path  # the checkpoints/<step> directory
    step: int
    world_size: int  # ranks that wrote it (the trainer's validation set is split over this many)
    model: Any  # ModelArgs, resolved: vocab_size and max_seq_len are filled in
    data: Any  # DataArgs
    config: dict  # the whole resolved config as saved


def resolve_checkpoint(path: str | Path, key: str = "ckpt_dir") -> Path:
    """A checkpoint dir itself, or the latest complete one under `<run>/checkpoints` or a checkpoints dir."""
    path = Path(path).expanduser()
    if (path / MANIFEST).exists():
        check(is_complete(path), key, f"{path} is incomplete (its {MANIFEST} does not match its files)")
        return path
    found = latest(path / "checkpoints") or latest(path)
    check(found is not None, key, f"no complete checkpoint in {path} (expected <run>/checkpoints/<step>/)")
    return found


def find_config(ckpt_path: Path, given: str = "") -> Path:
    """The config a checkpoint was trained with: `given`, its own copy, or the run dir's config.yaml."""
    if given:
        check(Path(given).expanduser().is_file(), "config", f"no such file {given}")
        return Path(given).expanduser()
    found = [c for c in (ckpt_path, ckpt_path.parent.parent, ckpt_path.parent) if (c / "config.yaml").is_file()]
    check(bool(found), "config", f"no config.yaml next to {ckpt_path}; pass config=<run dir>/config.yaml")
    return found[0] / "config.yaml"


def run_sections(cfg: dict) -> tuple[Any, Any]:
    """(ModelArgs, DataArgs) of a saved run config (args.read_sections: runs saved by older or newer code open)."""
    from lingua_wd.args import read_sections
    from lingua_wd.data import DataArgs
    from lingua_wd.model import ModelArgs

    sections = read_sections(cfg, {"model": ModelArgs, "data": DataArgs})
    return sections["model"], sections["data"]


def open_run(path: str | Path, config: str = "", key: str = "ckpt_dir") -> Run:
    """The checkpoint at (or latest under) `path` with its resolved model and data config."""
    from omegaconf import OmegaConf

    ckpt_path = resolve_checkpoint(path, key)
    cfg = OmegaConf.to_container(OmegaConf.load(find_config(ckpt_path, config)), resolve=True)
    model, data = run_sections(cfg)
    check(model.vocab_size > 0 and model.max_seq_len > 0, "config", "model.vocab_size / max_seq_len are not resolved")
    manifest = json.loads((ckpt_path / MANIFEST).read_text())
    return Run(ckpt_path, int(manifest["step"]), int(manifest["world_size"]), model, data, cfg)


def consolidate(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a DCP checkpoint written by any number of ranks, in this process
    alone: every `model.*` tensor is allocated at its global size and DCP reads all shards into it."""
    import warnings

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt_path))
    meta = reader.read_metadata().state_dict_metadata
    sd = {
        k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    check(bool(sd), "ckpt_dir", f"{ckpt_path} holds no model tensors")
    state = {"model": sd}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)  # nested keys flatten to model.<name>, as saved
    return state["model"]
