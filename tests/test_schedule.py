"""Schedules (SPEC §3): base shapes, the extra warmups of eq 14 and eq 15, checks."""

from __future__ import annotations

import numpy as np
import pytest

from lingua_wd.args import ConfigError
from lingua_wd.schedule import (
    ScheduleArgs,
    check_schedule_args,
    decay_away,
    exp_warmup,
    extra_warmup_factors,
    group_factor,
    lr_factor,
    schedule_factors,
)

T = 1000


def test_linear_default_is_ten_percent_warmup_then_linear_decay_to_zero():
    f = schedule_factors(ScheduleArgs(), T)
    assert f[0] == pytest.approx(1 / 100) and f[99] == 1.0 and f.argmax() == 99
    assert np.all(np.diff(f[:100]) > 0) and np.all(np.diff(f[100:]) < 0)
    assert f[550] == pytest.approx(0.5, abs=2e-3) and f[-1] == pytest.approx(1 / 900)
    assert lr_factor(ScheduleArgs(), T, T) == 0.0  # past the end


def test_cosine_ends_at_final_ratio_and_constant_and_wsd():
    cos = schedule_factors(ScheduleArgs(kind="cosine", final_ratio=0.1), T)
    assert cos[100] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1, abs=1e-4)
    assert cos[550] == pytest.approx(0.55, abs=2e-3)  # halfway down the cosine
    const = schedule_factors(ScheduleArgs(kind="constant", warmup_steps=0), T)
    assert np.all(const == 1.0)
    wsd = schedule_factors(ScheduleArgs(kind="wsd", warmup=0.1, decay=0.2), T)
    assert np.all(wsd[100:800] == 1.0) and np.all(np.diff(wsd[800:]) < 0) and wsd[-1] < 0.01


def test_linear_with_final_ratio():
    f = schedule_factors(ScheduleArgs(final_ratio=0.1), T)
    assert lr_factor(ScheduleArgs(final_ratio=0.1), T, T) == pytest.approx(0.1) and f.min() >= 0.01


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"kind": "step"}, "schedule.kind"),
        ({"warmup": 1.5}, "schedule.warmup"),
        ({"warmup_steps": 2000}, "schedule.warmup_steps"),
        ({"final_ratio": -0.1}, "schedule.final_ratio"),
        ({"kind": "wsd", "warmup": 0.5, "decay": 0.6}, "schedule.decay"),
    ],
)
def test_schedule_errors_name_the_key(kw, key):
    with pytest.raises(ConfigError) as err:
        check_schedule_args(ScheduleArgs(**kw), T)
    assert str(err.value).startswith(key + ":")


@pytest.mark.parametrize("m", [4, 16])
def test_exp_warmup_eq14(m):
    t = np.arange(T + 1)
    f = exp_warmup(t, T, m, 0.5)
    assert f[0] == pytest.approx(1 / m) and f[500] == 1.0 and np.all(f[500:] == 1.0)
    assert np.all(np.diff(f[:501]) > 0)
    assert f[250] == pytest.approx(m**-0.5)  # exponential: log-linear in t
    assert np.allclose(np.diff(np.log(f[:501])), np.log(m) / 500)


def test_decay_away_eq15_matches_a_direct_loop_and_tends_to_one():
    m, eta, lam, total = 16, 4e-3, 0.1, 20_000  # Figure 7
    lrs = eta * schedule_factors(ScheduleArgs(), total)
    fast = decay_away(lrs, lam, m)
    prod, direct = 1.0, []
    for t in range(total):
        direct.append((1 + (m * m - 1) * prod) ** -0.5)
        prod *= (1 - lrs[t] * lam) ** 2
    assert np.allclose(fast, direct, rtol=1e-12, atol=0)
    assert fast[0] == pytest.approx(1 / m) and np.all(np.diff(fast) >= 0)
    assert fast[-1] > 0.95  # Figure 7: most of the way back to 1 by the end of the run
    const = decay_away(np.full(20_000, eta), lam, m)  # constant LR: (1 - eta lambda)^(2t) -> 0
    assert const[-1] == pytest.approx(1.0, abs=1e-4) and const[-1] > fast[-1]


def test_extra_warmups_have_no_effect_at_m1():
    for kind in ("exp", "decay_away"):
        assert np.all(extra_warmup_factors(kind, ScheduleArgs(), T, 1.0, 0.5, 1e-3) == 1.0)


def test_extra_warmup_factors_shape_and_decay_away_needs_decay():
    f = extra_warmup_factors("decay_away", ScheduleArgs(), T, 4.0, 0.5, 1e-2)
    assert len(f) == T + 1 and f[0] == pytest.approx(0.25)
    with pytest.raises(ConfigError, match=r"^scaling\.extra_warmup:"):
        extra_warmup_factors("decay_away", ScheduleArgs(), T, 4.0, 0.5, 0.0)


def test_group_factor_multiplies_base_and_extra():
    args = ScheduleArgs()
    extra = extra_warmup_factors("exp", args, T, 4.0, 0.5, 0.0)
    fn = group_factor(args, T, extra)
    for t in (0, 50, 499, 500, 999, T + 5):
        assert fn(t) == pytest.approx(lr_factor(args, t, T) * extra[min(t, T)])
    assert group_factor(args, T)(7) == lr_factor(args, 7, T)
