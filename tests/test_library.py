"""The public API (lingua_wd/library.py) on a plain MLP, a small CNN and the project's LLaMA: each against a
group table computed by hand from the formulas (muP + independent WD at m = 4), shape-based classification
against the patterns, convolution probes against float64 references from torch.nn.functional.unfold, a
1x1 convolution's probe equal to its linear's, and the docs' plain loop run as a user would (acceptance).
The 2-process FSDP2 check on the CNN is in test_probes_fsdp.py.
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT
from lingua_wd import library as lw
from lingua_wd.args import ConfigError
from lingua_wd.model import ModelArgs, Transformer
from lingua_wd.probes import METRICS
from lingua_wd.scaling import ScalingArgs, init_std_fn
from lingua_wd.schedule import ScheduleArgs

ETA, LAM, BASE, M = 1e-2, 0.1, 16, 4  # base (eta, lambda) at width 16, models at width 64: m = 4
SCALING = ScalingArgs(width="mup", wd="independent", base_dim=BASE)


def expected(cls: str, fan_in: int, init_std: float) -> dict:
    """One row by the formulas, not by the code under test (SPEC §1-2, App. G.2-G.3): muP divides the LR of
    hidden and output by m (App. G.2), independent WD multiplies their lambda by m (eq 8); input, bias and gain
    keep eta, gains take no weight decay (App. G.3)."""
    lr = ETA / M if cls in ("hidden", "output") else ETA
    wd = {"hidden": LAM * M, "output": LAM * M, "input": LAM, "bias": LAM, "gain": 0.0}[cls]
    return {"class": cls, "fan_in": fan_in, "lr": lr, "weight_decay": wd, "init_std": init_std}


def vec(cls: str) -> dict:
    return expected(cls, 1, 0.0)


def assert_table(rows: list[dict], want: dict[str, dict]) -> None:
    assert [r["name"] for r in rows] == list(want)
    for r in rows:
        w = want[r["name"]]
        assert (r["class"], r["fan_in"]) == (w["class"], w["fan_in"]), r["name"]
        got = [r[k] for k in ("lr", "weight_decay", "init_std")]
        assert got == pytest.approx([w[k] for k in ("lr", "weight_decay", "init_std")], rel=1e-12), r["name"]


# ----------------------------------------------------------------------------- the models


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, 5)
    )


MLP_TABLE = {
    "0.weight": expected("input", 20, 1 / math.sqrt(20)),  # a dense input: 1/sqrt(fan_in), fan_in fixed
    "0.bias": vec("bias"),
    "2.weight": expected("hidden", 64, 1 / 8),
    "2.bias": vec("bias"),
    "3.weight": vec("gain"),
    "3.bias": vec("bias"),
    "5.weight": expected("output", 64, 1 / 8),
    "5.bias": vec("bias"),
}
MLP_PATTERNS = ["input:0.weight", "output:5.weight", "gain:3.weight", "bias:*.bias", "hidden:*"]


class CNN(nn.Module):
    """A stem, a strided 3x3, a 1x1, a Conv1d over the flattened positions, a linear head."""

    def __init__(self, width: int, norm: str = "batch"):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width) if norm == "batch" else nn.GroupNorm(4, width)
        self.conv = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.proj = nn.Conv2d(width, 2 * width, 1)
        self.seq = nn.Conv1d(2 * width, width, 3, padding=1)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 3, H, W)
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.proj(F.relu(self.conv(h))))  # (B, 2w, H/2, W/2)
        h = F.relu(self.seq(h.flatten(2)))  # (B, w, HW/4)
        return self.head(h.mean(2))


CNN_TABLE = {  # width 64 = 4 x 16: fan-in C_in prod(kernel)
    "stem.weight": expected("input", 3 * 9, 1 / math.sqrt(27)),
    "stem.bias": vec("bias"),
    "bn.weight": vec("gain"),
    "bn.bias": vec("bias"),
    "conv.weight": expected("hidden", 64 * 9, 1 / 24),
    "proj.weight": expected("hidden", 64, 1 / 8),
    "proj.bias": vec("bias"),
    "seq.weight": expected("hidden", 128 * 3, 1 / math.sqrt(384)),
    "seq.bias": vec("bias"),
    "head.weight": expected("output", 64, 1 / 8),
    "head.bias": vec("bias"),
}


def llama(dim: int) -> Transformer:
    return Transformer(ModelArgs(dim=dim, n_layers=1, head_dim=16, vocab_size=97, max_seq_len=16))


LLAMA_TABLE = {
    "tok_embeddings.weight": expected("input", 97, 1 / 8),  # one-hot input of 97; std 1/sqrt(d) (App. G.3)
    **{f"layers.0.attention.{w}.weight": expected("hidden", 64, 1 / 8) for w in ("wq", "wk", "wv", "wo")},
    "layers.0.feed_forward.w1.weight": expected("hidden", 64, 1 / 8),
    "layers.0.feed_forward.w3.weight": expected("hidden", 64, 1 / 8),
    "layers.0.feed_forward.w2.weight": expected("hidden", 3 * 64, 1 / math.sqrt(192)),
    "layers.0.attention_norm.weight": vec("gain"),
    "layers.0.ffn_norm.weight": vec("gain"),
    "norm.weight": vec("gain"),
    "output.weight": expected("output", 64, 1 / 8),
}
MODELS = {"mlp": (mlp, MLP_TABLE), "cnn": (CNN, CNN_TABLE), "llama": (llama, LLAMA_TABLE)}


def the_plan(**kw):
    return lw.plan(SCALING, dim=64, lr=ETA, weight_decay=LAM, **kw)


# ----------------------------------------------------------------------------- classes and groups


@pytest.mark.parametrize("name", list(MODELS))
def test_group_table_by_hand(name):
    build, want = MODELS[name]
    model = build(64)
    classes = lw.classify(model, base=build(BASE))
    plan = the_plan()
    assert_table(lw.table(model, plan, classes), want)
    out = io.StringIO()
    groups = lw.param_groups(model, plan, classes, print_table=True, file=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["name", "class", "shape", "fan_in", "lr", "weight_decay", "init_std"]
    assert [line.split()[0] for line in lines[1:]] == list(want)  # every parameter, in model order
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    for g in groups:  # each group's hyperparameters are its class's row
        row = next(v for v in want.values() if v["class"] == g["class"])
        assert (g["lr"], g["initial_lr"], g["weight_decay"]) == pytest.approx(
            (row["lr"], row["lr"], row["weight_decay"])
        )
    torch.optim.AdamW(groups)  # plain torch takes them


def test_llama_shape_classes_equal_the_patterns():
    model = llama(64)
    with torch.device("meta"):
        base = llama(BASE)
    assert lw.classify(model, base=base) == lw.classify(model)  # default patterns = scaling.patterns'
    assert lw.classify(model, base={n: p.shape for n, p in base.named_parameters()}) == lw.classify(model)


def test_mlp_shape_classes_equal_the_patterns():
    model = mlp(64)
    assert lw.classify(model, base=mlp(BASE)) == lw.classify(model, patterns=MLP_PATTERNS)


def test_patterns_override_shapes_for_unusual_layers():
    """mup#48: a learned positional embedding kept as a bare (1, T, d) parameter reads as an output layer by its
    shape (fan-in T x d grows); one pattern puts it with the inputs. A router (d -> experts) is an output."""

    class Net(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 8, d))
            self.router = nn.Linear(d, 4, bias=False)
            self.body = nn.Linear(d, d)

    by_shape = lw.classify(Net(64), base=Net(16))
    assert by_shape == {"pos": "output", "router.weight": "output", "body.weight": "hidden", "body.bias": "bias"}
    assert lw.classify(Net(64), patterns=["input:pos"], base=Net(16))["pos"] == "input"


def test_classify_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no parameter differs in shape"):
        lw.classify(mlp(64), base=mlp(64))
    with pytest.raises(ConfigError, match="'5.weight' is not in the base"):
        lw.classify(mlp(64), base={n: p.shape for n, p in mlp(16).named_parameters() if n != "5.weight"})
    with pytest.raises(ConfigError, match="scaling.patterns: parameter '2.weight' matches no pattern"):
        lw.classify(mlp(64), patterns=MLP_PATTERNS[:-1])
    with pytest.raises(ConfigError, match="matches no parameter"):
        lw.classify(mlp(64), patterns=["gain:nothing*"], base=mlp(16))
    groups = lw.param_groups(mlp(64), the_plan(), lw.classify(mlp(64), base=mlp(16)))
    with pytest.raises(ConfigError, match="variant: 'decoupled', but the groups were planned for"):
        lw.make_optimizer(groups, "decoupled")


def test_reinit_by_the_plan():
    model = CNN(64)
    classes = lw.classify(model, base=CNN(BASE))
    lw.reinit(model, the_plan(), classes, seed=1)
    for name, p in model.named_parameters():
        want = CNN_TABLE[name]
        if want["class"] == "gain":
            assert torch.equal(p, torch.ones_like(p))
        elif want["class"] == "bias":
            assert torch.equal(p, torch.zeros_like(p))
        else:  # >= 1728 draws: the sample std within 6% of the plan's
            assert p.std().item() == pytest.approx(want["init_std"], rel=0.06), name


def test_reinit_is_the_trainers_init_on_the_llama():
    """One implementation: lw.reinit and Transformer.init_weights(scaling.init_std_fn) give the same bits."""
    a, b = llama(64), llama(64)
    lw.reinit(a, the_plan(), lw.classify(a), seed=3)
    b.init_weights(init_std_fn(SCALING, 64), seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_scheduler_and_variants():
    model = mlp(64)
    classes = lw.classify(model, base=mlp(BASE))
    plan = lw.plan(ScalingArgs(width="mup", wd="independent", base_dim=BASE, extra_warmup="exp",
                               extra_warmup_classes=["hidden"]), dim=64, lr=ETA, weight_decay=LAM, steps=10)  # fmt: skip
    opt = lw.make_optimizer(lw.param_groups(model, plan, classes), "torch")
    sched = lw.scheduler(opt, plan, ScheduleArgs(warmup_steps=4), steps=10)
    ratios = []
    for step in range(10):
        lrs = {g["class"]: g["lr"] for g in opt.param_groups}
        assert lrs["input"] == pytest.approx(ETA * min((step + 1) / 4, 1 - (step - 4) / 6))  # warmup, decay
        ratios.append(lrs["hidden"] / lrs["input"])
        opt.step()  # no gradients: nothing moves
        sched.step()
    assert ratios[0] < 0.5 / M and ratios == sorted(ratios)  # eq 14: x 1/m -> 1 over T_W = 5 steps, hidden only
    assert ratios[5:] == pytest.approx([1 / M] * 5)
    with pytest.raises(ConfigError, match="steps"):
        lw.scheduler(opt, plan)
    dec = lw.plan(SCALING, dim=64, lr=ETA, weight_decay=LAM, variant="decoupled")
    opt = lw.make_optimizer(lw.param_groups(model, dec, classes), "decoupled")
    assert type(opt).__name__ == "DecoupledAdamW"


# ----------------------------------------------------------------------------- convolution probes


def patches_1d(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """The receptive fields of a Conv1d by explicit indexing (not unfold): (B * L, C_in * k)."""
    (p,), (s,), (d,), (k,) = conv.padding, conv.stride, conv.dilation, conv.kernel_size
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, (p, p), mode=mode)
    L = (xp.shape[-1] - d * (k - 1) - 1) // s + 1
    idx = torch.arange(L)[:, None] * s + torch.arange(k)[None, :] * d  # (L, k)
    cols = xp[:, :, idx]  # (B, C, L, k)
    return cols.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * k)


def patches_2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """torch.nn.functional.unfold's patches (after the conv's own padding mode): (B * L, C_in * kh * kw)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode.replace("zeros", "constant"))
        pad = 0
    else:
        pad = conv.padding
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


CONVS = {
    "2d": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2),
    "2d_same_reflect": lambda: nn.Conv2d(4, 6, (3, 2), padding="same", padding_mode="reflect"),
    "1d": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2),
    "1d_circular": lambda: nn.Conv1d(4, 6, 5, padding=2, padding_mode="circular"),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_probes_match_float64_unfold(kind):
    torch.manual_seed(0)
    conv = CONVS[kind]()
    model = nn.Sequential(conv)
    x = torch.randn(3, 4, 9, 9) if "2d" in kind else torch.randn(3, 4, 17)
    target = torch.randn_like(model(x))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    probes = lw.attach_probes(model, ["0"], {"0.weight": "hidden"}, every=1, fraction=1.0, positions=0,
                              metrics=list(METRICS), power_iters=300)  # fmt: skip
    X = (patches_2d if "2d" in kind else patches_1d)(x.double(), conv)
    W0 = conv.weight.detach().double().reshape(6, -1)
    y = (X @ W0.T + conv.bias.double()).reshape(3, -1, 6).transpose(1, 2)  # the reference is the conv's own map
    assert torch.allclose(y, model(x).double().flatten(2), atol=1e-5)
    F.mse_loss(model(x), target).backward()
    probes.before_step(1, x)
    opt.step()
    got = probes.after_step(1, opt)
    dW = conv.weight.detach().double().reshape(6, -1) - W0
    nx, nw, ndw = X.norm(), W0.norm(), dW.norm()
    want = {
        "rel_update": ndw / nw,
        "weight_align": (X @ W0.T).norm() / (nw * nx),
        "update_align": (X @ dW.T).norm() / (ndw * nx),
        "rrc": (X @ dW.T).norm() / (X @ W0.T).norm(),
        "weight_rms": nw / math.sqrt(W0.numel()),
        "sigma_max": torch.linalg.matrix_norm(W0, 2),
        "update_srank": ndw**2 / torch.linalg.matrix_norm(dW, 2) ** 2,
        "grad_rel_update": (dW + 1e-2 * 0.1 * W0).norm() / nw,  # PyTorch AdamW decays eta lambda W_t first
    }
    want["align_ratio"] = want["update_align"] / want["weight_align"]
    for metric, v in want.items():
        assert got[f"probe/0/{metric}"] == pytest.approx(v.item(), rel=1e-4), metric


def test_1x1_conv_probe_equals_its_linear_exactly():
    """A 1x1 convolution is the linear map of its weight on the channels at every position: same X, same W,
    the same update (the linear's gradient, given to both), so the same floats, bit for bit."""

    class OnChannels(nn.Module):
        def __init__(self, layer: nn.Module):
            super().__init__()
            self.layer = layer

        def forward(self, x):  # x (B, C, H, W)
            return self.layer(x) if isinstance(self.layer, nn.Conv2d) else self.layer(x.flatten(2).transpose(1, 2))

    torch.manual_seed(0)
    lin = OnChannels(nn.Linear(8, 5))
    conv = OnChannels(nn.Conv2d(8, 5, 1))
    with torch.no_grad():
        conv.layer.weight.copy_(lin.layer.weight.view(5, 8, 1, 1))
        conv.layer.bias.copy_(lin.layer.bias)
    x = torch.randn(4, 8, 4, 4)
    runs, grads = [], []
    for model in (lin, conv):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        probes = lw.attach_probes(model, ["layer"], {"layer.weight": "hidden", "layer.bias": "bias"}, every=1,
                                  fraction=0.5, positions=5, metrics=list(METRICS))  # fmt: skip
        records = []
        for step in range(1, 4):
            if model is lin:  # the linear's own gradients, replayed into the convolution
                model(x).square().mean().backward()
                grads.append((lin.layer.weight.grad.clone(), lin.layer.bias.grad.clone()))
            else:
                model.layer.weight.grad = grads[step - 1][0].view_as(model.layer.weight).clone()
                model.layer.bias.grad = grads[step - 1][1].clone()
            probes.before_step(step, x)
            opt.step()
            opt.zero_grad()
            records.append(probes.after_step(step, opt))
        runs.append(records)
    assert len(runs[0][0]) > 20 and runs[0][0] != runs[0][1]
    assert runs[0] == runs[1]


def test_grouped_conv_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ConfigError, match=r"^probes.layers: 0 is a convolution with groups=4"):
        lw.attach_probes(model, ["0"], {"0.weight": "input", "0.bias": "bias"})


def test_probing_a_batchnorm_cnn_changes_nothing():
    """The probe forward runs in training mode; the batch norms' running statistics are put back."""

    def run(probe: bool):
        torch.manual_seed(0)
        model = CNN(16)
        classes = lw.classify(model, base=CNN(8))
        opt = torch.optim.AdamW(lw.param_groups(model, the_plan(), classes))
        probes = lw.attach_probes(model, ["all"], classes, every=1, fraction=0.25) if probe else None
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
        losses = []
        for step in range(1, 4):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
            if probe:
                probes.before_step(step, x)
            opt.step()
            opt.zero_grad()
            if probe:
                assert probes.after_step(step, opt)["probe/median/hidden/align_ratio"] > 0
        return losses, model.bn.running_mean.clone(), model.bn.running_var.clone()

    off, on = run(False), run(True)
    assert off[0] == on[0] and torch.equal(off[1], on[1]) and torch.equal(off[2], on[2])


# ----------------------------------------------------------------------------- the docs' loop (acceptance)


def api_example() -> str:
    """The first python block of docs/library.md's "## API" section."""
    text = (ROOT / "docs" / "library.md").read_text()
    section = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_plain_loop_runs_and_logs_classes_and_probes():
    """Acceptance: the docs' plain PyTorch loop with the API lines gets per-class LR/WD and the alignment
    metrics in its own log dicts, and its loss falls."""
    code = api_example()
    ns: dict = {}
    exec(compile(code, "docs/library.md", "exec"), ns)
    logs = ns["logs"]
    first, last = logs[0]["loss"], sum(r["loss"] for r in logs[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    peak = logs[len(logs) // 5]  # past the warmup: hidden LR = eta / m (muP), lambda m (independent)
    m = ns["plan"].width_mult
    assert m == 4 and peak["lr/hidden"] == pytest.approx(peak["lr/input"] / m)
    assert (peak["wd/hidden"], peak["wd/input"], peak["wd/bias"]) == pytest.approx((0.1 * m, 0.1, 0.1))
    probed = [r for r in logs if "probe/2/align_ratio" in r]
    assert len(probed) == len(logs) // ns["probes"].args.every
    assert all(math.isfinite(r["probe/2/align_ratio"]) and r["probe/2/rrc"] > 0 for r in probed)
