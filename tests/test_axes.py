"""Transfer beyond width: depth (CompleteP Table 1), batch size and training horizon as rows of the plan.

Every expected value below is written out by hand from the papers' tables, not computed by the code
under test: m_L = L / L0, kappa = B / B0, D / D0, each chosen so the powers are exact (4^-1/2 = 1/2).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import ROOT, read_metrics, run_train
from lingua_wd.args import ConfigError
from lingua_wd.model import ModelArgs, Transformer, block_params
from lingua_wd.scaling import (
    BATCH_RULES,
    DEPTH_RULES,
    HORIZON_RULES,
    RunShape,
    ScalingArgs,
    check_scaling_args,
    init_std_fn,
    plan,
    residual_mult,
)

ETA, LAM, EPS = 8e-3, 0.1, 1e-8
CLASSES = ("input", "hidden", "output", "gain", "bias")


def at(args: ScalingArgs, dim: int = 64, tokens_per_step: int = 1000, **shape) -> dict:
    """{class: (lr, weight_decay, eps)} of the plan at width dim and the given RunShape."""
    p = plan(args, dim, ETA, LAM, "torch", tokens_per_step, RunShape(**shape), EPS)
    return {c: (cp.lr, cp.weight_decay, cp.eps) for c, cp in p.classes.items()}


def base() -> dict:
    """The base run's values: vector-like and matrix-like keep (eta, lambda) under sp; gains get no WD."""
    return {c: (ETA, 0.0 if c == "gain" else LAM, EPS) for c in CLASSES}


# ----------------------------------------------------------------------------- depth: CompleteP Table 1

# Table 1 (alpha column), at m_L = 8 / 2 = 4: residual branches x m_L^-alpha; pre-LN gain, hidden weight and
# hidden bias LR x m_L^(alpha-1); AdamW eps of the residual blocks x m_L^-alpha; embedding, final norm and
# unembedding LR, every WD and every init unchanged. Written out for alpha = 1 and alpha = 1/2:
DEPTH_TABLE = {
    #            residual  LR factor of the block classes  eps factor of the block classes
    "none": (1.0, 1.0, 1.0),
    "depth_mup": (0.5, 0.5, 0.5),  # 4^-1/2 = 1/2, 4^(1/2 - 1) = 1/2, 4^-1/2 = 1/2
    "completep": (0.25, 1.0, 0.25),  # 4^-1 = 1/4, 4^0 = 1, 4^-1 = 1/4
}


@pytest.mark.parametrize("rule", list(DEPTH_TABLE))
def test_depth_rules_match_completep_table_1(rule):
    res, lr_f, eps_f = DEPTH_TABLE[rule]
    args = ScalingArgs(depth=rule, base_depth=2)
    assert residual_mult(args, 8) == res
    got, want = at(args, n_layers=8), base()
    for cls in ("hidden", "gain", "bias"):  # inside the residual blocks
        assert got[cls] == pytest.approx((ETA * lr_f, want[cls][1], EPS * eps_f), rel=1e-12), cls
    for cls in ("input", "output"):  # embedding and unembedding: no depth term
        assert got[cls] == want[cls], cls
    assert at(args, n_layers=2) == want  # at the base depth nothing changes, exactly
    stds = init_std_fn(args, 64)  # no depth term in any init variance
    w = torch.empty(192, 64)
    assert stds("layers.7.feed_forward.w1.weight", w) == 1 / 8  # 1/sqrt(fan_in 64), as at the base depth


def test_depth_composes_with_width_rules():
    """Table 1's alpha column is muP's column times the depth terms: hidden LR eta m_N^-1 m_L^(alpha-1), hidden
    WD lambda m_N (independent), eps m_L^-alpha (the width part of eps is not one of our width rules)."""
    args = ScalingArgs(width="mup", wd="independent", base_dim=32, depth="depth_mup", base_depth=4)
    got = at(args, dim=128, n_layers=16)  # m_N = 4, m_L = 4
    assert got["hidden"] == pytest.approx((ETA / 4 * 0.5, 4 * LAM, EPS * 0.5), rel=1e-12)
    assert got["output"] == pytest.approx((ETA / 4, 4 * LAM, EPS), rel=1e-12)
    assert got["input"] == pytest.approx((ETA, LAM, EPS), rel=1e-12)
    assert got["gain"] == pytest.approx((ETA * 0.5, 0.0, EPS * 0.5), rel=1e-12)


def test_every_axis_row_cites_a_source_and_the_tables_are_the_choices():
    for table in (DEPTH_RULES, BATCH_RULES, HORIZON_RULES):
        assert "none" in table and all(len(row.source) > 20 for row in table.values())
    assert set(DEPTH_RULES) == {"none", "depth_mup", "completep"}
    assert set(BATCH_RULES) == {"none", "sqrt", "timescale"}
    assert set(HORIZON_RULES) == {"none", "timescale"}


# ----------------------------------------------------------------------------- batch and horizon


def test_batch_rules_at_four_times_the_batch():
    """kappa = 32 / 8 = 4: sqrt (Malladi et al.) doubles every class's LR and keeps lambda; timescale (Power
    Lines, [003] eq 8) keeps eta and multiplies every decayed class's lambda by 4, so B/(eta lambda D) holds."""
    want = base()
    sqrt = at(ScalingArgs(batch="sqrt", base_batch=8), batch_size=32)
    assert sqrt == {c: pytest.approx((2 * ETA, want[c][1], EPS), rel=1e-12) for c in CLASSES}
    ts = at(ScalingArgs(batch="timescale", base_batch=8), batch_size=32)
    assert ts == {c: pytest.approx((ETA, 4 * want[c][1], EPS), rel=1e-12) for c in CLASSES}
    assert at(ScalingArgs(batch="none", base_batch=8), batch_size=32) == want
    # tau_epoch = B / (eta lambda D) of the hidden class, at a fixed token budget D = 1.6e6
    tau = {B: B / (lr * wd * 1.6e6) for B, (lr, wd, _) in ((8, want["hidden"]), (32, ts["hidden"]))}
    assert tau[32] == pytest.approx(tau[8], rel=1e-12)


def test_horizon_timescale_divides_lambda_by_the_token_ratio():
    """[003] §4.2: keep tau_epoch as the data grow: lambda ~ 1/D at fixed eta and B. D = steps x 1000 tokens:
    base 1e6 tokens, target 4e6 -> lambda / 4; the LR stays."""
    args = ScalingArgs(horizon="timescale", base_tokens=10**6)
    got, want = at(args, steps=4000), base()
    assert got == {c: pytest.approx((ETA, want[c][1] / 4, EPS), rel=1e-12) for c in CLASSES}
    assert at(replace(args, horizon="none"), steps=4000) == want
    assert at(args, steps=1000) == want


def test_all_axes_compose_as_one_product():
    """Width (mup/independent, m = 4), depth (completep, m_L = 4), batch (sqrt, kappa = 4), horizon (timescale,
    D / D0 = 2) on the hidden class: eta = ETA / 4 * 1 * 2, lambda = 4 LAM / 2, eps = EPS / 4."""
    args = ScalingArgs(width="mup", wd="independent", base_dim=16, depth="completep", base_depth=2, batch="sqrt",
                       base_batch=4, horizon="timescale", base_tokens=10**6)  # fmt: skip
    p = plan(args, 64, ETA, LAM, "torch", 1000, RunShape(n_layers=8, batch_size=16, steps=2000), EPS)
    h = p.classes["hidden"]
    assert (h.lr, h.weight_decay, h.eps) == pytest.approx((ETA / 2, 2 * LAM, EPS / 4), rel=1e-12)
    assert (h.lr_mult, h.wd_mult, h.eps_mult) == pytest.approx((0.5, 2.0, 0.25), rel=1e-12)
    assert p.residual_mult == 0.25
    a = p.axes
    assert (a.depth_mult, a.batch_mult, a.horizon_mult, a.tokens, a.base_tokens) == (4.0, 4.0, 2.0, 2 * 10**6, 10**6)


def test_block_params_counts_the_blocks():
    """N of the fitted law, by hand for d = 64, 2 blocks, head_dim 32, GQA with 1 kv head, SwiGLU 3d."""
    args = ModelArgs(dim=64, n_layers=2, head_dim=32, n_kv_heads=1, vocab_size=300, max_seq_len=16)
    per_block = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 192 + 2 * 64  # wq, wk, wv, wo, w1 w3 w2, 2 norms
    assert block_params(args) == 2 * per_block == 2 * 49280
    model = Transformer(args)
    assert block_params(args) == sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))


def test_fitted_timescale_law_sets_the_timescale_rule():
    """Power Lines: tau_epoch* = c (D/N)^k. c = 2, k = -0.5, D = 1e6 training tokens (1000 steps x 1000), N = 1e4:
    tau_epoch = 2 (100)^-0.5 = 0.2 epochs of 1000 steps -> tau_iter = 200; torch AdamW lambda = 1/(eta 200)."""
    args = ScalingArgs(wd="timescale", width="mup", tau_law=[2.0, -0.5])
    p = plan(args, 64, ETA, LAM, "torch", 1000, RunShape(n_layers=2, steps=1000, n_params=10**4), EPS)
    assert p.tau_iter_target == pytest.approx(200.0, rel=1e-12)
    h = p.classes["hidden"]
    assert h.weight_decay == pytest.approx(1 / (ETA * 200), rel=1e-12)
    assert h.tau_iter == pytest.approx(200.0, rel=1e-12) and h.tau_epoch == pytest.approx(0.2, rel=1e-12)


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"depth": "complete"}, "scaling.depth"),
        ({"base_depth": -1}, "scaling.base_depth"),
        ({"batch": "linear"}, "scaling.batch"),
        ({"base_batch": -8}, "scaling.base_batch"),
        ({"horizon": "sqrt"}, "scaling.horizon"),
        ({"base_tokens": -1}, "scaling.base_tokens"),
        ({"batch": "timescale", "width": "mup", "wd": "timescale", "tau_iter": 100.0}, "scaling.batch"),
        ({"horizon": "timescale", "width": "mup", "wd": "timescale", "tau_iter": 100.0}, "scaling.horizon"),
        ({"tau_law": [1.0, -0.5]}, "scaling.tau_law"),  # needs wd=timescale
        ({"width": "mup", "wd": "timescale", "tau_law": [1.0]}, "scaling.tau_law"),
        ({"width": "mup", "wd": "timescale", "tau_law": [-1.0, 0.5]}, "scaling.tau_law"),
        ({"width": "mup", "wd": "timescale", "tau_law": [1.0, 0.5], "tau_iter": 10.0}, "scaling.tau_law"),
    ],
)
def test_axis_errors_name_the_key(kw, key):
    with pytest.raises(ConfigError) as err:
        check_scaling_args(ScalingArgs(**kw))
    assert str(err.value).startswith(key), str(err.value)


def test_a_set_base_without_the_runs_value_fails_loudly():
    with pytest.raises(ValueError, match="scaling.base_depth"):
        plan(ScalingArgs(depth="completep", base_depth=2), 64, ETA, LAM)  # no RunShape: L unknown


# ----------------------------------------------------------------------------- the model's residual multiplier


@torch.no_grad()
def test_residual_mult_scales_each_branch_and_folds_into_wo_and_w2():
    """X + r MHA(LN(X)) and Z + r MLP(LN(Z)) equal a model at r = 1 whose wo and w2 are multiplied by r (what the
    HF export does); r = 1 leaves the forward untouched."""
    from transformers import LlamaForCausalLM

    from lingua_wd.hf import hf_config, to_hf_state_dict

    kw = {"dim": 64, "n_layers": 3, "head_dim": 32, "vocab_size": 100, "max_seq_len": 16}
    scaled = Transformer(ModelArgs(**kw, residual_mult=0.25))
    scaled.init_weights(seed=2)
    plain = Transformer(ModelArgs(**kw))
    sd = {k: v * 0.25 if k.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else v
          for k, v in scaled.state_dict().items()}  # fmt: skip
    plain.load_state_dict(sd)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = scaled(tokens)
    torch.testing.assert_close(plain(tokens), ours, rtol=1e-5, atol=1e-5)
    unscaled = Transformer(ModelArgs(**kw))
    unscaled.load_state_dict(scaled.state_dict())
    assert (unscaled(tokens) - ours).abs().max() > 1e-2  # the multiplier changes the function
    hf = LlamaForCausalLM(hf_config(scaled.args)).eval()
    hf.load_state_dict(to_hf_state_dict(scaled.state_dict(), scaled.args), strict=True)
    assert (hf(tokens).logits - ours).abs().max() < 1e-4


# ----------------------------------------------------------------------------- the trainer against a hand-built model

KEYS = ["config=configs/debug.yaml", "model.dim=64", "model.head_dim=32", "model.n_layers=4", "data.seq_len=32",
        "data.batch_size=8", "data.micro_batch_size=2", "data.workers=0", "steps=6", "log_freq=1", "eval_freq=0",
        "eval_batches=0", "checkpoint.every=0", "schedule.kind=constant", "schedule.warmup=0.0", "optim.lr=3e-3",
        "optim.eps=1e-3", "scaling.base_depth=2", "logging.wandb_mode=disabled"]  # fmt: skip
# completep at m_L = 4/2 = 2 by Table 1: residual x 1/2; LR x 2^0; eps x 1/2 in the blocks (hidden, gains)
# depth_mup at m_L = 2: residual x 2^-1/2; LR x 2^-1/2 in the blocks; eps x 2^-1/2 in the blocks
HAND = {
    "completep": {"residual": 0.5, "lr": 1.0, "eps": 0.5},
    "depth_mup": {"residual": 1 / math.sqrt(2), "lr": 1 / math.sqrt(2), "eps": 1 / math.sqrt(2)},
}


def hand_groups(model: Transformer, rule: dict) -> list[dict]:
    """The per-class hyperparameters set by hand: block linears (hidden) and norm gains (gain) get the depth
    terms; the embedding (input) and output keep 3e-3 / 1e-3; gains have no weight decay."""
    named = dict(model.named_parameters())
    block = rule["lr"] * 3e-3, rule["eps"] * 1e-3
    spec = {
        "input": (["tok_embeddings.weight"], 3e-3, 0.1, 1e-3),
        "output": (["output.weight"], 3e-3, 0.1, 1e-3),
        "hidden": ([n for n in named if n.startswith("layers.") and "norm" not in n], *block[:1], 0.1, block[1]),
        "gain": ([n for n in named if n.endswith("norm.weight")], block[0], 0.0, block[1]),
    }
    return [{"params": [named[n] for n in names], "lr": lr, "weight_decay": wd, "eps": eps}
            for names, lr, wd, eps in spec.values()]  # fmt: skip


def train_by_hand(rule: dict, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The trainer's loop written out: same init (sp stds, seed 0), same batches, 4 micro-batches, clip 1."""
    from lingua_wd.data import DataArgs, TrainLoader, build_tokenizer
    from lingua_wd.data.tokenizers import TokenizerArgs

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=4, head_dim=32, vocab_size=258, max_seq_len=32,
                                  residual_mult=rule["residual"]))  # fmt: skip
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(hand_groups(model, rule), betas=(0.9, 0.95))
    cfg = OmegaConf.load(ROOT / "configs" / "debug.yaml")
    data = DataArgs(seq_len=32, batch_size=8, micro_batch_size=2, workers=0,
                    tokenizer=TokenizerArgs(**cfg.get("data", {}).get("tokenizer", {})))  # fmt: skip
    loader = TrainLoader(data, build_tokenizer(data.tokenizer), 0, 1)
    losses = []
    for _ in range(steps):
        batch = loader.next_batch()
        total = 0.0
        for chunk in batch.chunk(4):
            loss = model(chunk[:, :-1], chunk[:, 1:]) / 4
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    loader.close()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow  # a trainer process and two hand-trained models: ~25-60 s on 2 shared cores
@pytest.mark.parametrize("depth", list(HAND))
def test_trainer_at_depth_equals_a_model_with_the_multipliers_set_by_hand(tmp_path, depth):
    from lingua_wd.checkpoint import consolidate, latest

    dump = tmp_path / depth
    run_train([*KEYS, f"scaling.depth={depth}", f"dump_dir={dump}"])
    got = [r["loss"] for r in read_metrics(dump) if "loss" in r]
    want, params = train_by_hand(HAND[depth], 6)
    assert got == pytest.approx(want, rel=1e-5, abs=0)
    trained = consolidate(latest(dump / "checkpoints"))
    for name, p in params.items():
        torch.testing.assert_close(trained[name], p, rtol=1e-4, atol=1e-6, msg=name)
    assert OmegaConf.load(dump / "config.yaml").model.residual_mult == pytest.approx(HAND[depth]["residual"])
    groups = {g["class"]: g for g in json.loads((dump / "param_groups.json").read_text())["groups"]}
    assert groups["hidden"]["eps"] == pytest.approx(1e-3 * HAND[depth]["eps"], rel=1e-12)
    # the hand model can tell: without the eps rule the weights end elsewhere
    wrong = train_by_hand({**HAND[depth], "eps": 1.0}, 6)[1]
    assert max((wrong[n] - params[n]).abs().max().item() for n in params) > 1e-3
    # eval / generate load the run with its multiplier (model.residual_mult in the saved config)
    from lingua_wd.inference import load_model

    hand = Transformer(ModelArgs(dim=64, n_layers=4, head_dim=32, vocab_size=258, max_seq_len=32,
                                 residual_mult=HAND[depth]["residual"]))  # fmt: skip
    hand.load_state_dict(params)
    tokens = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(dump).forward(tokens), hand(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_trainer_refuses_a_residual_mult_that_is_not_the_plans(tmp_path):
    proc = run_train([*KEYS, "scaling.depth=completep", "model.residual_mult=0.3", f"dump_dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: model.residual_mult: 0.3 differs")


# ----------------------------------------------------------------------------- coordinate check over depth


@pytest.mark.slow  # 6 small models x 3 steps: ~15 s on an idle CPU, more when it is shared
def test_depth_coordcheck_separates_completep_from_none(tmp_path):
    """The residual stream after the last block, its change since init and its change in the last step grow with
    depth without a depth rule (slope ~ +1 in log L) and stay flat under CompleteP (CompleteP Figure 7)."""
    from lingua_wd.cli import main as cli_main

    out = tmp_path / "cc"
    argv = ["axis=depth", "depths=[2,4,8]", "base_depth=2", "base_dim=32", "steps=3", "seeds=1", "seq_len=16",
            "batch_size=4", "vocab_size=64", "depth_rules=[none,completep]", f"out_dir={out}"]  # fmt: skip
    assert cli_main(["coordcheck", *argv]) == 0
    s = json.loads((out / "coordcheck.json").read_text())["slopes"]
    for metric in ("act_rms", "act_delta_rms", "update_rms"):
        assert s["none"][metric]["residual"] > 0.6, metric
        assert abs(s["completep"][metric]["residual"]) < 0.3, metric
    assert abs(s["completep"]["update_rms"]["hidden"]) < 0.1  # alpha = 1: the blocks' LR has no depth term
    assert (out / "coordcheck.png").stat().st_size > 10000
    assert cli_main(["coordcheck", "axis=depth", "depth_rules=[complete]"]) == 2


# ----------------------------------------------------------------------------- the transfer command


def run_transfer(tmp_path: Path, *argv: str) -> dict:
    from lingua_wd.transfer import main

    out = tmp_path / "t.yaml"
    assert main([*argv, "transfer.rules=[sp,independent]", f"transfer.out={out}"]) == 0
    return yaml.safe_load(out.read_text())


BASE = ["model.dim=64", "model.head_dim=32", "model.n_layers=2", "data.seq_len=100", "data.batch_size=16",
        "data.micro_batch_size=4", "steps=1000", "optim.lr=8e-3", "optim.weight_decay=0.1"]  # fmt: skip


def test_transfer_prints_every_class_at_depth_batch_and_token_targets(tmp_path, capsys):
    keys = [*BASE, "scaling.depth=completep", "scaling.batch=sqrt", "scaling.horizon=timescale"]
    res = run_transfer(tmp_path, *keys, "transfer.widths=[256]", "transfer.depths=[8]", "transfer.batches=[64]",
                       "transfer.tokens=[1600000,6400000]")  # fmt: skip
    text = capsys.readouterr().out
    assert "d=256 L=8 B=64 D=6.4e+06, 1000 steps (m=4, m_L=4, B/B0=4, D/D0=4; residual branches x0.25)" in text
    b = res["base"]
    assert (b["dim"], b["n_layers"], b["batch_size"], b["tokens"], b["depth"]) == (64, 2, 16, 1_600_000, "completep")
    same, longer = res["targets"]
    assert (same["steps"], longer["steps"], same["residual_mult"]) == (250, 1000, 0.25)  # D / (64 x 100)
    ind = longer["rules"]["independent"]["classes"]
    # eta: ETA / 4 (width) x 1 (completep) x 2 (sqrt of 4); lambda: 4 LAM (independent) / 4 (D x 4); eps / 4 in blocks
    assert (ind["hidden"]["lr"], ind["hidden"]["weight_decay"], ind["hidden"]["eps"]) == pytest.approx(
        (4e-3, 0.1, 2.5e-9)
    )
    assert ind["hidden"]["eta_lambda"] == pytest.approx(4e-4) and ind["hidden"]["tau_iter"] == pytest.approx(2500)
    assert ind["hidden"]["eq_rms"] == pytest.approx(math.sqrt(4e-3 / 0.2))
    assert (ind["input"]["lr"], ind["input"]["weight_decay"], ind["input"]["eps"]) == pytest.approx(
        (1.6e-2, 0.025, 1e-8)
    )
    assert (ind["gain"]["lr"], ind["gain"]["eps"], ind["gain"]["eps_mult"]) == pytest.approx((1.6e-2, 2.5e-9, 0.25))
    sp = same["rules"]["sp"]["classes"]["hidden"]  # D / D0 = 1: only the batch's sqrt(4) and the eps remain
    assert (sp["lr"], sp["weight_decay"], sp["lr_mult"], sp["wd_mult"]) == pytest.approx((1.6e-2, 0.1, 2.0, 1.0))
    assert "model.n_layers=8 data.batch_size=64 steps=250" in same["rules"]["sp"]["overrides"]
    assert "scaling.depth=completep scaling.base_depth=2" in same["rules"]["sp"]["overrides"]


def test_transfer_yaml_is_the_trainers_plan_at_the_target(tmp_path):
    from lingua_wd.optim import OptimArgs, build_optimizer
    from lingua_wd.schedule import ScheduleArgs

    res = run_transfer(tmp_path, *BASE, "scaling.depth=depth_mup", "scaling.batch=timescale",
                       "transfer.widths=[128]", "transfer.depths=[8]", "transfer.batches=[32]")  # fmt: skip
    table = res["targets"][0]["rules"]["independent"]["classes"]
    scaling = ScalingArgs(width="mup", wd="independent", base_dim=64, depth="depth_mup", base_depth=2,
                          batch="timescale", base_batch=16, base_tokens=1_600_000)  # fmt: skip
    model = Transformer(ModelArgs(dim=128, n_layers=8, head_dim=32, vocab_size=300, max_seq_len=100,
                                  residual_mult=0.5))  # fmt: skip
    optim = OptimArgs(lr=8e-3, weight_decay=0.1)
    build_optimizer(model, optim, scaling, ScheduleArgs(), 500, 3200, str(tmp_path), batch_size=32)
    groups = {g["class"]: g for g in json.loads((tmp_path / "param_groups.json").read_text())["groups"]}
    for cls, g in groups.items():
        for col in ("lr", "weight_decay", "eps", "eta_lambda", "tau_iter", "eq_rms"):
            assert table[cls][col] == g[col], (cls, col)
    assert groups["hidden"]["lr"] == pytest.approx(8e-3 / 2 / 2)  # m = 2, m_L^-1/2 = 1/2
    assert groups["hidden"]["weight_decay"] == pytest.approx(0.1 * 2 * 2)  # independent m, timescale kappa = 2


@pytest.mark.parametrize(
    ("argv", "err"),
    [
        (["transfer.batches=[10]"], "data.batch_size: 10 is not divisible by micro_batch_size"),
        (["transfer.tokens=[1000]"], "transfer.tokens: 1000 tokens are not a whole number of steps"),
        (["transfer.depths=[0]"], "transfer.depths: must be positive"),
        (["transfer.widths=[100]"], "model.dim: 100 is not divisible by model.head_dim=32"),
        (["scaling.depth=completep", "scaling.base_depth=-1"], "scaling.base_depth: must be >= 0"),
    ],
)
def test_transfer_refuses_targets_the_trainer_refuses(argv, err, capsys):
    from lingua_wd.transfer import main

    assert main([*BASE, *argv]) == 2
    line = capsys.readouterr().err.strip()
    assert err in line and "\n" not in line, line


# ----------------------------------------------------------------------------- the report along any axis


def write_fake_sweep(root: Path, line: str, values: list[int], base_key: str, base: int, shift: dict) -> Path:
    """A finished sweep without training: loss = 3 + 0.1 ln(lr / lr*)^2 with lr* = 1e-2 (value / base)^shift."""
    runs = []
    for v in values:
        for lr in (6.25e-4, 1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2):  # every optimum bracketed
            for rule, k in shift.items():
                name = f"{v}_{lr:g}_{rule}"
                d = root / "runs" / name
                d.mkdir(parents=True)
                cfg = OmegaConf.create({})
                for key, val in ((line, v), ("optim.lr", lr), ("scaling.depth", rule), (base_key, base)):
                    OmegaConf.update(cfg, key, val, force_add=True)
                OmegaConf.save(cfg, d / "config.yaml")
                loss = 3.0 + 0.1 * math.log(lr / (1e-2 * (v / base) ** k)) ** 2
                (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": loss}) + "\n")
                (d / "DONE").write_text("{}")
                runs.append({"name": name, "params": {line: v, "optim.lr": lr, "scaling.depth": rule},
                             "config": f"runs/{name}/config.yaml", "dump_dir": f"runs/{name}"})  # fmt: skip
    manifest = {"name": "fake", "runs": runs, "axis_keys": [[line], ["optim.lr"], ["scaling.depth"]]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_report_multiplier_is_line_over_the_runs_base_for_depth(tmp_path):
    from lingua_wd import report as rep
    from lingua_wd.sweep import ReportArgs

    sweep = write_fake_sweep(tmp_path / "s", "model.n_layers", [2, 4, 8], "scaling.base_depth", 1,
                             {"none": -1.0, "completep": 0.0})  # fmt: skip
    args = ReportArgs(line="model.n_layers", panel="scaling.depth", last_n=1)
    summary = rep.report(sweep, args)
    train = summary["metrics"]["train"]
    assert [ln["m"] for ln in train["none"]["lines"]] == [2.0, 4.0, 8.0]  # L / base_depth (1), not L / 2
    assert train["none"]["shift"]["slope"] == pytest.approx(-1.0, abs=1e-9)
    assert train["completep"]["shift"]["slope"] == pytest.approx(0.0, abs=1e-9)
    assert train["none"]["shift"]["verdict"] == "shifts with width"  # transfer_stats' words, the report's below
    md = (sweep / "report.md").read_text()
    assert "Multiplier m = model.n_layers / 1" in md and "shifts with depth" in md
    console = "\n".join(rep.console_lines(summary))  # the report's words follow the swept axis and key
    assert "none: shifts with depth" in console and "width" not in console
    assert rep.axis_words("optimum at the highest finished LR: eta* >= 3.2 at width 32", "data.batch_size",
                          "optim.weight_decay") == "optimum at the highest finished weight decay: lambda* >= 3.2 at batch size 32"  # fmt: skip
    steps = write_fake_sweep(tmp_path / "t", "steps", [100, 200, 400], "scaling.base_tokens", 10**6, {"none": 0.0})
    fit = rep.report(steps, ReportArgs(line="steps", panel="scaling.depth", last_n=1))["metrics"]["train"]["none"]
    assert [ln["m"] for ln in fit["lines"]] == [1.0, 2.0, 4.0]  # no base key for steps: the smallest value


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_shipped_axis_sweeps_validate():
    from lingua_wd import sweep as sw

    for name, n_runs in (("depth_cpu", 60), ("batch_cpu", 84), ("batch_wd_cpu", 36)):
        args = sw.load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml", ["dump_root=/tmp/never-written"])
        _, manifest = sw.prepare(args, ROOT / "configs" / "sweeps" / f"{name}.yaml", write=False)
        assert len(manifest["runs"]) == n_runs
