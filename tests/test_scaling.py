"""Width rules (SPEC §1-§2): parameter classes, the RULES table at m = 1, 4, 16, overrides, init."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lingua_wd.args import ConfigError
from lingua_wd.model import ModelArgs, Transformer
from lingua_wd.scaling import (
    WD_RULES,
    WIDTH_RULES,
    ScalingArgs,
    check_scaling_args,
    init_std_fn,
    param_classes,
    plan,
    rules,
    target_tau_iter,
    width_mult,
)

ETA, LAM = 8e-3, 0.1
ROOT = Path(__file__).resolve().parents[1]


def tiny(dim: int = 256) -> Transformer:
    return Transformer(ModelArgs(dim=dim, n_layers=2, head_dim=64, vocab_size=300, max_seq_len=32))


def mode_args(key: str, **kw) -> ScalingArgs:
    return ScalingArgs(**rules()[key], **kw)


def class_hparams(
    args: ScalingArgs, cls: str, m: float, lr: float, wd: float, tokens_per_step: int = 0, decoupled: bool = False
) -> tuple[float, float]:
    """(peak LR, weight decay) of one class at width multiplier m, from the width plan (d0 = 64)."""
    p = plan(replace(args, base_dim=64), round(64 * m), lr, wd, "decoupled" if decoupled else "torch", tokens_per_step)
    return p.classes[cls].lr, p.classes[cls].weight_decay


# SPEC §2, written out independently of RULES: (eta, lambda) of the width-scaled classes at width m
SPEC_MATRIX = {
    "sp": lambda m: (ETA, LAM),
    "none": lambda m: (ETA / m, 0.0),
    "standard": lambda m: (ETA / m, LAM),
    "independent": lambda m: (ETA / m, m * LAM),
    "sqrt": lambda m: (ETA / m, math.sqrt(m) * LAM),
    "sqrt_lr": lambda m: (ETA / math.sqrt(m), math.sqrt(m) * LAM),
}
# vector-like classes keep eta; their lambda: unchanged, except no WD (none) and lambda_1 = 0 ([001], sqrt)
SPEC_VECTOR_WD = {"sp": LAM, "none": 0.0, "standard": LAM, "independent": LAM, "sqrt": 0.0, "sqrt_lr": LAM}


def test_param_classes_of_the_llama_model():
    classes = param_classes(tiny(), ScalingArgs())
    assert classes["tok_embeddings.weight"] == "input"
    assert classes["output.weight"] == "output"
    assert classes["norm.weight"] == "gain"
    assert classes["layers.1.attention_norm.weight"] == classes["layers.0.ffn_norm.weight"] == "gain"
    for w in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2"):
        assert classes[f"layers.0.{w}.weight"] == "hidden"
    assert len(classes) == len(list(tiny().parameters()))


def test_first_match_wins_and_patterns_are_configurable():
    args = ScalingArgs(patterns=["output:layers.*.feed_forward.w2.*", *ScalingArgs().patterns])
    classes = param_classes(tiny(), args)
    assert classes["layers.0.feed_forward.w2.weight"] == "output"
    assert classes["layers.0.feed_forward.w1.weight"] == "hidden"


@pytest.mark.parametrize(
    "patterns, key, msg",
    [
        (["input:tok_embeddings.*", "gain:*norm.weight", "hidden:layers.*"], "scaling.patterns", "output.weight"),
        ([*ScalingArgs().patterns, "bias:*.bias"], "scaling.patterns.4", "matches no parameter"),
        (["nope:layers.*"], "scaling.patterns.0", "unknown class"),
        (["layers.*"], "scaling.patterns.0", "class:glob"),
    ],
)
def test_pattern_errors_name_the_key(patterns, key, msg):
    with pytest.raises(ConfigError) as err:
        param_classes(tiny(), ScalingArgs(patterns=patterns))
    assert str(err.value).startswith(key + ":") and msg in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("key", list(SPEC_MATRIX))
def test_rules_match_the_spec_table(key, m):
    args = mode_args(key)
    for cls in ("hidden", "output"):
        lr, wd = class_hparams(args, cls, m, ETA, LAM)
        assert (lr, wd) == pytest.approx(SPEC_MATRIX[key](m), rel=1e-12)
    for cls in ("input", "bias"):
        assert class_hparams(args, cls, m, ETA, LAM) == pytest.approx((ETA, SPEC_VECTOR_WD[key]))
    assert class_hparams(args, "gain", m, ETA, LAM) == (ETA, 0.0)  # no WD on gains by default


@pytest.mark.parametrize("m", [1, 4, 16])
def test_independent_keeps_eta_lambda_and_standard_does_not(m):
    lr, wd = class_hparams(mode_args("independent"), "hidden", m, ETA, LAM)
    assert lr * wd == pytest.approx(ETA * LAM)
    lr, wd = class_hparams(mode_args("standard"), "hidden", m, ETA, LAM)
    assert lr * wd == pytest.approx(ETA * LAM / m)


@pytest.mark.parametrize("m", [1, 4, 16])
def test_sp_changes_nothing(m):
    for cls in ("input", "hidden", "output", "bias"):
        assert class_hparams(mode_args("sp"), cls, m, ETA, LAM) == (ETA, LAM)


def test_sqrt_lr_keeps_decay_factor_and_init_ratio():
    # App. B.1: a = 1 - eta*lambda unchanged, rho_inf ~ sqrt(eta/lambda) scales like the 1/sqrt(m) init
    lr1, wd1 = class_hparams(mode_args("sqrt_lr"), "hidden", 1, ETA, LAM)
    lr16, wd16 = class_hparams(mode_args("sqrt_lr"), "hidden", 16, ETA, LAM)
    assert lr16 * wd16 == pytest.approx(lr1 * wd1)
    assert math.sqrt(lr16 / wd16) == pytest.approx(math.sqrt(lr1 / wd1) / 4)


def test_timescale_from_epochs_and_dataset_size():
    args = ScalingArgs(width="mup", wd="timescale", tau_epoch=0.5, dataset_tokens=10**9)
    tau = target_tau_iter(args, tokens_per_step=10**6)  # M = 1000 steps per epoch ([003] eq 8)
    assert tau == pytest.approx(500)
    for m in (1, 4, 16):
        lr, wd = class_hparams(args, "hidden", m, ETA, LAM, 10**6)
        assert lr == pytest.approx(ETA / m) and lr * wd == pytest.approx(1 / 500)  # [003] eq 9
        assert class_hparams(args, "hidden", m, ETA, LAM, 10**6, decoupled=True)[1] == pytest.approx(1 / 500)
    lr, wd = class_hparams(args, "input", 16, ETA, LAM, 10**6)
    assert lr == ETA and lr * wd == pytest.approx(1 / 500)
    with pytest.raises(ConfigError, match=r"^scaling\.tau_iter:"):
        target_tau_iter(ScalingArgs(width="mup", wd="timescale", tau_epoch=1.0), 10**6)


def test_paper_protocol_frozen_input_and_gain_lr():
    # App. G.2 / G.3.1: input and gains frozen at 1.6e-2; hidden and output eta_base / m; WD on all but gains
    args = ScalingArgs(width="mup", wd="independent", frozen_lr={"input": 1.6e-2, "gain": 1.6e-2})
    for m in (1, 4, 16):
        assert class_hparams(args, "input", m, ETA, LAM) == (1.6e-2, LAM)
        assert class_hparams(args, "gain", m, ETA, LAM) == (1.6e-2, 0.0)
        assert class_hparams(args, "hidden", m, ETA, LAM) == pytest.approx((ETA / m, m * LAM))
    frozen_out = ScalingArgs(width="mup", wd="independent", frozen_lr={"output": 1e-3})
    assert class_hparams(frozen_out, "output", 16, ETA, LAM) == (1e-3, LAM)  # frozen = not width-scaled


def test_decay_classes_and_frozen_wd_are_configurable():
    args = ScalingArgs(width="mup", wd="standard", decay_classes=["hidden", "gain"], frozen_wd={"gain": 0.01})
    assert class_hparams(args, "gain", 4, ETA, LAM) == (ETA, 0.01)
    assert class_hparams(args, "input", 4, ETA, LAM) == (ETA, 0.0)
    assert class_hparams(args, "output", 4, ETA, LAM) == (ETA / 4, 0.0)


def test_every_rule_row_cites_a_source():
    assert set(rules()) == {"sp", "none", "standard", "independent", "sqrt", "sqrt_lr", "timescale"}
    for rule in [*WIDTH_RULES.values(), *WD_RULES.values()]:
        assert "eq" in rule.source or "App." in rule.source or "[001]" in rule.source or "baseline" in rule.source


def test_width_mult():
    assert width_mult(ScalingArgs(base_dim=128), 2048) == 16
    assert width_mult(ScalingArgs(), 2048) == 1


def test_init_std_per_class_and_full_mup_output():
    margs = ModelArgs(dim=256, n_layers=2, head_dim=64, vocab_size=300, max_seq_len=32)
    model = Transformer(margs)
    p = dict(model.named_parameters())
    sp = init_std_fn(ScalingArgs(base_dim=64), margs.dim)
    assert sp("tok_embeddings.weight", p["tok_embeddings.weight"]) == pytest.approx(1 / 16)
    assert sp("layers.0.feed_forward.w2.weight", p["layers.0.feed_forward.w2.weight"]) == pytest.approx(
        1 / math.sqrt(768)
    )
    assert sp("output.weight", p["output.weight"]) == pytest.approx(1 / 16)
    assert sp("norm.weight", p["norm.weight"]) == 0.0
    mup = init_std_fn(ScalingArgs(base_dim=64, output_init="mup"), margs.dim)
    assert mup("output.weight", p["output.weight"]) == pytest.approx(1 / 16 / 2)  # 1/sqrt(C m) = sqrt(d0)/C
    same = init_std_fn(ScalingArgs(base_dim=256, output_init="mup"), margs.dim)
    assert same("output.weight", p["output.weight"]) == pytest.approx(1 / 16)  # equal to sp at the base width
    model.init_weights(mup, seed=0)
    assert float(model.output.weight.detach().std()) == pytest.approx(1 / 32, rel=0.05)
    assert float(model.layers[0].attention.wq.weight.detach().std()) == pytest.approx(1 / 16, rel=0.05)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"width": "muP"}, "scaling.width"),
        ({"width": "mup", "wd": "indep"}, "scaling.wd"),
        ({"wd": "independent"}, "scaling.wd"),  # needs width=mup
        ({"width": "mup", "wd": "timescale"}, "scaling.tau_iter"),
        ({"frozen_lr": {"embedding": 1e-2}}, "scaling.frozen_lr.embedding"),
        ({"decay_classes": ["gains"]}, "scaling.decay_classes"),
        ({"extra_warmup": "cosine"}, "scaling.extra_warmup"),
        ({"extra_warmup_frac": 0.0}, "scaling.extra_warmup_frac"),
        ({"output_init": "zero"}, "scaling.output_init"),
        ({"base_dim": -1}, "scaling.base_dim"),
    ],
)
def test_check_scaling_args_names_the_key(kw, key):
    with pytest.raises(ConfigError) as err:
        check_scaling_args(ScalingArgs(**kw))
    assert str(err.value).startswith(key + ":")


def test_config_overrides_reach_the_dataclass():
    cfg = OmegaConf.merge(
        OmegaConf.structured(ScalingArgs),
        OmegaConf.from_dotlist(["width=mup", "wd=independent", "frozen_lr.input=1.6e-2", "frozen_lr.gain=1.6e-2"]),
    )
    args = OmegaConf.to_object(cfg)
    check_scaling_args(args)
    assert args.frozen_lr == {"input": 1.6e-2, "gain": 1.6e-2}
    assert class_hparams(args, "hidden", 16, ETA, LAM) == pytest.approx((ETA / 16, 1.6))


# ----- the transfer command -----


def test_transfer_answers_the_users_question(tmp_path, capsys):
    from lingua_wd.transfer import main

    out, png = tmp_path / "t.yaml", tmp_path / "t.png"
    argv = ["optim.lr=8e-3", "optim.weight_decay=0.1", "model.dim=128", "steps=400"]
    assert main([*argv, "transfer.widths=[128,2048]", f"transfer.out={out}", f"transfer.plot={png}"]) == 0
    text = capsys.readouterr().out
    assert "d=2048 L=2 B=256 D=4.194e+08, 400 steps (m=16, m_L=1" in text and "scaling.wd=independent" in text
    res = yaml.safe_load(out.read_text())
    assert [t["dim"] for t in res["targets"]] == [128, 2048] and res["targets"][1]["width_mult"] == 16
    modes = res["targets"][1]["rules"]
    assert set(modes) == set(rules())
    hid = {k: v["classes"]["hidden"] for k, v in modes.items()}
    assert (hid["independent"]["lr"], hid["independent"]["weight_decay"]) == pytest.approx((5e-4, 1.6))
    assert hid["independent"]["eta_lambda"] == pytest.approx(8e-4) and hid["independent"]["tau_iter"] == pytest.approx(
        1250
    )
    assert hid["standard"]["eta_lambda"] == pytest.approx(5e-5)
    assert hid["standard"]["eq_rms"] == pytest.approx(math.sqrt(5e-4 / 0.2))
    assert hid["none"]["weight_decay"] == 0 and hid["none"]["eq_rms"] is None
    assert (hid["sp"]["lr"], hid["sp"]["weight_decay"]) == (8e-3, 0.1)
    assert hid["timescale"]["eta_lambda"] == pytest.approx(8e-4)  # keeps the base width's tau_iter
    assert hid["sqrt_lr"]["lr"] == pytest.approx(2e-3)
    for key, v in res["targets"][0]["rules"].items():  # at m = 1 only the WD switches differ
        assert v["classes"]["hidden"]["lr"] == 8e-3, key
    assert png.stat().st_size > 10_000


def test_transfer_reads_the_paper_config_and_reports_errors(tmp_path, capsys):
    from lingua_wd.transfer import main

    paper = str(ROOT / "configs" / "paper" / "llama.yaml")
    out = tmp_path / "t.yaml"
    assert main([paper, "scaling.dataset_tokens=20000000000", "transfer.widths=[2048]", f"transfer.out={out}"]) == 0
    ind = yaml.safe_load(out.read_text())["targets"][0]["rules"]["independent"]["classes"]
    assert ind["input"]["lr"] == 1.6e-2 and ind["gain"]["lr"] == 1.6e-2 and ind["gain"]["weight_decay"] == 0
    assert ind["hidden"]["tau_epoch"] == pytest.approx(1250 / (2e10 / 2**20))
    assert main(["optim.lrr=1"]) == 2
    assert capsys.readouterr().err.startswith("config error: optim.lrr")
    assert main(["model.dim=100"]) == 2  # the trainer refuses this width, so transfer does too
    assert capsys.readouterr().err.startswith("config error: model.dim: 100 is not divisible by model.head_dim=128")
    assert main(["scaling.wd_mode=independent"]) == 2
    assert capsys.readouterr().err.strip() == "config error: scaling.wd_mode: renamed to scaling.wd"


@pytest.mark.parametrize("variant", ["torch", "decoupled"])
def test_transfer_table_and_the_trainers_groups_are_one_plan(tmp_path, variant):
    """The transfer table at width d and the param_groups.json of a model of width d come from the same plan."""
    import json

    from lingua_wd.optim import OptimArgs, build_optimizer
    from lingua_wd.schedule import ScheduleArgs
    from lingua_wd.transfer import main

    wd = 0.1 if variant == "torch" else 1e-3
    keys = ["model.dim=64", "model.head_dim=64", "scaling.width=mup", "scaling.wd=timescale", "scaling.tau_epoch=2",
            "scaling.dataset_tokens=1000000", f"optim.lr={ETA}", f"optim.weight_decay={wd}", f"optim.variant={variant}",
            "data.seq_len=100", "data.batch_size=10", "data.micro_batch_size=5"]  # fmt: skip
    out = tmp_path / "t.yaml"
    assert main([*keys, "transfer.widths=[256]", "transfer.rules=[timescale]", f"transfer.out={out}"]) == 0
    table = yaml.safe_load(out.read_text())["targets"][0]["rules"]["timescale"]["classes"]
    scaling = ScalingArgs(width="mup", wd="timescale", base_dim=64, tau_epoch=2, dataset_tokens=10**6)
    optim = OptimArgs(lr=ETA, weight_decay=wd, variant=variant)
    build_optimizer(tiny(256), optim, scaling, ScheduleArgs(), 100, 1000, str(tmp_path))
    groups = {g["class"]: g for g in json.loads((tmp_path / "param_groups.json").read_text())["groups"]}
    for cls, g in groups.items():
        for col in ("lr", "weight_decay", "eta_lambda", "tau_iter", "tau_epoch", "eq_rms"):
            assert table[cls][col] == g[col], (cls, col)
    assert groups["hidden"]["tau_iter"] == pytest.approx(2 * 10**6 / 1000)  # tau_epoch * M ([003] eq 8)
