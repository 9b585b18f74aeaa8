"""Validation loss of a checkpoint without training: `python -m lingua_wd.eval PATH [key=value ...]`.

PATH is a run dir, a checkpoint dir or an exported HF folder (lingua_wd.export). By default the
held-out set is the trainer's own: the run's data.val_sources, eval_batches micro-batches per rank,
split over the rank count that wrote the checkpoint, loss averaged per rank then over ranks (as
lingua_wd.train.evaluate does), so the number equals the run's final logged val/loss. Prints one
JSON line: {"step", "val/loss", "val/ppl", "batches", "world", "tokens"}.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, replace
from typing import Optional

import torch

from lingua_wd.args import check, check_choice, one_of, run_cli
from lingua_wd.data import val_batches
from lingua_wd.inference import DEVICES, DTYPES, load_model, pick_device
from lingua_wd.loss import reference_cross_entropy

log = logging.getLogger(__name__)


@dataclass
class EvalArgs:
    path: str = ""  # a run dir, a checkpoint dir, or an exported HF folder (with its lingua_wd.json)
    config: str = ""  # our checkpoints: the run's config.yaml ("" = found next to the checkpoint)
    val_sources: str = ""  # held-out file/folder/glob ("" = the run's data.val_sources)
    batches: int = 0  # micro-batches per rank (0 = the run's eval_batches)
    world: int = 0  # ranks the held-out set is split over (0 = the checkpoint's: the trainer's exact set)
    device: str = one_of("auto", lambda: DEVICES)  # where to run (auto: cuda if available)
    dtype: str = one_of("fp32", lambda: DTYPES)  # weights and compute (bf16: what FSDP computes in on CUDA)


def check_eval_args(args: EvalArgs) -> None:
    check(bool(args.path), "path", "must be set (a run dir, a checkpoint dir or an exported folder)")
    check(args.batches >= 0, "batches", f"must be >= 0, got {args.batches}")
    check(args.world >= 0, "world", f"must be >= 0, got {args.world}")
    check_choice(args.device, "device", DEVICES)
    check_choice(args.dtype, "dtype", DTYPES)


@torch.no_grad()
def evaluate_path(args: EvalArgs) -> dict:
    """The validation loss of the model at args.path on the run's (or the given) held-out data."""
    check_eval_args(args)
    device = pick_device(args.device)
    loaded = load_model(args.path, device, args.dtype, args.config)
    check(loaded.data is not None, "path", f"{args.path} has no lingua_wd.json: cannot tell its data and tokenizer")
    data = replace(loaded.data, val_sources=args.val_sources or loaded.data.val_sources)
    check(bool(data.val_sources), "val_sources", "the run has no data.val_sources; pass val_sources=...")
    n = args.batches or int(loaded.config.get("eval_batches") or 8)  # 8: the trainer's default
    world = args.world or loaded.world_size
    per_rank, tokens = [], 0
    for rank in range(world):  # each rank's share, as the trainer's ranks see it
        batches = val_batches(data, loaded.tokenizer, rank, world, n)
        check(len(batches) > 0, "val_sources", f"{data.val_sources} gives rank {rank} of {world} no micro-batch")
        total = sum(
            reference_cross_entropy(loaded.forward(b[:, :-1].to(device)), b[:, 1:].to(device)).item() for b in batches
        )
        per_rank.append(total / len(batches))
        tokens += sum(b[:, 1:].numel() for b in batches)
    loss = sum(per_rank) / world
    return {
        "step": loaded.step,
        "val/loss": loss,
        "val/ppl": math.exp(loss),
        "batches": n,
        "world": world,
        "tokens": tokens,
    }


USAGE = "usage: python -m lingua_wd.eval PATH [key=value ...]   (or lingua-wd eval ...)"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, EvalArgs, lambda args: print(json.dumps(evaluate_path(args))), USAGE, __doc__, ("path",))


if __name__ == "__main__":
    sys.exit(main())
