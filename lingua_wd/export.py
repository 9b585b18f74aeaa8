"""Export a checkpoint to a Hugging Face `LlamaForCausalLM` folder and check it loads back as ours.

`python -m lingua_wd.export CKPT_DIR OUT_DIR [dtype=bf16] [verify=false]` consolidates the DCP shards
of any number of ranks (no process group needed; lingua_wd.checkpoint), renames Meta's parameter names
to HF's and permutes the wq / wk rows from Meta's interleaved-pair RoPE to HF's rotate_half convention
(lingua_wd.hf), and writes config.json, model*.safetensors, the tokenizer (tokenizer.json +
tokenizer_config.json) and lingua_wd.json (the run's config, step and rank count). The model applies
no multiplier to logits (muP here is layer-wise LR plus init, SPEC §1: `scaling.output_init` only
changes the init); the residual-branch multiplier of a depth rule (model.residual_mult) is folded into
wo and w2 (lingua_wd.hf). `verify` reloads the folder with `AutoModelForCausalLM` and compares its
logits with ours, so a multiplier that export does not fold fails loudly. docs/interop.md is the user guide.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lingua_wd.args import check, check_choice, one_of, run_cli
from lingua_wd.checkpoint import consolidate, open_run
from lingua_wd.data import build_tokenizer
from lingua_wd.hf import META_FILE, export_tokenizer, hf_config, to_hf_state_dict
from lingua_wd.inference import DTYPES, build_transformer
from lingua_wd.model import Transformer

log = logging.getLogger(__name__)
VERIFY_TEXT = "def main():\n    return 'héllo, wörld' # 42 → ∞\n"  # the tokenizer check: ASCII, Latin-1, symbols


@dataclass
class ExportArgs:
    ckpt_dir: str = ""  # a run dir (its latest checkpoint), its checkpoints/ dir, or one checkpoints/<step> dir
    out_dir: str = ""  # the HF folder to write (created; files of the same name are replaced)
    config: str = ""  # the run's config.yaml ("" = the checkpoint's own copy, else <run dir>/config.yaml)
    dtype: str = one_of("fp32", lambda: DTYPES)  # weight dtype in the export
    max_shard_size: str = "5GB"  # largest safetensors file; bigger models are split with an index
    verify: bool = True  # reload OUT_DIR with AutoModelForCausalLM / AutoTokenizer and compare with ours


def check_export_args(args: ExportArgs) -> None:
    check(bool(args.ckpt_dir), "ckpt_dir", "must be set (a run dir or a checkpoint dir)")
    check(bool(args.out_dir), "out_dir", "must be set")
    check_choice(args.dtype, "dtype", DTYPES)


def export(args: ExportArgs) -> Path:
    """Write the HF folder; returns its path."""
    from transformers import LlamaForCausalLM

    check_export_args(args)
    run = open_run(args.ckpt_dir, args.config)
    out = Path(args.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s (step %d, %d ranks) to %s", run.ckpt, run.step, run.world_size, out)
    sd = consolidate(run.ckpt)
    bos, eos = export_tokenizer(run.data, out, run.model.max_seq_len)
    config = hf_config(run.model, bos, eos, DTYPES[args.dtype])
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf_sd = {k: v.to(DTYPES[args.dtype]) for k, v in to_hf_state_dict(sd, run.model).items()}
    hf.load_state_dict(hf_sd, strict=True, assign=True)  # strict: every HF weight is ours, no extra
    hf.save_pretrained(str(out), max_shard_size=args.max_shard_size)
    _add_legacy_rope_theta(out / "config.json", run.model.rope_theta)
    meta = {"source": str(run.ckpt.resolve()), "step": run.step, "world_size": run.world_size, "config": run.config}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    if args.verify:
        ref = {k: v.to(DTYPES[args.dtype]).float() for k, v in sd.items()}  # what the export holds
        diff = verify_export(out, build_transformer(run.model, ref), build_tokenizer(run.data.tokenizer))
        log.info("verified: AutoModelForCausalLM logits match ours (max abs diff %.2e), tokenizer matches", diff)
    log.info("wrote %s", out)
    return out


def _add_legacy_rope_theta(path: Path, theta: float) -> None:
    """transformers >= 5 writes RoPE's base inside rope_parameters; older readers look for rope_theta."""
    cfg = json.loads(path.read_text())
    cfg.setdefault("rope_theta", theta)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def verify_export(out_dir: Path, ours: Transformer, tokenizer, tol: float = 1e-4) -> float:
    """Reload the folder as a new user would and compare with our model: logits on random tokens
    (max abs diff, fp32, scaled by the logits' size) and the tokenizer's ids on VERIFY_TEXT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ours.args.vocab_size, (2, min(64, ours.args.max_seq_len)), generator=gen)
    a, b = ours(tokens), hf(tokens).logits
    diff = (a - b).abs().max().item()
    if diff > tol * max(1.0, a.abs().max().item()):
        raise RuntimeError(f"export: HF logits differ from ours by {diff:.3e} (is there an unfolded multiplier?)")
    hf_ids = AutoTokenizer.from_pretrained(str(out_dir))(VERIFY_TEXT, verbose=False)["input_ids"]
    if hf_ids != tokenizer.encode(VERIFY_TEXT, bos=True, eos=False):
        raise RuntimeError("export: the exported tokenizer does not encode text as the run's tokenizer does")
    return diff


def _main(args: ExportArgs) -> None:
    check_export_args(args)
    export(args)


USAGE = "usage: python -m lingua_wd.export CKPT_DIR OUT_DIR [key=value ...]   (or lingua-wd export ...)"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, ExportArgs, _main, USAGE, __doc__, positional=("ckpt_dir", "out_dir"))


if __name__ == "__main__":
    sys.exit(main())
