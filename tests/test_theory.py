"""Theory (SPEC §4) against its closed forms, against simulation, and against [003] Table 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lingua_wd import theory as th
from lingua_wd.optim import OptimArgs, make_adamw
from lingua_wd.schedule import ScheduleArgs, schedule_factors


def test_rms_model_matches_closed_forms():
    t = np.arange(501)
    rho = th.rms_model(np.full(500, 0.01), 0.1, 0.05)
    assert np.allclose(rho, th.rms_constant_lr(t, 0.01, 0.1, 0.05), rtol=1e-12)  # eq 32
    rho = th.rms_model(np.full(500, 0.01), 0.0, 0.05)
    assert np.allclose(rho, np.sqrt(0.05**2 + t * 0.01**2), rtol=1e-12)  # eq 37


def test_equilibrium_and_relative_update_eq33_eq36():
    lr, wd = 0.01, 0.5
    rho = th.rms_model(np.full(20_000, lr), wd, 0.3)
    assert rho[-1] == pytest.approx(th.equilibrium_rms(lr, wd, exact=True), rel=1e-9)
    assert th.equilibrium_rms(lr, wd) == pytest.approx(math.sqrt(lr / (2 * wd)))
    assert th.equilibrium_rms(lr, wd, exact=True) == pytest.approx(math.sqrt(lr / (2 * wd)), rel=2 * lr * wd)
    rel = th.relative_updates(np.full(20_000, lr), rho)
    assert rel[-1] == pytest.approx(th.equilibrium_relative_update(lr, wd), rel=1e-9)
    assert th.equilibrium_rms(lr, 0.0) == math.inf


@pytest.mark.parametrize("rho0", [0.01, 0.3])  # below and above the equilibrium 0.0707
def test_time_to_equilibrium_eq34_is_when_the_model_enters_the_sqrt2_band(rho0):
    lr, wd = 1e-3, 0.1
    rho = th.rms_model(np.full(60_000, lr), wd, rho0)
    ratio2 = (rho / th.equilibrium_rms(lr, wd, exact=True)) ** 2
    entered = int(np.argmax((ratio2 > 2**-0.5) & (ratio2 < 2**0.5)))  # rho^2 within a factor sqrt(2)
    assert th.time_to_equilibrium(lr, wd, rho0) == pytest.approx(entered, rel=0.01)
    assert th.time_to_equilibrium(lr, wd, 0.07) == 0.0


def test_warmup_effect_eq39_and_general_schedule():
    lr, wd, m, rho0 = 1e-2, 0.1, 4, 0.1
    s = th.warmup_effect(np.full(3000, lr), wd, m, rho0)
    assert np.allclose(s, th.warmup_effect_constant(np.arange(3000), lr, wd, m, rho0), rtol=1e-10)
    assert s[0] == pytest.approx(1 / m) and s[-1] == pytest.approx(1.0, abs=5e-3)
    rho_inf = th.equilibrium_rms(lr, wd, exact=True)  # rho0 = rho_inf: 1 / sqrt(1 + (m^2 - 1) a^2t)
    a2t = (1 - lr * wd) ** (2 * np.arange(100))
    assert np.allclose(th.warmup_effect_constant(np.arange(100), lr, wd, m, rho_inf), (1 + (m * m - 1) * a2t) ** -0.5)
    s = th.warmup_effect(lr * schedule_factors(ScheduleArgs(), 5000), wd, m, rho0)  # any schedule, via eq 30
    assert s[0] == pytest.approx(1 / m) and 0.95 < s[-1] <= 1.0 + 1e-9


def test_update_alignment_eq27_matches_monte_carlo():
    for C, B, phi in [(64, 16, 0.0), (16, 128, 0.0), (64, 32, 0.05), (32, 32, 1.0)]:
        mean_alpha, ratio_alpha = th.update_alignment_mc(C, B, phi, trials=1000, seed=1)
        eq27 = float(th.update_alignment(C, B, phi))
        assert ratio_alpha == pytest.approx(eq27, rel=0.02)  # eq 27 is exact for the ratio of expectations (eq 23)
        assert mean_alpha == pytest.approx(eq27, rel=0.05)


def test_update_alignment_limits_and_eq28():
    assert float(th.update_alignment(4096, 16, 0.0)) == pytest.approx(1 / 4, rel=0.01)  # B << C: 1/sqrt(B)
    assert float(th.update_alignment(64, 16384, 0.0)) == pytest.approx(1 / 8, rel=0.02)  # B >> C: 1/sqrt(C)
    C, B, phi = np.meshgrid(2.0 ** np.arange(3, 13), 2.0 ** np.arange(3, 13), [0, 1e-4, 1e-2, 1, 100], indexing="ij")
    ratio = th.update_alignment_approx(C, B, phi) / th.update_alignment(C, B, phi)
    assert 0.93 < ratio.min() and ratio.max() < 1.07  # eq 28 approximates eq 27 for B >= 8


def test_schedule_timescales_reproduce_003_table1():
    # Llama 1 6.7B: initial LR 3e-4, lambda 0.1, cosine to 10 %, 4M tokens per batch, 1T tokens (1 epoch)
    M = th.iters_per_epoch(1e12, 4e6)
    lrs = 3e-4 * schedule_factors(ScheduleArgs(kind="cosine", final_ratio=0.1, warmup_steps=2000), 250_000)
    ts = th.schedule_timescales(lrs, 0.1, M)
    assert ts["tau_epoch_init"] == pytest.approx(0.133, abs=1e-3)
    assert ts["tau_epoch_final"] == pytest.approx(1.33, abs=1e-2)
    assert th.ema_timescale(3e-4, 0.1) == pytest.approx(1 / 3e-5)
    assert th.ema_timescale(3e-4, 0.0) == math.inf


def toy(lr: float, wd: float, steps: int, beta1: float, variant: str = "torch", K: int = 64, C: int = 64):
    """A scale-invariant layer: W followed by a normalization, loss <R_t, W / ||W||> with random R_t.

    Returns the weight RMS rho_t before each step and the gradient part of each relative update.
    """
    gen = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(K, C, generator=gen, dtype=torch.float64) / math.sqrt(C))
    lam = wd if variant == "torch" else lr * wd  # decoupled: lambda' = eta lambda decays the same per step
    opt = make_adamw(
        [{"params": [W], "lr": lr, "initial_lr": lr, "weight_decay": lam}],
        OptimArgs(lr=lr, beta1=beta1, beta2=0.99, variant=variant),
        on_cuda=False,
    )
    rms, rel = np.empty(steps), np.empty(steps)
    for t in range(steps):
        loss = (torch.randn(K, C, generator=gen, dtype=torch.float64) * W / W.norm()).sum()
        opt.zero_grad()
        loss.backward()
        before = W.detach().clone()
        opt.step()
        grad_part = W.detach() - (1 - lr * wd) * before  # the update without its weight-decay component
        rms[t] = float(before.norm()) / math.sqrt(K * C)
        rel[t] = float(grad_part.norm() / before.norm())
    return rms, rel


@pytest.mark.slow  # a trainer process or several: see README, Tests
@pytest.mark.parametrize("beta1, variant", [(0.0, "torch"), (0.9, "torch"), (0.0, "decoupled")])
def test_scale_invariant_toy_reaches_the_predicted_equilibrium(beta1, variant):
    lr, wd = 0.02, 0.25
    t_eq = max(th.time_to_equilibrium(lr, wd, 1 / 8), 1 / (2 * lr * wd))
    steps = int(6 * t_eq)
    rms, rel = toy(lr, wd, steps, beta1, variant)
    tail = slice(steps - steps // 6, None)  # after five T_EQ
    assert rms[tail].mean() == pytest.approx(math.sqrt(lr / (2 * wd)), rel=0.10)  # eq 33
    # eq 36; with momentum and uncorrelated gradients one step carries b = sqrt((1-beta1)/(1+beta1)) of it
    b = th.momentum_update_rms(beta1)
    assert rel[tail].mean() == pytest.approx(b * th.equilibrium_relative_update(lr, wd), rel=0.10)
    assert rms[0] < 0.75 * rms[tail].mean()  # it really moved from the init (1/8) to equilibrium (0.2)
