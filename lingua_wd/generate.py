"""Sample text: `python -m lingua_wd.generate PATH prompt="Once upon a time" [key=value ...]`.

PATH is a run dir, a checkpoint dir or an exported HF folder (lingua_wd.export). Temperature and
nucleus (top-p) sampling from a seeded generator, so the same seed gives the same text. Each new
token re-runs the model on the last max_seq_len tokens (no KV cache: simple and exact for the small
models this framework trains; use transformers' generate() on an exported folder for speed).
`prompt=` is taken verbatim (not parsed as YAML), so any text works.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from lingua_wd.args import check, check_choice, one_of, run_cli
from lingua_wd.inference import DEVICES, DTYPES, load_model, pick_device

log = logging.getLogger(__name__)


@dataclass
class GenerateArgs:
    path: str = ""  # a run dir, a checkpoint dir, or an exported HF folder
    prompt: str = ""  # text to continue, taken verbatim; BOS is put first as in training
    max_new_tokens: int = 64  # tokens sampled after the prompt
    temperature: float = 0.8  # softmax temperature (0 = greedy: always the most likely token)
    top_p: float = 0.95  # nucleus sampling: draw from the fewest top tokens holding this much probability (1 = all)
    num_samples: int = 1  # continuations of the prompt, sampled as one batch
    seed: int = 0  # sampling seed: the same seed (and model) gives the same text
    stop_at_eos: bool = True  # end a sample at the EOS token
    config: str = ""  # our checkpoints: the run's config.yaml ("" = found next to the checkpoint)
    device: str = one_of("auto", lambda: DEVICES)  # where to run (auto: cuda if available)
    dtype: str = one_of("fp32", lambda: DTYPES)  # weights and compute


def check_generate_args(args: GenerateArgs) -> None:
    check(bool(args.path), "path", "must be set (a run dir, a checkpoint dir or an exported folder)")
    check(args.max_new_tokens > 0, "max_new_tokens", f"must be positive, got {args.max_new_tokens}")
    check(args.temperature >= 0, "temperature", f"must be >= 0, got {args.temperature}")
    check(0 < args.top_p <= 1, "top_p", f"must be in (0, 1], got {args.top_p}")
    check(args.num_samples > 0, "num_samples", f"must be positive, got {args.num_samples}")
    check_choice(args.device, "device", DEVICES)
    check_choice(args.dtype, "dtype", DTYPES)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose probability reaches top_p (B, V)."""
    if top_p >= 1:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays (before = 0)
    return torch.zeros_like(probs).scatter(-1, idx, sorted_p)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids: list[int],
    max_new_tokens: int,
    max_seq_len: int,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    num_samples: int = 1,
    eos_id: Optional[int] = None,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """New token ids of each sample (without the prompt; cut before EOS when eos_id is given)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)  # (B, T)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = forward(tokens[:, -max_seq_len:])[:, -1]  # (B, V): the next token's
        nxt = sample_next(logits, temperature, top_p, gen)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if eos_id is not None:
            done |= nxt == eos_id
            if done.all():
                break
    out = []
    for row in tokens[:, len(prompt_ids) :].tolist():
        out.append(row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    return out


def generate_text(args: GenerateArgs) -> list[str]:
    """The prompt followed by each sampled continuation."""
    check_generate_args(args)
    device = pick_device(args.device)
    loaded = load_model(args.path, device, args.dtype, args.config)
    tok = loaded.tokenizer
    samples = generate(
        loaded.forward,
        tok.encode(args.prompt, bos=True, eos=False),
        args.max_new_tokens,
        loaded.max_seq_len,
        args.temperature,
        args.top_p,
        args.seed,
        args.num_samples,
        tok.eos_id if args.stop_at_eos else None,
        device,
    )
    return [args.prompt + tok.decode(ids) for ids in samples]


def _main(args: GenerateArgs) -> None:
    texts = generate_text(args)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(text)


USAGE = 'usage: python -m lingua_wd.generate PATH "prompt=TEXT" [key=value ...]   (or lingua-wd generate ...)'


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, GenerateArgs, _main, USAGE, __doc__, positional=("path",), verbatim=("prompt",))


if __name__ == "__main__":
    sys.exit(main())
