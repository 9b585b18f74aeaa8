"""Interop: export to HF LlamaForCausalLM (logits, RoPE, config, tokenizer), eval and generate."""

import base64
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import lingua_wd.export
from conftest import ROOT, TINY, env, run_train
from lingua_wd.checkpoint import consolidate, open_run
from lingua_wd.data import DataArgs, build_tokenizer
from lingua_wd.data.tokenizers import TokenizerArgs
from lingua_wd.eval import EvalArgs, evaluate_path
from lingua_wd.export import ExportArgs, export
from lingua_wd.generate import GenerateArgs, generate, generate_text, sample_next, top_p_filter
from lingua_wd.hf import (
    bytes_to_unicode,
    export_tokenizer,
    from_hf_state_dict,
    hf_config,
    model_args_from_hf,
    to_hf_state_dict,
)
from lingua_wd.inference import build_transformer, load_model
from lingua_wd.model import ModelArgs, Transformer

TEXTS = ["def foo(x):\n    return x ** 2  # the thing", "héllo wörld → ∞ 12345 ok", "", "  leading  spaces\n\n\ttabs"]


def random_model(**kw) -> Transformer:
    args = ModelArgs(**{"dim": 128, "n_layers": 2, "head_dim": 32, "vocab_size": 300, "max_seq_len": 48, **kw})
    m = Transformer(args)
    m.init_weights(seed=1)
    return m.eval()


def hf_model(m: Transformer, sd=None) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(hf_config(m.args)).eval()
    hf.load_state_dict(sd if sd is not None else to_hf_state_dict(m.state_dict(), m.args), strict=True)
    return hf


@torch.no_grad()
def test_hf_logits_match_with_rope_permutation_and_gqa():
    m = random_model(n_kv_heads=2, rope_theta=500000.0, norm_eps=1e-6)  # 4 query heads, 2 kv heads
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = m(tokens)
    assert (ours - hf_model(m)(tokens).logits).abs().max() < 1e-4
    # the test can see the RoPE convention: Meta's row order in HF's rotate_half attention is wrong
    naive = {k: v for k, v in to_hf_state_dict(m.state_dict(), m.args).items()}
    for i in range(2):
        for meta, hf in (("wq", "q_proj"), ("wk", "k_proj")):
            naive[f"model.layers.{i}.self_attn.{hf}.weight"] = m.state_dict()[f"layers.{i}.attention.{meta}.weight"]
    assert (ours - hf_model(m, naive)(tokens).logits).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kw", [{}, {"n_kv_heads": 1, "rope_theta": 500000.0, "norm_eps": 1e-6, "ffn_mult": 4, "head_dim": 64}]
)
def test_config_and_state_dict_round_trip(tmp_path, kw):
    m = random_model(**kw)
    hf_config(m.args, 256, 257).save_pretrained(tmp_path)
    back = model_args_from_hf(AutoConfig.from_pretrained(tmp_path))
    assert back == m.args
    sd = m.state_dict()
    again = from_hf_state_dict(to_hf_state_dict(sd, m.args), m.args)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)


def tiny_tiktoken_file(path):
    """A tiktoken ranks file with real merges: a byte-level BPE trained on this repo's sources, whose
    ids (the 256 bytes, then each merge in the order it was learnt) are valid tiktoken ranks."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([p.read_text() for p in sorted((ROOT / "lingua_wd").glob("*.py"))], trainer)
    to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    ranks = [(bytes(to_byte[c] for c in piece), i) for piece, i in by_id]
    assert len(ranks) == 700 and sorted(len(t) for t, _ in ranks[:256]) == [1] * 256
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks))
    return str(path)


def tiny_hf_json(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 20 + ["the thing is the thing that returns"] * 20, trainer)
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("name", ["bytes", "hf", "tiktoken"])
def test_exported_tokenizer_encodes_as_ours(tmp_path, name):
    path = {
        "bytes": lambda: "",
        "hf": lambda: tiny_hf_json(tmp_path / "tok.json"),
        "tiktoken": lambda: tiny_tiktoken_file(tmp_path / "tok.model"),
    }[name]()
    data = DataArgs(tokenizer=TokenizerArgs(name=name, path=path))
    ours = build_tokenizer(data.tokenizer)
    bos, eos = export_tokenizer(data, tmp_path / "out", max_len=64)
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (bos, eos) == (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in TEXTS:
        ids = ours.encode(text, bos=True, eos=False)
        assert hf(text, verbose=False)["input_ids"] == ids, text  # BOS first, as every training document
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text
    if name == "tiktoken":  # many merges in play: the converted merges must reproduce tiktoken's choices
        source = (ROOT / "lingua_wd" / "model.py").read_text()
        assert hf(source, verbose=False)["input_ids"] == ours.encode(source, bos=True, eos=False)
        assert len(ours.encode(source)) < len(source.encode()) / 2


def test_top_p_and_greedy_sampling():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    assert torch.equal(top_p_filter(probs, 0.5), torch.tensor([[0.0, 0.6, 0.0], [0.0, 0.0, 0.5]]))
    assert torch.equal(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.6, 0.3], [0.25, 0.0, 0.5]]))  # ties: stable
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    assert torch.equal(sample_next(logits, 0.0, 0.9, gen), logits.argmax(-1))
    draws = torch.stack([sample_next(logits, 1.0, 0.3, gen) for _ in range(200)])
    for row in range(4):  # each sample lies in its row's nucleus
        p = torch.softmax(logits[row], -1)
        assert set(draws[:, row].tolist()) <= set(top_p_filter(p[None], 0.3)[0].nonzero().flatten().tolist())


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_generate_is_deterministic_given_a_seed():
    m = random_model()
    run = lambda seed, **kw: generate(m, [1, 2, 3], 20, 48, 1.0, 0.95, seed, num_samples=2, **kw)  # noqa: E731
    a = run(0)
    assert a == run(0) and a != run(1) and a[0] != a[1]
    assert all(len(s) == 20 for s in a)
    cut = run(0, eos_id=a[0][5])  # stops at that token (first occurrence), EOS itself dropped
    assert cut[0] == a[0][: a[0].index(a[0][5])]


def run_val(run):
    from lingua_wd.data import val_batches

    return val_batches(run.data, build_tokenizer(run.data.tokenizer), 0, 1, 1)


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    dump = tmp_path_factory.mktemp("export") / "run"
    run_train([f"dump_dir={dump}", *TINY, "steps=5"])
    return dump


@pytest.fixture(scope="module")
def exported1(run1):
    out = run1.parent / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "lingua_wd.export", str(run1), str(out)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: AutoModelForCausalLM logits match ours" in proc.stderr
    return out


@pytest.mark.slow  # a trainer process or several: see README, Tests
@torch.no_grad()
def test_trained_run_exports_and_hf_logits_match(run1, exported1):
    run = open_run(run1)
    ours = build_transformer(run.model, consolidate(run.ckpt))
    hf = AutoModelForCausalLM.from_pretrained(exported1)
    assert isinstance(hf, LlamaForCausalLM) and hf.dtype == torch.float32
    batch = next(iter(run_val(run)))[:, :-1]
    assert (ours(batch) - hf(batch).logits).abs().max() < 1e-4
    assert model_args_from_hf(hf.config) == run.model  # config round trip through config.json
    assert json.loads((exported1 / "lingua_wd.json").read_text())["step"] == 5


def test_eval_gives_the_trainers_final_val_loss(run1, exported1):
    done = json.loads((run1 / "DONE").read_text())
    ours = evaluate_path(EvalArgs(path=str(run1), device="cpu"))
    assert ours["step"] == 5 and ours["batches"] == 2 and ours["world"] == 1
    assert ours["val/loss"] == pytest.approx(done["val_loss"], abs=1e-5)
    assert evaluate_path(EvalArgs(path=str(exported1), device="cpu"))["val/loss"] == pytest.approx(
        done["val_loss"], abs=1e-4
    )
    bf16 = load_model(run1, "cpu", "bf16")
    assert bf16.forward.output.weight.dtype == torch.bfloat16 and bf16.forward.rope.dtype == torch.float32


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_generate_from_checkpoint_and_export(run1, exported1):
    args = GenerateArgs(
        path=str(run1), prompt="def ", max_new_tokens=12, temperature=1.0, num_samples=2, seed=3, device="cpu"
    )
    a = generate_text(args)
    assert a == generate_text(args) and all(t.startswith("def ") for t in a)
    args.seed = 4
    assert generate_text(args) != a
    greedy = GenerateArgs(
        path=str(run1), prompt="import os\n", max_new_tokens=12, temperature=0.0, stop_at_eos=False, device="cpu"
    )
    ours = generate_text(greedy)
    greedy.path = str(exported1)
    assert generate_text(greedy) == ours


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_two_rank_checkpoint_exports(tmp_path):
    dump = tmp_path / "run2"
    run_train([f"dump_dir={dump}", *TINY, "steps=5"], nproc=2)
    run = open_run(dump / "checkpoints" / f"{5:010d}")  # one checkpoint dir also works
    assert run.world_size == 2 and len(list(run.ckpt.glob("*.distcp"))) == 2
    out = export(ExportArgs(ckpt_dir=str(run.ckpt), out_dir=str(tmp_path / "hf"), dtype="bf16"))
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    full = consolidate(run.ckpt)
    assert all(full[k].shape == p.shape for k, p in random_model(**vars(run.model)).state_dict().items())
    # the 2-shard consolidation is right: the trainer's 2-rank validation loss comes out again
    done = json.loads((dump / "DONE").read_text())
    got = evaluate_path(EvalArgs(path=str(dump), device="cpu"))
    assert got["world"] == 2 and got["val/loss"] == pytest.approx(done["val_loss"], abs=1e-5)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert lingua_wd.export.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("config error: ckpt_dir: no complete checkpoint")
    assert lingua_wd.export.main(["ckpt_dir=x", "out_dir=y", "dtype=int8"]) == 2
    assert capsys.readouterr().err.startswith("config error: dtype:")


@pytest.mark.gpu
def test_cuda_run_exports_evaluates_and_generates(tmp_path):
    dump = tmp_path / "cuda"
    run_train([f"dump_dir={dump}", *TINY, "steps=5", "distributed.device=cuda"])
    out = export(ExportArgs(ckpt_dir=str(dump), out_dir=str(tmp_path / "hf")))  # verify=True compares logits
    done = json.loads((dump / "DONE").read_text())
    for path in (dump, out):  # the trainer computed in bf16 (FSDP mixed precision)
        got = evaluate_path(EvalArgs(path=str(path), device="cuda", dtype="bf16"))
        assert got["val/loss"] == pytest.approx(done["val_loss"], abs=3e-2)
    args = GenerateArgs(path=str(out), prompt="def ", max_new_tokens=8, temperature=1.0, seed=0, device="cuda")
    assert generate_text(args) == generate_text(args)
