"""Alignment probes (lingua_wd/probes.py): each metric against an independent float64 recomputation,
eq 4 on logged values, 1/sqrt(C) at init, and probing leaves training bitwise unchanged (eager,
compiled in place, activation checkpointing). The 2-process FSDP2 check is in test_probes_fsdp.py.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import probe_reference
from lingua_wd import probes as probes_mod
from lingua_wd.args import ConfigError
from lingua_wd.model import ModelArgs, Transformer
from lingua_wd.probes import METRICS, ProbeArgs, _bmm_sq_norms, build_probes, stride_positions

VOCAB, T = 97, 16
ALL = list(METRICS)


def tiny(dim: int = 64, n_layers: int = 2, head_dim: int = 32, seed: int = 0) -> Transformer:
    model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, head_dim=head_dim, vocab_size=VOCAB, max_seq_len=T))
    model.init_weights(seed=seed)
    return model


def batches(n: int, b: int = 4, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, T + 1), generator=gen) for _ in range(n)]


def train(model, data, probes=None, lr=1e-2, wd=0.1, on_step=None):
    """A minimal trainer with the probe calls where lingua_wd.train makes them; returns (losses, metrics)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95))
    losses, metrics = [], []
    for step, batch in enumerate(data):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss.item())
        probing = probes is not None and probes.due(step)
        saved = on_step(model, inputs) if on_step else None
        if probing:
            probes.before_step(step, inputs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out = probes.after_step(step, opt) if probing else {}
        metrics.append((out, saved, opt))
    return losses, metrics


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def capture(fraction, start=0, stride=1):
    """An independent record of W_t (float64) and X (the probe slice's layer inputs at tokens
    start, start + stride, ...) before the step."""

    def on_step(model, inputs):
        n = max(1, math.ceil(fraction * inputs.shape[0]))
        xs, handles = {}, []

        def keep(name):
            def hook(mod, args, out):
                xs.setdefault(name, args[0][:, start::stride].clone())

            return hook

        for name, m in linears(model).items():
            handles.append(m.register_forward_hook(keep(name)))
        with torch.no_grad():
            model(inputs[:n])
        for h in handles:
            h.remove()
        w0 = {n_: m.weight.detach().double().clone() for n_, m in linears(model).items()}
        return w0, {k: v.double().reshape(-1, v.shape[-1]) for k, v in xs.items()}

    return on_step


@pytest.mark.parametrize("positions", [0, 5])
def test_metrics_match_float64_recomputation(positions):
    """Every logged metric of every linear, every step, equals the float64 recomputation (rel err < 1e-4),
    with X on every token (0) or on 5 of the 16 tokens (3, 6, ..., 15)."""
    model, data, frac, lr, wd = tiny(), batches(4), 0.5, 1e-2, 0.1
    args = ProbeArgs(every=1, layers=["all"], fraction=frac, positions=positions, metrics=ALL, power_iters=300)
    start, stride = stride_positions(T, positions)
    assert (start, stride) == ((0, 1) if positions == 0 else (3, 3))
    _, records = train(model, data, build_probes(args, model), lr=lr, wd=wd, on_step=capture(frac, start, stride))
    for step, (out, (w0, xs), _) in enumerate(records):
        w1s = {n: m.weight.detach().double() for n, m in linears(model).items()} if step == len(records) - 1 else None
        if w1s is None:
            w1s = records[step + 1][1][0]  # W_{t+1} is the next step's W_t
        for name in linears(model):
            ref = probe_reference(w0[name], w1s[name], xs[name], lr, wd)
            for metric in ALL:
                got = out[f"probe/{name}/{metric}"]
                assert got == pytest.approx(ref[metric], rel=1e-4), (step, name, metric, got, ref[metric])


def test_stride_positions():
    assert stride_positions(4096, 1024) == (3, 4)  # tokens 3, 7, ..., 4095
    assert stride_positions(4096, 0) == stride_positions(4096, 4096) == stride_positions(16, 99) == (0, 1)
    for t, p in [(4096, 1000), (17, 4), (100, 99), (5, 1)]:
        start, stride = stride_positions(t, p)
        kept = range(start, t, stride)
        assert len(kept) == p and kept[-1] == t - 1 and start > 0


def test_eq4_identity_and_medians():
    """RRC = alignment ratio x relative update (eq 4) on the logged floats; medians are per class."""
    model = tiny()
    probes = build_probes(ProbeArgs(every=1, layers=["layers.*.feed_forward.*", "output"]), model)
    _, records = train(model, batches(3), probes)
    for out, _, _ in records:
        layers = {k.split("/")[1] for k in out if not k.startswith("probe/median/")}
        assert layers == {f"layers.{i}.feed_forward.w{j}" for i in range(2) for j in (1, 2, 3)} | {"output"}
        for layer in layers:
            p = f"probe/{layer}/"
            assert out[p + "rrc"] == pytest.approx(out[p + "align_ratio"] * out[p + "rel_update"], rel=1e-12)
        hidden = sorted(out[f"probe/{lay}/rrc"] for lay in layers if lay != "output")
        assert out["probe/median/hidden/rrc"] == pytest.approx((hidden[2] + hidden[3]) / 2)
        assert out["probe/median/output/rrc"] == out["probe/output/rrc"]
        assert not any(k.startswith("probe/median/gain") for k in out)


def test_weight_alignment_at_init_is_one_over_sqrt_fan_in():
    model = Transformer(ModelArgs(dim=256, n_layers=2, head_dim=64, vocab_size=300, max_seq_len=32))
    model.init_weights(seed=3)
    probes = build_probes(ProbeArgs(every=1, layers=["all"], fraction=1.0), model)
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    probes.before_step(0, tokens)
    out = probes.after_step(0, torch.optim.AdamW(model.parameters(), lr=0.0))
    for name, m in linears(model).items():
        c = m.weight.shape[1]
        assert out[f"probe/{name}/weight_align"] == pytest.approx(1 / math.sqrt(c), rel=0.2), name
    assert "probe/output/rel_update" in out and out["probe/output/rel_update"] == 0.0  # lr 0: dW = 0 exactly
    assert "probe/output/update_align" not in out  # 0 / 0 is left out, never NaN


@pytest.mark.parametrize("mode", ["eager", "activation_checkpointing"])
def test_probing_does_not_change_training(mode):
    """Per-step losses and final weights bitwise equal with probes on and off; no RNG drawn."""
    data = batches(5)
    ref = tiny()
    ref.activation_checkpointing = mode == "activation_checkpointing"
    model = copy.deepcopy(ref)
    losses_off, _ = train(ref, data)
    rng = torch.get_rng_state()
    probes = build_probes(ProbeArgs(every=2, layers=["all"], metrics=ALL), model)
    losses_on, records = train(model, data, probes)
    assert torch.equal(torch.get_rng_state(), rng)
    assert losses_on == losses_off
    for (n, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert [bool(r[0]) for r in records] == [True, False, True, False, True]


def test_activation_checkpointing_gives_same_metrics():
    data = batches(2)
    outs = []
    for ac in (False, True):
        model = tiny()
        model.activation_checkpointing = ac
        probes = build_probes(ProbeArgs(every=1, layers=["all"]), model)
        outs.append(train(model, data, probes)[1][-1][0])
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert outs[1][k] == pytest.approx(outs[0][k], rel=1e-6), k


@pytest.mark.parametrize("ac", [False, True])
def test_compiled_blocks_no_recompile_and_same_training(ac):
    """Blocks compiled in place (block.compile()): the probe forward runs compiled (new graphs at the
    first probe, none after), losses are bitwise equal with probes on and off, with and without
    activation checkpointing, and the metrics match the eager model's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = batches(4)
    eager = tiny()
    compiled_off, compiled_on = copy.deepcopy(eager), copy.deepcopy(eager)
    for m in (compiled_off, compiled_on):
        m.activation_checkpointing = ac
        for block in m.layers:
            block.compile()
    losses_off, _ = train(compiled_off, data)
    graphs_off = counters["stats"]["unique_graphs"]
    assert graphs_off >= 1
    args = ProbeArgs(every=1, layers=["all"])
    seen = []
    losses_on, records = train(
        compiled_on,
        data,
        build_probes(args, compiled_on),
        on_step=lambda *_: seen.append(counters["stats"]["unique_graphs"]),
    )
    assert seen[1] > seen[0] and seen[1] == seen[-1] == counters["stats"]["unique_graphs"]  # compiled once, reused
    assert not counters["graph_break"]
    assert losses_on == losses_off
    _, eager_records = train(eager, data[:1], build_probes(args, eager))
    for k, v in eager_records[0][0].items():
        assert records[0][0][k] == pytest.approx(v, rel=1e-3), k


def test_layer_patterns_metrics_and_off():
    model = tiny()
    assert build_probes(ProbeArgs(), model) is None  # layers [] = off
    assert build_probes(ProbeArgs(every=0, layers=["all"]), model) is None
    probes = build_probes(ProbeArgs(layers=["layers.1.attention.wq"], metrics=["sigma_max", "rrc"]), model)
    assert list(probes.modules) == ["layers.1.attention.wq"]
    assert [probes.due(s) for s in (0, 1, 9, 10, 20)] == [True, False, False, True, True]
    _, records = train(model, batches(1), probes)
    assert set(records[0][0]) == {
        "probe/layers.1.attention.wq/sigma_max",
        "probe/layers.1.attention.wq/rrc",
        "probe/median/hidden/sigma_max",
        "probe/median/hidden/rrc",
    }
    every = build_probes(ProbeArgs(layers=["all"]), model)
    assert len(every.modules) == 2 * 7 + 1
    hooks = lambda: sum(len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = hooks()
    every.remove()
    assert hooks() == before - 15  # the capture hooks are gone: the model runs as without probes
    assert len(build_probes(ProbeArgs(layers=["all"], metrics=["sigma_max"]), model)._handles) == 0  # no X: no hooks
    assert len(build_probes(ProbeArgs(layers=["layers.*.attention.w?"]), model).modules) == 2 * 4


@pytest.mark.parametrize(
    "args, key",
    [
        (ProbeArgs(layers=["layers.13.feed_forward.w1"]), "probes.layers"),
        (ProbeArgs(layers=["all"], metrics=["rrc", "nope"]), "probes.metrics"),
        (ProbeArgs(layers=["all"], fraction=0.0), "probes.fraction"),
        (ProbeArgs(layers=["all"], every=-1), "probes.every"),
        (ProbeArgs(layers=["all"], power_iters=0), "probes.power_iters"),
    ],
)
def test_config_errors(args, key):
    with pytest.raises(ConfigError) as err:
        build_probes(args, tiny())
    msg = str(err.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg


def test_sigma_max_warm_start_converges():
    """A few power iterations per probe, each probe continuing from the last: on a fixed W with a
    known spectrum the estimate never decreases and ends far closer to sigma_1 than the cold start."""
    model = tiny()
    gen = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(192, 64, generator=gen, dtype=torch.float64))
    s = torch.cat([torch.tensor([1.05], dtype=torch.float64), torch.linspace(1.0, 0.1, 63, dtype=torch.float64)])
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight.copy_(u @ torch.diag(s) @ v.T)
    name = "layers.0.feed_forward.w2"
    probes = build_probes(ProbeArgs(every=1, layers=[name], metrics=["sigma_max"], power_iters=2), model)
    opt, tokens, est = torch.optim.AdamW(model.parameters(), lr=0.0), batches(1)[0], []
    for step in range(60):  # no optimizer step: W stays fixed
        probes.before_step(step, tokens)
        est.append(probes.after_step(step, opt)[f"probe/{name}/sigma_max"])
    assert all(b >= a - 1e-6 for a, b in zip(est, est[1:], strict=False))
    err = [1.05 - e for e in est]
    assert err[0] > 1e-5 and abs(err[-1]) < 1e-6


def test_bf16_norms_accumulate_in_fp32(monkeypatch):
    """bf16 X (mixed precision): ||X||^2 and the batched, chunked ||X W_l^T||^2 are summed in fp32."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 64, generator=gen).bfloat16()
    exact_x = x.double().square().sum()
    (norm,) = torch._foreach_norm([x], 2, dtype=torch.float32)  # what after_step uses for ||X||
    assert norm.dtype == torch.float32 and float(norm) ** 2 == pytest.approx(float(exact_x), rel=1e-4)
    assert float(torch.linalg.vector_norm(x)) ** 2 != pytest.approx(float(exact_x), rel=1e-4)  # bf16 result: worse
    ws = torch.randn(3, 200, 64, generator=gen)
    xs = [x, x.flip(0), x * 2]
    monkeypatch.setattr(probes_mod, "CHUNK", 100_000)  # forces chunks of layers and of rows of W
    got = _bmm_sq_norms(torch.stack(xs), ws)
    assert got.dtype == torch.float32
    for xl, wl, g in zip(xs, ws, got.tolist(), strict=True):
        exact = (xl.double() @ wl.bfloat16().double().T).square().sum()
        assert g == pytest.approx(float(exact), rel=1e-2)  # bf16 products, fp32 sums


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_trainer_one_config_line_and_plot(tmp_path, tiny):
    """As a user would: one config line turns the probes on; metrics.jsonl gets them in their own records at
    their own steps, and the training-loss lines (cadence and averages) are those of a run without probes."""
    from conftest import ROOT, read_metrics, run_train, start_train
    from lingua_wd.metrics import WALL_CLOCK_KEYS
    from lingua_wd.rundir import probe_records, train_records

    common = ["config=configs/debug.yaml", *tiny, "steps=12", "log_freq=4", "eval_freq=0", "checkpoint.every=0"]
    dump, plain = tmp_path / "run", tmp_path / "plain"
    plain_run = start_train([*common, f"dump_dir={plain}"])
    run_train([*common, f"dump_dir={dump}", "probes.layers=[layers.1.feed_forward.w1]", "probes.every=5"])
    plain_run.wait()
    recs = probe_records(read_metrics(dump))
    assert [r["step"] for r in recs] == [1, 6, 11]  # the trainer's steps 0, 5, 10, logged 1-based
    assert all("loss" not in r for r in recs)

    def strip(records):
        return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in train_records(records)]

    assert [r["step"] for r in train_records(read_metrics(dump))] == [4, 8, 12]
    assert strip(read_metrics(dump)) == strip(read_metrics(plain))
    for r in recs:
        p = "probe/layers.1.feed_forward.w1/"
        assert r[p + "rrc"] == pytest.approx(r[p + "align_ratio"] * r[p + "rel_update"], rel=1e-12)
        assert r["probe/median/hidden/rrc"] == r[p + "rrc"]
    assert recs[0][p + "weight_align"] == pytest.approx(1 / 8, rel=0.2)  # C = 64 at init
    out = tmp_path / "fig"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_alignment.py"), str(dump), "--out", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    for ext in ("png", "pdf"):
        assert (tmp_path / f"fig.{ext}").stat().st_size > 10_000


def test_bench_probes_script_runs_on_cpu():
    """scripts/bench_probes.py end to end on tiny CPU shapes (the trainer's train_step, probes off and on)."""
    from conftest import ROOT, env

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_probes.py"), "--cpu-smoke"], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| 64 |")]
    assert len(row) == 1 and "| 15 |" in row[0]  # 2 blocks x 7 linears + output probed


def test_probes_read_the_decay_each_group_applies():
    """eq_* use the decay per step the group's optimizer applies (scaling.group_decay), whatever the variant."""
    from lingua_wd.optim import DecoupledAdamW, OptimArgs, build_optimizer
    from lingua_wd.scaling import ScalingArgs
    from lingua_wd.schedule import ScheduleArgs

    model, name, lr, wd = tiny(), "layers.0.attention.wq", 1e-2, 1e-3
    optim = OptimArgs(lr=lr, weight_decay=wd, variant="decoupled")
    opt, sched = build_optimizer(model, optim, ScalingArgs(), ScheduleArgs(warmup_steps=4), 10, 4 * T)
    probes = build_probes(ProbeArgs(every=1, layers=[name], metrics=["eq_rel_update", "rel_update"]), model)
    for step, batch in enumerate(batches(3)):
        F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        probes.before_step(step, batch[:, :-1])
        opt.step()
        opt.zero_grad(set_to_none=True)
        d = wd * (opt.param_groups[1]["lr"] / lr)  # decoupled: lambda s_t, not eta_t lambda
        assert probes.after_step(step, opt)[f"probe/{name}/eq_rel_update"] == pytest.approx(
            math.sqrt(1 - (1 - d) ** 2), rel=1e-12
        )
        sched.step()
    w = nn.Parameter(torch.ones(2, 2))
    hand = DecoupledAdamW([{"params": [w], "lr": 2e-3, "initial_lr": 4e-3, "weight_decay": 0.5}], lr=2e-3)
    assert probes_mod._decays(hand, {"w": w}) == {"w": (2e-3, 0.25, 1.0)}  # a hand-made group decays decoupled
    plain = torch.optim.AdamW([w], lr=2e-3, weight_decay=0.5)
    assert probes_mod._decays(plain, {"w": w}) == {"w": (2e-3, 1e-3, 1.0)}  # PyTorch's AdamW: eta lambda


def test_probe_keys_round_trip():
    for layer in ("layers.13.feed_forward.w1", "output", "median/hidden"):
        assert probes_mod.parse_probe_key(probes_mod.probe_key(layer, "rrc")) == (layer, "rrc")
    assert probes_mod.median_key("hidden", "rrc") == "probe/median/hidden/rrc"
    assert probes_mod.parse_probe_key("loss") is None and probes_mod.parse_probe_key("probe/x") is None
    assert probes_mod.needs(["weight_rms"]) == frozenset() and probes_mod.needs(["rrc"]) == {"x", "dw"}
