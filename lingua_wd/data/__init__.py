"""Data: tokenizers, jsonl(.zst) / HF sources, lanes (shuffle, pack, mix), the loader and its resumable state.

The names below are loaded on first use (PEP 562) so that the background worker processes, which
import `lingua_wd.data.worker`, never import torch.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lingua_wd.data.loader import DataArgs

log = logging.getLogger(__name__)

_EXPORTS = {
    "DataArgs": "lingua_wd.data.loader",
    "TrainLoader": "lingua_wd.data.loader",
    "check_data_args": "lingua_wd.data.loader",
    "source_path": "lingua_wd.data.loader",
    "val_batches": "lingua_wd.data.loader",
    "TokenizerArgs": "lingua_wd.data.tokenizers",
    "build_tokenizer": "lingua_wd.data.tokenizers",
    "ensure_stdlib_corpus": "lingua_wd.data.corpus",
}
__all__ = sorted(_EXPORTS) + ["prepare_data", "check_sources"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bundled(name: str) -> bool:
    return Path(name).parts[:1] == ("stdlib",)


def check_sources(args: DataArgs) -> None:
    """Every source and val source outside the bundled corpus (built later, by prepare_data) and not
    on the HF hub resolves to files: a ConfigError naming the key otherwise. Builds nothing; part of
    the config check, so a missing path stops the run before any work."""
    from lingua_wd.data.loader import active_sources, source_path
    from lingua_wd.data.sources import HF_PREFIX, resolve_files

    for name in active_sources(args):
        if not (name.startswith(HF_PREFIX) or _bundled(name)):
            resolve_files(source_path(args, name), f"data.sources.{name}")
    val = args.val_sources
    if val and not (val.startswith(HF_PREFIX) or _bundled(val)):
        resolve_files(source_path(args, val), "data.val_sources")


def prepare_data(args: DataArgs) -> None:
    """Start-up work before any loader exists: build the bundled corpus if a source points into
    it, check that every source resolves (ConfigError naming the key otherwise), and train the
    bpe tokenizer if it is asked for and not cached. Idempotent and safe on concurrent ranks."""
    from lingua_wd.data.corpus import ensure_stdlib_corpus
    from lingua_wd.data.loader import active_sources, data_spec, source_path
    from lingua_wd.data.sources import resolve_files
    from lingua_wd.data.tokenizers import build_tokenizer

    def bundled(name: str) -> bool:
        return Path(name).parts[:1] == ("stdlib",)

    train = [bundled(n) for n in active_sources(args)]
    val = bool(args.val_sources) and bundled(args.val_sources)
    if any(train) or val:
        ensure_stdlib_corpus(args.root_dir)
    if val and not all(train):
        log.warning(
            "data: validating on the bundled corpus (data.val_sources=%s) while training on other data",
            args.val_sources,
        )
    data_spec(args)
    if args.val_sources and not args.val_sources.startswith("hf:"):
        resolve_files(source_path(args, args.val_sources), "data.val_sources")
    if args.tokenizer.name == "bpe":
        build_tokenizer(args.tokenizer)
