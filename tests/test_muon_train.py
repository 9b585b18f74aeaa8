"""optim.variant=muon end to end: Muon's rows of the width plan by hand, the optimizer the plan builds, the
probes on Muon groups against a float64 recomputation, and the real trainer (apps/train.py) with Muon:
2 gloo ranks against one process, exact resume after kill -9 and after SIGTERM on 2 ranks, and a falling
loss on the debug config. tests/test_muon.py tests the optimizer itself (Newton-Schulz, FSDP2, DCP)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT, launch, losses, probe_reference, read_metrics, run_train, start_train
from lingua_wd.args import ConfigError
from lingua_wd.checkpoint import list_checkpoints
from lingua_wd.model import ModelArgs, Transformer
from lingua_wd.muon import ADJUST_LR, CombinedOptimizer, Muon
from lingua_wd.optim import OptimArgs, build_optimizer, check_optim_args, muon_spec
from lingua_wd.probes import METRICS, ProbeArgs, build_probes
from lingua_wd.scaling import (
    DECAY_RULES,
    MUON_RULES,
    MuonSpec,
    ScalingArgs,
    group_decay,
    group_update_rms,
    muon_update_rms,
    plan,
)
from lingua_wd.schedule import ScheduleArgs

ETA, LAM, D0 = 3e-3, 0.1, 128


def muon_plan(wd: str, adjust: str, dim: int = 512, width: str = "mup", lr: float = 0.0, **kw):
    args = ScalingArgs(width=width, wd=wd, base_dim=D0, **kw)
    return plan(args, dim, ETA, LAM, "muon", 1000, muon=MuonSpec(("hidden",), adjust, lr))


# ----- the width plan's Muon rows, by hand (d0 = 128, d = 512: m = 4) -----


@pytest.mark.parametrize(
    "wd,adjust,eta,lam",
    [
        # original / none: ||dW||_2 ~ eta s does not grow with m, so the spectral condition keeps eta
        ("standard", "original", 3e-3, 0.1),
        ("independent", "original", 3e-3, 0.1),  # eta constant: independent = standard
        ("none", "original", 3e-3, 0.0),
        ("standard", "none", 3e-3, 0.1),
        # match_rms_adamw: s = 0.2 sqrt(max(out, in)) grows as sqrt(m) = 2, so eta / 2
        ("standard", "match_rms_adamw", 1.5e-3, 0.1),
        ("independent", "match_rms_adamw", 1.5e-3, 0.2),  # keeps eta lambda = 3e-4
        ("timescale", "match_rms_adamw", 1.5e-3, 1 / (1.5e-3 * 1000)),  # lambda = 1 / (eta tau_iter)
    ],
)
def test_muon_width_rule_values_by_hand(wd, adjust, eta, lam):
    p = muon_plan(wd, adjust, tau_iter=1000.0 if wd == "timescale" else 0.0)
    hid, out = p.classes["hidden"], p.classes["output"]
    assert (hid.lr, hid.weight_decay) == pytest.approx((eta, lam), rel=1e-12)
    assert hid.optimizer == "muon" and hid.decay_rule == "muon" and hid.adjust_lr == adjust
    assert hid.decay == pytest.approx(eta * lam, rel=1e-12)  # Muon's decoupled decay: eta_t lambda per step
    r = 0.2 if adjust == "match_rms_adamw" else 1 / math.sqrt(512)  # update RMS per unit LR on a 512 x 512 matrix
    assert hid.update_rms == pytest.approx(r, rel=1e-12)
    if lam:
        assert hid.eq_rms == pytest.approx(r * eta / math.sqrt(2 * eta * lam), rel=1e-12)  # eq 33 with r
    # the output layer stays on AdamW with muP-Adam's eta / m
    assert out.optimizer == "adamw" and out.decay_rule == "torch" and out.lr == pytest.approx(ETA / 4)
    assert p.header()["muon_classes"] == ["hidden"] and p.header()["variant"] == "muon"


def test_sp_and_muon_lr_and_frozen_classes():
    for adjust in ADJUST_LR:  # sp scales nothing with width, Muon classes included
        hid = muon_plan("standard", adjust, width="sp").classes["hidden"]
        assert (hid.lr, hid.weight_decay) == (ETA, LAM)
    hid = muon_plan("independent", "original", lr=0.02).classes["hidden"]  # optim.muon_lr: Muon's own eta_base
    assert (hid.lr, hid.weight_decay) == (0.02, 0.1)
    hid = muon_plan("independent", "match_rms_adamw", lr=0.02).classes["hidden"]
    assert (hid.lr, hid.weight_decay) == pytest.approx((0.01, 0.2))
    hid = muon_plan("independent", "match_rms_adamw", frozen_lr={"hidden": 5e-3}).classes["hidden"]
    assert (hid.lr, hid.weight_decay) == (5e-3, 0.1)  # frozen: not width-scaled, as for AdamW classes


@pytest.mark.parametrize("adjust", list(ADJUST_LR))
def test_muon_rules_follow_the_spectral_condition(adjust):
    """eta(m) s(m out, m in) (~ ||dW||_2 of an orthogonal update) stays constant in m for every hidden shape
    (the fan ratio is fixed), so ||dW||_2 = Theta(sqrt(fan_out / fan_in)) (Yang, Simon & Bernstein 2023)."""
    s, exp = ADJUST_LR[adjust], MUON_RULES[adjust].lr_exp
    for out_, in_ in [(128, 128), (384, 128), (128, 384)]:
        norms = [m**exp * s(m * out_, m * in_) for m in (1, 2, 4, 16)]
        assert norms == pytest.approx([norms[0]] * 4, rel=1e-12), (adjust, out_, in_)


def test_muon_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^scaling\.wd: sqrt has no Muon form"):
        muon_plan("sqrt", "original")
    with pytest.raises(ConfigError, match=r"^scaling\.wd: sqrt_lr has no Muon form"):
        muon_plan("sqrt_lr", "original")
    for kw, key in [({"muon_classes": ["hiden"]}, "optim.muon_classes"), ({"muon_classes": []}, "optim.muon_classes"),
                    ({"muon_adjust_lr": "x"}, "optim.muon_adjust_lr"), ({"muon_momentum": 1.0}, "optim.muon_momentum"),
                    ({"muon_ns_steps": 0}, "optim.muon_ns_steps"), ({"muon_lr": -1.0}, "optim.muon_lr"),
                    ({"muon_ns_dtype": "fp8"}, "optim.muon_ns_dtype")]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^{key}:"):
            check_optim_args(OptimArgs(variant="muon", **kw))
    model = tiny()
    with pytest.raises(ConfigError, match=r"^optim\.muon_classes: gain: .* Muon takes 2-D weights only"):
        build_optimizer(model, OptimArgs(variant="muon", muon_classes=["hidden", "gain"]), ScalingArgs(),
                        ScheduleArgs(), 10, 100)  # fmt: skip
    assert muon_spec(OptimArgs()) is None and muon_spec(OptimArgs(variant="muon")) == MuonSpec(
        ("hidden",), "match_rms_adamw", 0.0
    )


def test_transfer_table_is_the_trainers_muon_plan(tmp_path, capsys):
    from lingua_wd.transfer import main

    out, png = tmp_path / "t.yaml", tmp_path / "t.png"
    keys = ["optim.variant=muon", f"optim.lr={ETA}", f"optim.weight_decay={LAM}", "model.dim=64", "model.head_dim=32"]
    assert main([*keys, "transfer.widths=[256]", f"transfer.out={out}", f"transfer.plot={png}"]) == 0
    assert "Muon on hidden (eta_base=0.003, adjust_lr=match_rms_adamw)" in capsys.readouterr().out
    res = yaml.safe_load(out.read_text())
    rules = res["targets"][0]["rules"]
    assert set(rules) == {"sp", "none", "standard", "independent", "timescale"}  # sqrt, sqrt_lr: no Muon form
    table = rules["independent"]["classes"]
    assert table["hidden"]["class"] == "hidden/muon" and table["hidden"]["update_rms"] == pytest.approx(0.2)
    assert (table["hidden"]["lr"], table["hidden"]["weight_decay"]) == pytest.approx((ETA / 2, 2 * LAM))  # m = 4
    assert png.stat().st_size > 10_000
    scaling = ScalingArgs(width="mup", wd="independent", base_dim=64)
    build_optimizer(tiny(256), OptimArgs(variant="muon", lr=ETA, weight_decay=LAM), scaling, ScheduleArgs(), 100,
                    1000, str(tmp_path))  # fmt: skip
    groups = {g["class"]: g for g in json.loads((tmp_path / "param_groups.json").read_text())["groups"]}
    for cls, g in groups.items():
        for col in ("lr", "weight_decay", "eta_lambda", "tau_iter", "eq_rms"):
            assert table[cls][col] == g[col], (cls, col)


def test_the_comparison_sweep_validates(tmp_path, capsys):
    """configs/sweeps/muon_alignment.yaml (docs/probes.md, "AdamW vs Muon"): its 4 runs pass the trainer's checks."""
    from lingua_wd.sweep import main

    assert main([str(ROOT / "configs/sweeps/muon_alignment.yaml"), f"dump_root={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("d128_torch", "d128_muon", "d256_torch", "d256_muon"))


# ----- the optimizer the plan builds, and the probes on it -----

VOCAB, T = 97, 16


def tiny(dim: int = 64, seed: int = 0) -> Transformer:
    model = Transformer(ModelArgs(dim=dim, n_layers=2, head_dim=32, vocab_size=VOCAB, max_seq_len=T))
    model.init_weights(seed=seed)
    return model


def test_build_optimizer_splits_by_class_and_writes_the_plan(tmp_path):
    model = tiny()
    optim = OptimArgs(variant="muon", lr=1e-2, muon_adjust_lr="original", muon_momentum=0.9, muon_ns_steps=4)
    scaling = ScalingArgs(width="mup", wd="independent", base_dim=32)
    opt, sched = build_optimizer(model, optim, scaling, ScheduleArgs(warmup_steps=2), 10, 100, str(tmp_path))
    assert isinstance(opt, CombinedOptimizer)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    assert [g["class"] for g in opt.param_groups] == ["input", "output", "gain", "hidden"]  # AdamW's, then Muon's
    (hid,) = muon.param_groups
    assert hid["name"] == "hidden/independent/muon" and hid["momentum"] == 0.9 and hid["ns_steps"] == 4
    assert hid["initial_lr"] == 1e-2 and hid["weight_decay"] == 0.1  # original: eta stays at m = 2
    warnings.simplefilter("ignore", UserWarning)  # the scheduler stepped without an optimizer step, on purpose
    for _ in range(3):  # the decay the probes read: eta_t lambda at the scheduled LR (warmup: 5e-3, then 1e-2)
        assert group_decay(hid) == pytest.approx(hid["lr"] * 0.1) and 0 < hid["lr"] <= 1e-2
        sched.step()
    assert group_update_rms(hid, (192, 64)) == pytest.approx(1 / 8)  # original: 1/sqrt(fan_in) = 1/sqrt(64)
    assert group_update_rms(opt.param_groups[1], (VOCAB, 64)) == 1.0  # AdamW
    pg = json.loads((tmp_path / "param_groups.json").read_text())
    assert pg["variant"] == "muon" and pg["muon_classes"] == ["hidden"] and pg["muon_adjust_lr"] == "original"
    rows = {g["class"]: g for g in pg["groups"]}
    assert rows["hidden"]["optimizer"] == "muon" and "optimizer" not in rows["output"]
    assert rows["output"]["lr"] == pytest.approx(5e-3)  # AdamW's muP: eta / m
    w2 = next(p for p in pg["params"] if p["name"] == "layers.0.feed_forward.w2.weight")
    assert w2["update_rms"] == pytest.approx(1 / math.sqrt(192))  # per shape: fan_in 3d


def _keeper(xs: dict, name: str):
    def hook(module, args, output) -> None:
        xs.setdefault(name, args[0].double().flatten(0, 1))

    return hook


def probe_muon_run(lanczos_steps: int, steps: int = 4):
    """A few Muon + AdamW steps of the plan's optimizer with every linear probed; yields per step the
    metrics, W_t, W_{t+1}, X (float64) and each layer's group."""
    model = tiny()
    optim = OptimArgs(variant="muon", lr=2e-2, muon_adjust_lr="original")
    opt, sched = build_optimizer(model, optim, ScalingArgs(), ScheduleArgs(warmup_steps=0), 10, 100)
    args = ProbeArgs(every=1, layers=["all"], fraction=1.0, positions=0, metrics=list(METRICS), power_iters=300,
                     lanczos_steps=lanczos_steps)  # fmt: skip
    probes = build_probes(args, model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    owner = {id(p): g for g in opt.param_groups for p in g["params"]}
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = torch.randint(0, VOCAB, (2, T + 1), generator=gen)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
        xs, hooks = {}, []
        for n, m in linears.items():
            hooks.append(m.register_forward_hook(_keeper(xs, n)))
        with torch.no_grad():
            model(inputs)
        for h in hooks:
            h.remove()
        w0 = {n: m.weight.detach().double().clone() for n, m in linears.items()}
        groups = {n: dict(owner[id(m.weight)]) for n, m in linears.items()}  # this step's lr
        probes.before_step(step, inputs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out = probes.after_step(step, opt)
        sched.step()
        yield out, w0, {n: m.weight.detach().double() for n, m in linears.items()}, xs, groups


def test_probes_on_muon_groups_match_float64():
    """Every metric of every linear under Muon + AdamW equals its float64 recomputation, update_srank's
    ||dW||_2 against the SVD (Lanczos over the whole Krylov space: 64 steps = C), eq_weight_rms with Muon's r."""
    seen_muon = False
    for out, w0, w1, xs, groups in probe_muon_run(lanczos_steps=64):
        for n in w0:
            g = groups[n]
            r = group_update_rms(g, w0[n].shape)
            ref = probe_reference(w0[n], w1[n], xs[n], g["lr"], g["weight_decay"], r)
            for metric in METRICS:
                got = out[f"probe/{n}/{metric}"]
                assert got == pytest.approx(ref[metric], rel=1e-4), (n, metric, got, ref[metric])
            if g.get("optimizer") == "muon":
                seen_muon = True
                assert r != 1.0 and g["decay_rule"] == "muon" and DECAY_RULES["muon"].per_step(1e-2, 0.1, 1) == 1e-3
                # orthogonalized: the ~rank(G) <= 32 tokens singular values are ~1 (in [0.68, 1.2]), so the
                # stable rank is near min(K, C, 32) (measured 15.8 .. 39: momentum and decay add directions)
                assert out[f"probe/{n}/update_srank"] > 0.4 * min(*w0[n].shape, 2 * T)
    assert seen_muon


def test_update_srank_default_lanczos_steps_within_two_percent():
    """With the default 16 Lanczos steps (warm-started), Muon's nearly flat update spectrum still gives the
    stable rank within 2% (measured here: 1.5% max; on d = 128 over 60 steps: 0.2% mean, 1.6% max)."""
    errs = []
    for out, w0, w1, _, _ in probe_muon_run(lanczos_steps=ProbeArgs().lanczos_steps, steps=6):
        for n in w0:
            dw = w1[n] - w0[n]
            ref = float(dw.norm() ** 2 / torch.linalg.svdvals(dw)[0] ** 2)
            errs.append(out[f"probe/{n}/update_srank"] / ref - 1)
    assert min(errs) > -1e-5 and max(errs) < 0.02  # a lower bound of ||dW||_2: the stable rank is never under


# ----- the real trainer -----

MUON = ["optim.variant=muon", "optim.lr=1e-2", "scaling.width=mup", "scaling.wd=independent", "scaling.base_dim=32",
        "probes.every=3", "probes.layers=[layers.1.feed_forward.w1,layers.0.attention.wo,output]",
        "probes.metrics=[rel_update,update_align,eq_weight_rms,update_srank,sigma_max]"]  # fmt: skip


def _consolidate_all(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model and optimizer state) at its global size, in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt))
    meta = reader.read_metadata().state_dict_metadata
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
            if isinstance(m, TensorStorageMetadata)}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, storage_reader=reader, no_dist=True)
    return flat


def _probe_records(dump: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("probe/") or k == "step"} for r in read_metrics(dump)]


def _wait(cond, proc, timeout=300):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def muon_runs(tmp_path_factory) -> dict[str, Path]:
    """The same Muon run on 1 process and on 2 gloo ranks (12 steps, logged every step, probes every 3)."""
    root = tmp_path_factory.mktemp("muon")
    common = ["config=configs/debug.yaml", "model.dim=64", "model.head_dim=32", "data.seq_len=32",
              "data.batch_size=8", "data.micro_batch_size=2", "eval_batches=0", "steps=12", "log_freq=1",
              "checkpoint.every=0", *MUON]  # fmt: skip
    runs = {"one": root / "one", "two": root / "two"}
    one = start_train([f"dump_dir={runs['one']}", *common])
    run_train([f"dump_dir={runs['two']}", *common], nproc=2)
    one.wait()
    runs["common"] = common  # type: ignore[assignment]
    return runs


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_through_the_trainer(muon_runs):
    one, two = muon_runs["one"], muon_runs["two"]
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, 13))
    assert [l2[s] for s in l1] == pytest.approx(list(l1.values()), rel=1e-6)  # measured max rel diff 1.1e-7
    p1, p2 = _probe_records(one), _probe_records(two)
    keys = [k for r in p1 for k in r if k != "step"]
    assert any("update_srank" in k for k in keys) and any("layers.1.feed_forward.w1" in k for k in keys)
    for a, b in zip(p1, p2, strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-4), k  # measured max rel diff 2.3e-6
    s1, s2 = (_consolidate_all(list_checkpoints(d / "checkpoints")[-1]) for d in (one, two))
    bufs = [k for k in s1 if k.endswith("momentum_buffer")]
    assert len(bufs) == 14 and all(s1[k].abs().max() > 0 for k in bufs)  # 7 hidden matrices x 2 blocks on Muon
    assert s1.keys() == s2.keys()
    for k, v in s1.items():  # weights and optimizer state (measured: <= 8.4e-7 of each tensor's max)
        if not v.is_floating_point():
            continue
        diff = (s2[k] - v).abs()
        if k == "model.tok_embeddings.weight":  # AdamW on rows of rare tokens: m / sqrt(v) with v near eps^2
            assert (diff > 1e-6).float().mean() < 1e-3 and diff.max() < 2e-4 * v.abs().max(), k  # measured: 1 of
            continue  # 16,512 elements off by 7e-5 of the max (the same happens to AdamW alone)
        assert diff.max() <= 1e-5 * v.abs().max() + 1e-9, (k, diff.max())
    pg = json.loads((one / "param_groups.json").read_text())
    assert {g["name"]: g.get("optimizer", "adamw") for g in pg["groups"]} == {
        "input/independent": "adamw", "hidden/independent/muon": "muon", "output/independent": "adamw",
        "gain/independent": "adamw"}  # fmt: skip


@pytest.mark.slow
def test_sigterm_on_two_ranks_resumes_bitwise_with_muon(muon_runs, tmp_path):
    dump = tmp_path / "term"
    proc = launch([f"dump_dir={dump}", *muon_runs["common"]], nproc=2)
    _wait(lambda: (dump / "metrics.jsonl").exists() and max(losses(dump), default=0) >= 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: torchrun and both workers get it
    proc.wait(timeout=120)
    stopped = int(list_checkpoints(dump / "checkpoints")[-1].name)
    assert 4 <= stopped < 12
    run_train([f"dump_dir={dump}", *muon_runs["common"]], nproc=2)
    ref = muon_runs["two"]
    assert losses(dump) == losses(ref)  # bitwise
    assert _probe_records(dump) == _probe_records(ref)  # the probes' warm-start vectors came back too


@pytest.mark.slow
def test_kill9_resumes_bitwise_with_muon(muon_runs, tmp_path):
    dump = tmp_path / "killed"
    common = [*muon_runs["common"], "checkpoint.every=2", "checkpoint.keep=2"]
    proc = launch([f"dump_dir={dump}", *common])
    _wait(lambda: any(int(p.name) >= 4 for p in list_checkpoints(dump / "checkpoints")), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(losses(dump)) < 12
    run_train([f"dump_dir={dump}", *common])
    ref = muon_runs["one"]
    assert losses(dump) == losses(ref)
    assert _probe_records(dump) == _probe_records(ref)


@pytest.mark.slow
def test_loss_falls_on_the_debug_config_with_muon(tmp_path):
    dump = tmp_path / "debug"
    run_train(["config=configs/debug.yaml", f"dump_dir={dump}", "optim.variant=muon", "log_freq=1", "eval_freq=0"])
    loss = list(losses(dump).values())
    assert len(loss) == 40
    assert sum(loss[-5:]) / 5 < 0.65 * sum(loss[:3]) / 3, loss  # measured: see docs/scaling.md
    hidden = next(g for g in json.loads((dump / "param_groups.json").read_text())["groups"] if g["class"] == "hidden")
    assert hidden["optimizer"] == "muon" and hidden["adjust_lr"] == "match_rms_adamw"
    assert hidden["update_rms"] == pytest.approx(0.2)
    assert muon_update_rms("match_rms_adamw", 384, 128) == pytest.approx(0.2)
    assert replace(OptimArgs(), variant="muon").muon_classes == ["hidden"]
