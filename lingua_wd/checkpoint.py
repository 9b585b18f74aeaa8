"""Checkpoints with torch.distributed.checkpoint (DCP): sharded model + optimizer, plus per-rank state.

Layout: `<dir>/<step:010d>/` holds the DCP files of {"model", "optim"}, one `rank<r>.pt` per rank
(step, scheduler, data-loader state, RNG states, log state) and `MANIFEST.json`, written last, naming
every file with its size and xxh3_64 checksum (each rank hashes the files it wrote). A checkpoint is
written into `.tmp-<step>` and renamed only when complete, so a crash at any moment leaves the
previous checkpoint intact. On load every file's checksum is verified (the ranks share the files);
a checkpoint that fails (missing manifest, size or checksum mismatch, unreadable or unpicklable
file) is one warning line naming the file and the cause, and the previous one is tried.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lingua_wd.args import check
from lingua_wd.distributed import all_reduce_max

log = logging.getLogger(__name__)
MANIFEST = "MANIFEST.json"
HASH = "xxh3_64"  # the checksum of every file in the manifest (xxhash's 64-bit XXH3)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written on some rank; nothing was marked as the latest."""


class CheckpointReadError(RuntimeError):
    """The checkpoint directory cannot be read, or holds checkpoints of which none loads (one line)."""


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


def manifest_sizes(manifest: dict) -> dict[str, int]:
    """name -> size from a manifest (the old format maps name -> size, the new name -> {size, xxh3_64})."""
    return {f: (v["size"] if isinstance(v, dict) else v) for f, v in manifest["files"].items()}


def problem(path: Path) -> Optional[str]:
    """Why the checkpoint directory is not complete (cheap: the manifest and file sizes), or None."""
    try:
        text = (path / MANIFEST).read_text()
    except FileNotFoundError:
        return f"no {MANIFEST}: its write was interrupted"
    except OSError as err:
        return f"{MANIFEST}: {err.strerror or err}"
    try:
        sizes = manifest_sizes(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    for name, size in sorted(sizes.items()):
        try:
            have = (path / name).stat().st_size
        except OSError as err:
            return f"{name}: {err.strerror or err}"
        if have != size:
            return f"{name}: size mismatch ({have} bytes, the manifest says {size})"
    return None


def is_complete(path: Path) -> bool:
    """True when the manifest exists and every file it names is there with its recorded size."""
    return problem(path) is None


def candidates(root: Path) -> list[Path]:
    """Every <step> directory under root, oldest first (an unreadable root is one CheckpointReadError line)."""
    try:
        return sorted(p for p in root.iterdir() if p.name.isdigit() and p.is_dir())
    except FileNotFoundError:
        return []
    except OSError as err:
        raise CheckpointReadError(
            f"checkpoint.dir: cannot read {root} ({err.strerror or err}); fix its permissions"
        ) from None


def list_checkpoints(root: Path, warn: bool = True) -> list[Path]:
    """Complete checkpoints under root, oldest first; incomplete ones are skipped with a warning naming the cause."""
    out = []
    for p in candidates(root):
        why = problem(p)
        if why is None:
            out.append(p)
        elif warn:
            log.warning("skipping checkpoint %s: %s", p, why)
    return out


def latest(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def file_hash(path: Path) -> str:
    """xxh3_64 of a file, hashed straight from the page cache through mmap (no copy): about 20 GB/s
    on one core for a file just written (docs/benchmarks.md)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return xxhash.xxh3_64(m).hexdigest()


def _my_files(tmp: Path, rank: int) -> list[Path]:
    """The files this rank wrote: DCP's __<rank>_<i>.distcp and rank<rank>.pt; rank 0 also the rest."""
    mine = [*tmp.glob(f"__{rank}_*.distcp"), tmp / f"rank{rank}.pt"]
    if rank == 0:
        mine += [p for p in (tmp / ".metadata", tmp / "config.yaml") if p.exists()]
    return mine


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _no_space(err: Optional[BaseException]) -> bool:
    """ENOSPC somewhere in the cause chain (torch.save reports a full disk as 'unexpected pos')."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left" in str(err) or "unexpected pos" in str(err):
            return True
        if isinstance(err, CheckpointException):
            return any(_no_space(e[0] if isinstance(e, tuple) else getattr(e, "exc", e)) for e in err.failures.values())
        err = err.__cause__ or err.__context__
    return False


def checkpoint_bytes(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the next checkpoint needs: the newest one's size, else every rank's tensors (x world) + 5%."""
    done = list_checkpoints(root, warn=False) if root.is_dir() else []
    if done:
        try:
            return sum(manifest_sizes(json.loads((done[-1] / MANIFEST).read_text())).values())
        except (OSError, ValueError, KeyError):
            pass
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in optimizer.state.values():
        local += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    if not optimizer.state:  # before the first step AdamW holds no state yet: two moments per parameter
        local *= 3
    return int(1.05 * local * dist.get_world_size())


def _no_space_line(root: Path, need: int) -> str:
    return f"no space left on device: need ~{_size(need)}, have {_size(shutil.disk_usage(root).free)} in {root}"


def make_room(root: Path, need: int, keep: int) -> None:
    """Rank 0, before writing: when the disk lacks `need` bytes, delete now the checkpoints that the
    write would prune anyway (beyond keep - 1, never the newest); if that is not enough, raise one
    line saying what to delete. A restart after a disk-full stop therefore does not fail again."""
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write: never loadable
        shutil.rmtree(stale, ignore_errors=True)
    done = list_checkpoints(root, warn=False)
    spare = done[: max(0, len(done) - max(keep - 1, 1))]
    while shutil.disk_usage(root).free < need and spare:
        old = spare.pop(0)
        free = _size(shutil.disk_usage(root).free)
        log.warning(
            "checkpoint: %s free in %s, the next checkpoint needs ~%s: deleting %s now rather than after the "
            "write (checkpoint.keep=%d)",
            *(free, root, _size(need), old.name, keep),
        )
        shutil.rmtree(old, ignore_errors=True)
    if shutil.disk_usage(root).free < need:
        rest = [p.name for p in list_checkpoints(root, warn=False)]
        hint = (
            f"free space or delete older checkpoints ({', '.join(rest[:-1])})"
            if len(rest) > 1
            else "free space on that disk or set checkpoint.dir to another one"
        )
        raise CheckpointWriteError(f"{_no_space_line(root, need)}; {hint}")


def _agree(error: Optional[BaseException], step: int, root: Path, need: int, tmp: Path) -> None:
    """Collective: if any rank failed, every rank raises one CheckpointWriteError (the root cause)."""
    rank = dist.get_rank()
    flag_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    if not all_reduce_max(torch.tensor(float(error is not None), device=flag_device)).item():
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint stays the latest
    if isinstance(error, CheckpointWriteError):
        why = str(error)
    elif error is None:
        why = "failed on another rank"
    elif _no_space(error) or (need and shutil.disk_usage(root).free < need):
        why = _no_space_line(root, need)
    else:
        why = _first_line(error)
    raise CheckpointWriteError(f"checkpoint {step} could not be written: {why}; the previous one is kept")


def save(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    keep: int,
    config: str = "",
    crash_before_manifest: bool = False,
    need: int = 0,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    Each rank hashes the files it wrote (xxh3_64); rank 0 gathers the hashes into the manifest. If
    any rank fails to write (disk full, I/O error) every rank raises and nothing is renamed: the
    previous checkpoint stays the latest. `need` (bytes, see checkpoint_bytes) lets rank 0 make room
    first and name the shortfall.
    """
    rank = dist.get_rank()
    final, tmp = step_dir(root, step), root / f".tmp-{step:010d}"
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if need:
                make_room(root, need, keep)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except (OSError, CheckpointWriteError) as err:
            error = err
    _agree(error, step, root, need, tmp)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    mine: dict[str, dict] = {}
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))  # collective: fails on every rank
        _atomic_torch_save(rank_state, tmp / f"rank{rank}.pt")
        if rank == 0 and config:
            _atomic_write(tmp / "config.yaml", config)
        mine = {f.name: {"size": f.stat().st_size, HASH: file_hash(f)} for f in _my_files(tmp, rank)}
    except (Exception, CheckpointException) as err:  # disk full, I/O error (CheckpointException is a BaseException)
        error = err
    _agree(error, step, root, need, tmp)
    if crash_before_manifest:  # fault injection (guard.crash_in_checkpoint): die with the data written
        os._exit(137)
    gathered: list[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        try:
            files = {k: v for part in gathered for k, v in (part or {}).items()}
            for f in tmp.iterdir():  # anything DCP wrote that no rank claimed: rank 0 hashes it
                if f.name not in files and f.name != MANIFEST:
                    files[f.name] = {"size": f.stat().st_size, HASH: file_hash(f)}
            manifest = {"step": step, "world_size": dist.get_world_size(), "hash": HASH, "files": files}
            _atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            if final.exists():  # a stale directory of the same step (e.g. from a run that was rolled back)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as err:
            error = err
    _agree(error, step, root, need, tmp)
    if rank == 0:
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


def verify(path: Path) -> Optional[str]:
    """Collective: each rank checks the checksums of its share of the files; returns the first
    problem found on any rank ("<file>: checksum mismatch ..."), the same on every rank, or None."""
    rank, world = dist.get_rank(), dist.get_world_size()
    why = problem(path)
    if why is None:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, entry in sorted(manifest["files"].items())[rank::world]:
            if not isinstance(entry, dict) or HASH not in entry:
                continue  # written before checksums: its sizes were checked
            try:
                got = file_hash(path / name)
            except OSError as err:
                why = f"{name}: {err.strerror or err}"
                break
            if got != entry[HASH]:
                why = f"{name}: checksum mismatch ({HASH} {got}, the manifest says {entry[HASH]})"
                break
    found: list[Optional[str]] = [None] * world
    dist.all_gather_object(found, why)
    return next((w for w in found if w), None)


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Load model and optimizer in place; return every saved rank's state (index = saved rank)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    manifest = json.loads((path / MANIFEST).read_text())
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(manifest["world_size"])]


def load_latest(
    root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, accept: Callable[[Path], None] = lambda p: None
) -> tuple[Optional[Path], list[dict[str, Any]]]:
    """Collective: load the newest checkpoint that verifies and loads; each one that does not is one
    warning line naming the file and the cause, then the previous one is tried. (None, []) when the
    root holds no checkpoint; CheckpointReadError (one line) when it holds some and none loads.
    `accept(path)` may raise (e.g. a ConfigError for a changed config) before anything is loaded."""
    tried = []
    for path in reversed(candidates(root)):
        why = verify(path)
        if why is None:
            accept(path)
            try:
                states = load(path, model, optimizer)
            except (Exception, CheckpointException) as err:
                states, why = [], f"cannot load it ({_first_line(err)})"
            found: list[Optional[str]] = [None] * dist.get_world_size()
            dist.all_gather_object(found, why)
            why = next((w for w in found if w), None)
            if why is None:
                return path, states
        log.warning("checkpoint %s is not usable: %s; trying the previous one", path, why)
        tried.append(f"{path.name} ({why})")
    if tried:
        raise CheckpointReadError(
            f"checkpoint.dir: no loadable checkpoint in {root}: {'; '.join(tried)}; "
            "move them away (or delete them) to start over"
        )
    return None, []


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
