"""lingua_wd.transfer_stats: expected values are computed by hand in the comments, not by the code under test."""

import math
import random

import pytest

from lingua_wd.transfer_stats import Outcome, analyse_panel, line_optimum, paper_finding, shift

LN2 = math.log(2)
GRID_SIGMA = LN2 / math.sqrt(12)  # one grid step of a factor 2: uniform error over the cell, 0.2001


def done(*losses):
    return [Outcome("done", v) for v in losses]


def line(lrs, losses):
    """{lr: [outcome]} with one seed; None -> incomplete, inf -> diverged."""
    out = {}
    for lr, v in zip(lrs, losses, strict=True):
        out[lr] = [Outcome("incomplete") if v is None else Outcome("diverged" if v == math.inf else "done", v)]
    return out


def parabola_line(lrs, vertex_lr, curvature=0.1, floor=3.0):
    return line(lrs, [floor + curvature * math.log(lr / vertex_lr) ** 2 for lr in lrs])


LRS = [1e-3 * 2**k for k in range(6)]


def test_vertex_between_grid_points_is_recovered():
    # loss = 3 + 0.1 (ln lr - ln eta*)^2 with eta* = 1e-3 * 2^2.3 = 4.9246e-3: best grid point 4e-3 (0.3 step
    # away), the parabola through 2e-3, 4e-3, 8e-3 is the curve itself, so its vertex is eta* exactly.
    ln = line_optimum(64, parabola_line(LRS, 1e-3 * 2**2.3))
    assert ln.method == "fit" and ln.best_lr == pytest.approx(4e-3) and ln.edge is None
    assert ln.eta == pytest.approx(4.9246e-3, rel=1e-4)
    assert ln.sigma == pytest.approx(0.2001, abs=1e-4)  # one seed: the grid model ln2/sqrt(12)
    assert ln.usable


def test_vertex_of_an_asymmetric_triple():
    # points (u, loss) = (-1, 1), (0, 0), (1, 2): y = 1.5 u^2 + 0.5 u, vertex u = -0.5 / 3 = -1/6
    ln = line_optimum(1, line([math.exp(-1), 1.0, math.e], [1.0, 0.0, 2.0]))
    assert ln.ln_eta == pytest.approx(-1 / 6)
    assert ln.fit(-1 / 6) == pytest.approx(-1 / 24)  # 1.5/36 - 0.5/6


def test_seed_spread_propagates_to_the_vertex():
    # u = -1, 0, 1; seeds m -+ 0.1 -> means (1, 0, 1), std 0.1 sqrt2, se 0.1. Vertex u* = (y0 - y2) / (2 (y0 - 2 y1
    # + y2)): d u*/d y0 = 1/4, d u*/d y2 = -1/4, d u*/d y1 = 0 at this point -> sigma = sqrt(2) 0.1 / 4 = 0.035355.
    pts = {math.exp(-1): done(0.9, 1.1), 1.0: done(-0.1, 0.1), math.e: done(0.9, 1.1)}
    ln = line_optimum(1, pts)
    assert ln.ln_eta == pytest.approx(0.0, abs=1e-12)
    assert ln.points[0].std == pytest.approx(0.1 * math.sqrt(2)) and ln.points[0].n == 2
    assert ln.sigma == pytest.approx(math.sqrt(2) * 0.1 / 4, rel=1e-6)


def test_uncertainty_covers_the_truth_at_the_nominal_rate():
    # 1000 seeded draws, 8 seeds of N(0, 0.005) noise per LR around the parabola above: the truth should lie within
    # 1 sigma ~68% and within 2 sigma ~95% of the time (binomial sd at n=1000: 1.5% and 0.7%).
    rng = random.Random(0)
    u_star = math.log(1e-3) + 2.3 * LN2
    hits1 = hits2 = 0
    n = 1000
    for _ in range(n):
        pts = {
            lr: done(*(3 + 0.1 * (math.log(lr) - u_star) ** 2 + rng.gauss(0, 0.005) for _ in range(8))) for lr in LRS
        }
        ln = line_optimum(64, pts)
        err = abs(ln.ln_eta - u_star)
        hits1 += err <= ln.sigma
        hits2 += err <= 2 * ln.sigma
    assert 0.62 <= hits1 / n <= 0.74
    assert 0.91 <= hits2 / n <= 0.98


def issue_panel():
    # configs/sweeps/cpu_small.yaml after 12 of its 24 runs (issue 15): per rule, d32 has all 4 LRs, d64 only its
    # two lowest, d128 none. The old report gave slope ln(8e-3/1.6e-2)/ln 2 = -1 +- ln2/sqrt12/(ln2/sqrt2) = 0.408.
    lrs = [4e-3, 8e-3, 1.6e-2, 3.2e-2]
    return {
        32: line(lrs, [3.30, 3.20, 3.15, 3.25]),
        64: line(lrs, [3.25, 3.10, None, None]),
        128: line(lrs, [None] * 4),
    }


def test_issue_case_half_finished_sweep_withholds_the_verdict():
    panels = [analyse_panel(issue_panel(), base_width=32) for _rule in ("sp/standard", "mup/independent")]
    for p in panels:
        d32, d64, d128 = p.lines
        assert d32.complete and d32.usable
        assert not d64.complete and d64.n_missing == 2
        assert d64.method == "edge" and d64.edge == "high" and "eta* > 0.004" in d64.note  # beyond the worse neighbour
        assert d128.n_missing == 4 and d128.method == "none"
        s = p.shift
        assert s.verdict is None and s.slope is None and s.sigma is None
        assert s.n_missing == 6 and s.reason.startswith("6 of 12 runs not finished")
        assert "64: 2" in s.reason and "128: 4" in s.reason
        assert p.regret[0].regret == 0.0
        assert p.regret[1].regret is None and "2 runs missing" in p.regret[1].note
    assert sum(p.shift.n_missing for p in panels) == 12


def test_grid_edge_is_a_bound_and_withholds_the_verdict():
    falling = line(LRS, [3.5, 3.4, 3.3, 3.2, 3.1, 3.0])  # complete, still falling at the largest LR
    ln = line_optimum(128, falling)
    assert ln.complete and ln.method == "edge" and ln.edge == "high" and ln.sigma is None and not ln.usable
    assert ln.eta == pytest.approx(3.2e-2)
    rising = line_optimum(128, line(LRS, [3.0, 3.1, 3.2, 3.3, 3.4, 3.5]))
    assert rising.edge == "low" and "eta* < 0.002" in rising.note  # below the worse neighbour, not <= the edge
    assert rising.bound == pytest.approx(2e-3) and ln.bound == pytest.approx(1.6e-2)
    p = analyse_panel({64: parabola_line(LRS, 4e-3), 128: falling})
    assert p.shift.verdict is None and p.shift.n_missing == 0 and "not bracketed" in p.shift.reason


def test_non_convex_fit_falls_back_to_the_grid_point():
    # the best point's left neighbour is higher by 1e-15 only: a plateau to rounding, no vertex to fit
    ln = line_optimum(64, line(LRS, [3.5, 3.0 + 1e-15, 3.0, 3.0, 3.2, 3.4]))
    assert ln.method == "grid" and "non-convex" in ln.note
    assert ln.eta == pytest.approx(4e-3) and ln.sigma == pytest.approx(GRID_SIGMA)


def test_diverged_runs_are_information_not_missing():
    # top two LRs diverged: finished, so the line is complete and 4e-3 is bracketed (not an edge); the diverged
    # neighbour leaves no parabola, so the grid point with the grid error
    ln = line_optimum(64, line(LRS, [3.2, 3.1, 3.0, math.inf, math.inf, math.inf]))
    assert ln.complete and ln.n_missing == 0 and ln.usable
    assert ln.method == "grid" and "diverged" in ln.note and ln.eta == pytest.approx(4e-3)
    assert ln.sigma == pytest.approx(GRID_SIGMA)
    # the same line with those runs unfinished instead: incomplete, and 4e-3 is the edge of the finished LRs
    ln = line_optimum(64, line(LRS, [3.2, 3.1, 3.0, None, None, None]))
    assert not ln.complete and ln.n_missing == 3 and ln.edge == "high"
    # one diverged seed makes the point diverged
    pt = line_optimum(64, {1e-3: done(3.0), 2e-3: [Outcome("done", 2.9), Outcome("diverged")]}).points[1]
    assert pt.mean == math.inf and pt.n_diverged == 1 and pt.n == 1


def test_verdicts_on_complete_data():
    lrs = [1e-3 * 2**k for k in range(10)]
    # the same vertex at widths 64, 128, 256 (m = 1, 2, 4): slope 0; sigma = (ln2/sqrt12) / sqrt(2 ln2^2) = 1/sqrt24
    same = analyse_panel({w: parabola_line(lrs, 1e-2 * 1.3) for w in (64, 128, 256)})
    assert same.shift.slope == pytest.approx(0, abs=1e-9)
    assert same.shift.sigma == pytest.approx(1 / math.sqrt(24), rel=1e-6)
    assert same.shift.verdict == "transfers"  # 0 +- 0.41 lies within +-0.5
    # eta* = 0.03 / m: slope -1, interval [-1.41, -0.59] beyond -0.5
    moving = analyse_panel({w: parabola_line(lrs, 0.03 * 64 / w) for w in (64, 128, 256)})
    assert moving.shift.slope == pytest.approx(-1, abs=1e-9) and moving.shift.verdict == "shifts with width"
    assert moving.shift.intercept == pytest.approx(math.log(0.03))
    # two widths a factor 2 apart: sigma = sqrt2/sqrt12 = 0.408, too wide to say either
    two = analyse_panel({w: parabola_line(lrs, 1e-2 * 1.3) for w in (64, 128)})
    assert two.shift.sigma == pytest.approx(0.4082, abs=1e-4) and two.shift.verdict == "inconclusive"


def test_a_resolved_shift_within_the_tolerance_is_named():
    # eta* ~ m^-0.3 over m = 1..16: sigma = (ln2/sqrt12) / (ln2 sqrt10) = 0.091, interval [-0.48, -0.12]: within
    # +-0.5, so "transfers", but it excludes 0 and the reason must say so (a sqrt-rule panel read as "no shift")
    lrs = [1e-3 * 2**k for k in range(10)]
    p = analyse_panel({64 * 2**k: parabola_line(lrs, 1.3e-2 * 2 ** (-0.3 * k)) for k in range(5)})
    assert p.shift.verdict == "transfers" and p.shift.slope == pytest.approx(-0.3, abs=1e-9)
    assert "the interval excludes 0: eta* moves like m^-0.30" in p.shift.reason
    same = analyse_panel({w: parabola_line(lrs, 1.3e-2) for w in (64, 128, 256)})
    assert "excludes 0" not in same.shift.reason


def test_scatter_beyond_the_errors_scales_the_slope_sigma():
    # ln eta* = (0, ln2, 0) + c at x = (0, ln2, 2 ln2), each +- ln2/sqrt12: slope 0, residuals (-1, 2, -1) ln2/3,
    # chi2 = (6/9) ln2^2 / (ln2^2/12) = 8 > dof 1 -> sigma = (1/sqrt24) sqrt8 = 1/sqrt3
    lrs = [1e-3 * 2**k for k in range(10)]
    p = analyse_panel({64: parabola_line(lrs, 0.013), 128: parabola_line(lrs, 0.026), 256: parabola_line(lrs, 0.013)})
    assert p.shift.slope == pytest.approx(0, abs=1e-9)
    assert p.shift.chi2 == pytest.approx(8, rel=1e-6) and p.shift.dof == 1
    assert p.shift.sigma == pytest.approx(1 / math.sqrt(3), rel=1e-6)


def test_transfer_regret_on_a_constructed_case():
    # in u = ln lr on u = -2..3: base width 64 has loss 1 + (u - 0.25)^2 -> picks u = 0.25.
    # width 256: 0.8 + 2 (u - 1)^2; 0.25 lies in its fit bracket [0, 2]: 0.8 + 2 * 0.75^2 = 1.925, regret 1.125.
    # width 1024: 0.7 + (u - 2)^2; 0.25 lies outside its bracket [1, 3]: the grid parabola gives 0.7 + 1.75^2,
    # regret 3.0625.
    lrs = [math.exp(u) for u in range(-2, 4)]
    curves = {64: (1.0, 1, 0.25), 256: (0.8, 2, 1.0), 1024: (0.7, 1, 2.0)}
    lines = {w: line(lrs, [f + c * (math.log(lr) - v) ** 2 for lr in lrs]) for w, (f, c, v) in curves.items()}
    r64, r256, r1024 = analyse_panel(lines, base_width=64).regret
    assert r64.regret == pytest.approx(0, abs=1e-12) and r64.lr == pytest.approx(math.exp(0.25))
    assert (r256.loss, r256.best, r256.regret) == pytest.approx((1.925, 0.8, 1.125))
    assert r1024.regret == pytest.approx(3.0625)
    assert r256.sigma is None  # one seed: no spread to propagate


def test_transfer_regret_uses_the_fitted_curve_inside_its_bracket():
    # u = 0..4 (lr = e^u). Base: 1 + (u - 2.6)^2 -> picks u = 2.6. Width 256 is not a parabola: (2.0, 1.2, 1.0, 1.4,
    # 3.0). Its fit through u = 1, 2, 3 (s = u - 2): 1 + 0.1 s + 0.3 s^2, vertex s = -1/6, best 1 - 0.01/1.2; at
    # s = 0.6: 1 + 0.06 + 0.108 = 1.168, regret 0.176333. (The grid parabola through u = 2, 3, 4 would say 1.096.)
    lrs = [math.exp(u) for u in range(5)]
    base = line(lrs, [1 + (u - 2.6) ** 2 for u in range(5)])
    r = analyse_panel({64: base, 256: line(lrs, [2.0, 1.2, 1.0, 1.4, 3.0])}).regret[1]
    assert (r.loss, r.best) == pytest.approx((1.168, 1 - 0.01 / 1.2))
    assert r.regret == pytest.approx(0.168 + 0.01 / 1.2)


def test_transfer_regret_at_a_grid_pick_with_seeds():
    # base: best 4e-3 next to a diverged LR -> the grid point is the pick, exactly. Width 256: means (1.0, 0.5, 1.0,
    # 2.0), each seed pair -+0.01 (se 0.01); the parabola through the first three is 0.5 + 0.5 t^2 (t in grid steps)
    # so its vertex is at 2e-3 with loss 0.5 and at 4e-3 it passes through 1.0: regret 0.5. With b = 0 the regret's
    # gradient is +1 on y(4e-3) and -1 on y(2e-3): sigma = sqrt2 * 0.01.
    lrs = [1e-3, 2e-3, 4e-3, 8e-3]
    base = line(lrs, [3.0, 2.9, 2.8, math.inf])
    wide = {lr: done(m - 0.01, m + 0.01) for lr, m in zip(lrs, [1.0, 0.5, 1.0, 2.0], strict=True)}
    _, r = analyse_panel({64: base, 256: wide}).regret
    assert r.lr == pytest.approx(4e-3)
    assert (r.loss, r.best, r.regret) == pytest.approx((1.0, 0.5, 0.5))
    assert r.sigma == pytest.approx(math.sqrt(2) * 0.01, rel=1e-5)


def test_regret_withheld_without_a_picked_lr():
    lrs = LRS
    p = analyse_panel({64: line(lrs, [3.5, 3.4, 3.3, 3.2, 3.1, 3.0]), 128: parabola_line(lrs, 4e-3)})
    assert all(r.regret is None and "no LR picked" in r.note for r in p.regret)


def test_shift_needs_two_widths():
    assert shift([line_optimum(64, parabola_line(LRS, 4e-3))], 64).reason == "needs two widths"


def test_paper_findings():
    assert paper_finding("independent").verdict == "transfers"
    assert paper_finding("mup/independent") is paper_finding("independent")
    std = paper_finding("standard")
    assert std.verdict == "shifts with width" and std.slope == pytest.approx(0.75)  # 8e-3 at 1x -> 6.4e-2 at 16x
    assert "Fig. 1" in std.source
    assert paper_finding("sp/standard").rule == "sp"
    assert paper_finding("sqrt_lr") is None
    assert "not the llama setup" in paper_finding("timescale").setup


def test_bad_status_is_rejected():
    with pytest.raises(ValueError, match="running"):
        Outcome("running")


def test_status_labels():
    lines = analyse_panel(issue_panel(), base_width=32).lines
    assert [ln.status for ln in lines] == ["ok", "incomplete (2 missing)", "incomplete (4 missing)"]
    assert line_optimum(1, line(LRS, [3.5, 3.4, 3.3, 3.2, 3.1, 3.0])).status == "at grid edge"
