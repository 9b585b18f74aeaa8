"""Models for inference: our run / checkpoint dirs and exported HF folders alike, behind one interface
(`load_model` -> Loaded: a forward, our tokenizer interface, the context length and the run's data
config). lingua_wd.eval and lingua_wd.generate load through it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lingua_wd.args import check_choice
from lingua_wd.checkpoint import consolidate, open_run, run_sections
from lingua_wd.data import DataArgs, build_tokenizer
from lingua_wd.hf import META_FILE
from lingua_wd.model import ModelArgs, Transformer, rope_tables

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def build_transformer(
    args: ModelArgs, sd: dict[str, torch.Tensor], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Our model holding `sd` in eval mode (on CPU in fp32 the tensors are used in place, not copied).
    Only the parameters take `dtype`: the RoPE table stays fp32, as under FSDP mixed precision."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(sd, strict=True, assign=True)
    model.rope = torch.empty(0)  # the meta buffer (not in the state dict) is rebuilt in fp32 below
    model.to(device=device, dtype=dtype)
    model.rope = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta, device=device)
    return model.eval()


class HFTokenizerAdapter:
    """An exported folder's AutoTokenizer behind our tokenizer interface (encode(text, bos, eos), decode)."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])


@dataclass
class Loaded:
    """A model ready for inference, ours or an exported one."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # tokens (B, T) -> logits (B, T, V)
    tokenizer: Any  # our tokenizer interface
    max_seq_len: int  # longest context the model was trained on (RoPE table)
    data: Optional[DataArgs]  # the run's data config (None for an exported folder without lingua_wd.json)
    config: dict  # the run's whole resolved config ({} when unknown)
    step: int
    world_size: int
    source: str  # "checkpoint" | "hf"


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / "config.json").is_file()


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32", config: str = "") -> Loaded:
    """Our run / checkpoint dir (with its config) or an exported HF folder, in eval mode on `device`."""
    check_choice(dtype, "dtype", DTYPES)
    if is_hf_folder(path):
        return _load_hf(Path(path).expanduser(), device, DTYPES[dtype])
    run = open_run(path, config, key="path")
    model = build_transformer(run.model, consolidate(run.ckpt), device, DTYPES[dtype])
    tok = build_tokenizer(run.data.tokenizer)
    return Loaded(model, tok, run.model.max_seq_len, run.data, run.config, run.step, run.world_size, "checkpoint")


def _load_hf(path: Path, device, dtype: torch.dtype) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    tok = HFTokenizerAdapter(AutoTokenizer.from_pretrained(str(path)))
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    data = run_sections(meta["config"])[1] if "config" in meta else None
    return Loaded(
        lambda t: model(t).logits,
        tok,
        model.config.max_position_embeddings,
        data,
        meta.get("config", {}),
        int(meta.get("step", 0)),
        int(meta.get("world_size", 1)),
        "hf",
    )
