"""Statistics of an LR-transfer sweep: optimum per line, its shift with width, transfer regret (pure, numpy-free).

Input is plain data. A *panel* is one scaling rule (e.g. mup/independent); its *lines* map a width to
{base LR: [Outcome of each seed]}. Every run the sweep planned must be passed, finished or not, so that a
line knows what it is missing (issue 15: a report that drew "shifts with width" from 12 of 24 runs).

- A line whose runs are not all finished is *incomplete*; its optimum is shown but never used for a verdict.
- A diverged run is a finished run with infinite loss: it says the LR is too high, it is not missing.
- The optimum of a line: the best finished grid point, refined by the parabola in ln LR through it and its
  two finished neighbours. Only three points: the loss is parabolic in ln LR only near its minimum (it rises
  steeply towards divergence), and the vertex of a parabola through a lowest middle point lies within half
  a grid step of it, so the refinement cannot run away. Its error is propagated from the seeds' spread
  (delta method) when every point has >= 2 seeds, else the grid model: the optimum is known to lie in the
  best point's cell, uniform error of width Delta -> std Delta/sqrt(12) (report.py's docstring).
- At the edge of the finished points the optimum is a bound (eta* <= lowest or >= highest LR): no estimate.
- The shift: weighted least squares of ln eta* on ln m with the per-line errors; the verdict compares the
  2-sigma interval of the slope with +-tol and is withheld unless every line is complete and bracketed.
- Transfer regret (the user's question): the loss at each width at the LR picked at the base width, minus
  the best loss at that width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

STATUSES = ("done", "diverged", "incomplete")  # incomplete: not finished (queued, running, failed, cancelled)
Z = 2.0  # verdicts use 2-sigma intervals (~95% for a normal error)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One run (one seed at one LR): its final loss when done; a non-finite loss counts as diverged."""

    status: str
    loss: float = math.nan

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Outcome.status: {self.status!r} is not one of {STATUSES}")


@dataclasses.dataclass(frozen=True)
class Point:
    """The seeds at one LR: mean and sample std of the finite losses (mean = inf if any seed diverged)."""

    lr: float
    mean: float  # nan: no seed finished
    std: float  # sample std (ddof=1) over the done seeds; nan with fewer than 2
    n: int  # done seeds with a finite loss
    n_diverged: int
    n_missing: int

    @property
    def finished(self) -> bool:
        return self.n_missing == 0 and self.n + self.n_diverged > 0

    @property
    def se(self) -> float:
        """Standard error of the mean; nan when the spread is unknown (one seed) or zero (no information)."""
        ok = self.n >= 2 and self.n_diverged == 0 and self.std > 0
        return self.std / math.sqrt(self.n) if ok else math.nan


@dataclasses.dataclass(frozen=True)
class Quadratic:
    """loss(ln lr) = a + b u + c u^2 with u = ln lr - u0: the fitted curve, for plots and interpolation."""

    u0: float
    a: float
    b: float
    c: float

    def __call__(self, ln_lr: float) -> float:
        u = ln_lr - self.u0
        return self.a + self.b * u + self.c * u * u

    @property
    def vertex(self) -> float:
        return self.u0 - self.b / (2 * self.c)


@dataclasses.dataclass(frozen=True)
class LineOptimum:
    width: float
    points: tuple[Point, ...]  # sorted by lr
    n_missing: int  # runs not finished on this line
    best_lr: Optional[float]  # best finished grid point (None: no finite loss)
    ln_eta: Optional[float]  # estimate of ln eta*; at an edge the bound (the edge LR)
    sigma: Optional[float]  # std of ln_eta; None at an edge
    method: str  # fit | grid (non-convex or a diverged neighbour) | edge | none
    edge: Optional[str]  # "low": best at the lowest finished LR (eta* below its neighbour), "high": at the highest
    fit: Optional[Quadratic]
    bracket: Optional[tuple[int, int, int]]  # indices into points: finished neighbour, best, finished neighbour
    note: str
    bound: Optional[float] = None  # at an edge: eta* lies beyond this LR (the worse finished neighbour's)

    @property
    def complete(self) -> bool:
        return self.n_missing == 0

    @property
    def usable(self) -> bool:
        """May the optimum enter a verdict: every run finished and the optimum bracketed."""
        return self.complete and self.method in ("fit", "grid")

    @property
    def status(self) -> str:
        """For the report's table: incomplete (n missing) | at grid edge | no finite loss | ok."""
        if not self.complete:
            return f"incomplete ({self.n_missing} missing)"
        return {"edge": "at grid edge", "none": "no finite loss"}.get(self.method, "ok")

    @property
    def eta(self) -> Optional[float]:
        return None if self.ln_eta is None else math.exp(self.ln_eta)

    @property
    def ln_lrs(self) -> list[float]:
        return [math.log(p.lr) for p in self.points]

    def refit(self, ys: Sequence[float]) -> float:
        """ln eta* recomputed from other point means ys (same bracket): the function the delta method
        differentiates. A grid or edge optimum does not move with the means."""
        if self.method != "fit":
            return self.ln_eta
        u = self.ln_lrs
        q = _vertex_fit([u[i] for i in self.bracket], [ys[i] for i in self.bracket])
        return q.vertex if q is not None else u[self.bracket[1]]


@dataclasses.dataclass(frozen=True)
class Shift:
    """ln eta* = intercept + slope ln m. Slope 0: the base LR transfers; -1: eta* moves like 1/m."""

    slope: Optional[float]
    sigma: Optional[float]  # from the per-line errors, scaled up by sqrt(chi2/dof) when the scatter exceeds them
    intercept: Optional[float]  # ln eta* at m = 1
    chi2: Optional[float]
    dof: int
    verdict: Optional[str]  # transfers | shifts with width | inconclusive; None when withheld
    reason: str  # why this verdict, or why it is withheld
    n_missing: int  # runs not finished in the panel


@dataclasses.dataclass(frozen=True)
class Regret:
    width: float
    lr: Optional[float]  # the LR picked at the base width (eta* there)
    loss: Optional[float]  # loss at this width at that LR (interpolated)
    best: Optional[float]  # best loss at this width
    regret: Optional[float]  # loss - best; a lower bound when this width's optimum is at an edge
    sigma: Optional[float]  # from the seeds' spread; None without seeds
    note: str


@dataclasses.dataclass(frozen=True)
class Panel:
    lines: tuple[LineOptimum, ...]  # sorted by width
    shift: Shift
    regret: tuple[Regret, ...]
    base_width: float


# ----------------------------------------------------------------------------- one line


def summarize(lr: float, outcomes: Sequence[Outcome]) -> Point:
    done = [o.loss for o in outcomes if o.status == "done" and math.isfinite(o.loss)]
    n_div = sum(o.status == "diverged" or (o.status == "done" and not math.isfinite(o.loss)) for o in outcomes)
    n_missing = sum(o.status == "incomplete" for o in outcomes)
    mean = math.inf if n_div else sum(done) / len(done) if done else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in done) / (len(done) - 1)) if len(done) >= 2 and not n_div else math.nan
    return Point(float(lr), mean, std, len(done), n_div, n_missing)


def parabola(us: Sequence[float], ys: Sequence[float]) -> Quadratic:
    """The parabola through three points (Newton's divided differences), centred at the middle one."""
    (u0, u1, u2), (y0, y1, y2) = us, ys
    d01, d12 = (y1 - y0) / (u1 - u0), (y2 - y1) / (u2 - u1)
    c = (d12 - d01) / (u2 - u0)
    return Quadratic(u1, y1, d01 + c * (u1 - u0), c)  # slope at u1: d01 + c (u1 - u0)


def _vertex_fit(us: Sequence[float], ys: Sequence[float]) -> Optional[Quadratic]:
    """Fit through three finite points; None when not convex (no vertex).

    Around the first-found minimum the left neighbour is strictly higher and the right one no lower, so the
    second divided difference is > 0: only a minimum flat to rounding reaches the fallback."""
    if not all(math.isfinite(y) for y in ys):
        return None
    q = parabola(us, ys)
    scale = max(abs(y) for y in ys) or 1.0
    return q if q.c > 1e-12 * scale else None


def propagate(f: Callable[[list[float]], float], ys: Sequence[float], ses: Sequence[float]) -> Optional[float]:
    """Delta method: std of f(ys) for independent ys with standard errors ses (central differences).

    None when f depends on a value whose standard error is unknown (nan)."""
    var = 0.0
    for i, (y, se) in enumerate(zip(ys, ses, strict=True)):
        if not math.isfinite(y):
            continue
        h = 1e-6 * max(1.0, abs(y))
        up, dn = list(ys), list(ys)
        up[i], dn[i] = y + h, y - h
        g = (f(up) - f(dn)) / (2 * h)
        if g != 0 and not math.isfinite(se):
            return None
        var += (g * se) ** 2 if g != 0 else 0.0
    return math.sqrt(var)


def line_optimum(width: float, points: Mapping[float, Sequence[Outcome]]) -> LineOptimum:
    """Optimum of one line (one width) from {lr: [seed outcomes]}; see the module docstring for the rules."""
    pts = tuple(summarize(lr, points[lr]) for lr in sorted(points))
    n_missing = sum(p.n_missing for p in pts)
    done = [i for i, p in enumerate(pts) if p.finished]  # incl. diverged: they bound the optimum from above
    finite = [i for i in done if math.isfinite(pts[i].mean)]

    def result(method: str, **kw) -> LineOptimum:
        base = dict(best_lr=None, ln_eta=None, sigma=None, edge=None, fit=None, bracket=None, note="")
        return LineOptimum(float(width), pts, n_missing, method=method, **{**base, **kw})

    if not finite:
        return result("none", note="no finished run with a finite loss")
    best = min(finite, key=lambda i: pts[i].mean)
    u = [math.log(p.lr) for p in pts]
    k = done.index(best)
    if k in (0, len(done) - 1):  # eta* may lie beyond the finished LRs: only a bound
        side = "low" if k == 0 else "high"
        note, nb = f"only one finished LR ({pts[best].lr:.3g})", None
        if len(done) > 1:  # a unimodal loss only says eta* lies beyond the worse neighbour, maybe off the grid
            nb = pts[done[1] if side == "low" else done[-2]].lr
            where = "lowest" if side == "low" else "highest"
            note = (
                f"best at the {where} finished LR ({pts[best].lr:.3g}): eta* {'<' if side == 'low' else '>'} {nb:.3g}"
            )
        return result("edge", best_lr=pts[best].lr, ln_eta=u[best], edge=side, note=note, bound=nb)
    bracket = (done[k - 1], best, done[k + 1])
    us, ys = [u[i] for i in bracket], [pts[i].mean for i in bracket]
    grid_sigma = (us[2] - us[0]) / 2 / math.sqrt(12)  # the best point's cell reaches half-way to each neighbour
    common = dict(best_lr=pts[best].lr, bracket=bracket)
    fit = _vertex_fit(us, ys)
    if fit is None:
        why = "a diverged neighbour" if not all(map(math.isfinite, ys)) else "a flat (non-convex) minimum"
        return result("grid", ln_eta=u[best], sigma=grid_sigma, note=f"grid point ({why})", **common)
    line = result("fit", ln_eta=fit.vertex, sigma=grid_sigma, fit=fit, note="fit; grid error (1 seed)", **common)
    sigma = propagate(line.refit, [p.mean for p in pts], [p.se for p in pts])
    if not sigma:
        return line
    n = min(pts[i].n for i in bracket)
    return dataclasses.replace(line, sigma=sigma, note=f"fit; error from the spread of {n}+ seeds")


# ----------------------------------------------------------------------------- shift with width


def weighted_slope(
    xs: Sequence[float], ys: Sequence[float], sigmas: Sequence[float]
) -> tuple[float, float, float, float]:
    """Weighted least squares y = a + s x, weights 1/sigma^2: (s, sigma_s, a, chi2). sigma_s = 1/sqrt(S_xx,w)."""
    w = [1 / s**2 for s in sigmas]
    sw = sum(w)
    xm = sum(wi * x for wi, x in zip(w, xs, strict=True)) / sw
    ym = sum(wi * y for wi, y in zip(w, ys, strict=True)) / sw
    sxx = sum(wi * (x - xm) ** 2 for wi, x in zip(w, xs, strict=True))
    s = sum(wi * (x - xm) * (y - ym) for wi, x, y in zip(w, xs, ys, strict=True)) / sxx
    a = ym - s * xm
    chi2 = sum(wi * (y - a - s * x) ** 2 for wi, x, y in zip(w, xs, ys, strict=True))
    return s, 1 / math.sqrt(sxx), a, chi2


def _withheld(reason: str, n_missing: int) -> Shift:
    return Shift(None, None, None, None, 0, None, reason, n_missing)


def shift(lines: Sequence[LineOptimum], base_width: float, tol: float = 0.5) -> Shift:
    """Slope of ln eta* vs ln m (m = width / base_width) and the verdict, or why it is withheld.

    Verdict (equivalence test against a practical tolerance |slope| <= tol, i.e. eta* moving by less than
    m^tol): "transfers" if slope +- 2 sigma lies within +-tol, "shifts with width" if it lies beyond, else
    "inconclusive". With three or more widths a scatter larger than the per-line errors (chi2 > dof) scales
    sigma up by sqrt(chi2/dof): the per-line errors do not include the curve's departure from a parabola.
    """
    n_missing = sum(ln.n_missing for ln in lines)
    incomplete = [ln for ln in lines if not ln.complete]
    if incomplete:
        per = ", ".join(f"{ln.width:g}: {ln.n_missing}" for ln in incomplete)
        total = sum(p.n + p.n_diverged + p.n_missing for ln in lines for p in ln.points)
        return _withheld(f"{n_missing} of {total} runs not finished (missing per width {per})", n_missing)
    bad = [ln for ln in lines if not ln.usable]
    if bad:
        per = "; ".join(f"{ln.width:g}: {ln.note}" for ln in bad)
        return _withheld(f"optimum not bracketed by the LR grid at width {per}", 0)
    if len({ln.width for ln in lines}) < 2:
        return _withheld("needs two widths", 0)
    xs = [math.log(ln.width / base_width) for ln in lines]
    s, sig, a, chi2 = weighted_slope(xs, [ln.ln_eta for ln in lines], [ln.sigma for ln in lines])
    dof = len(lines) - 2
    if dof > 0 and chi2 > dof:
        sig *= math.sqrt(chi2 / dof)
    lo, hi = s - Z * sig, s + Z * sig
    if -tol <= lo and hi <= tol:
        verdict = "transfers"
    elif lo > tol or hi < -tol:
        verdict = "shifts with width"
    else:
        verdict = "inconclusive"
    reason = f"slope {s:+.3f}, 2-sigma interval [{lo:+.2f}, {hi:+.2f}] vs tolerance +-{tol:g}"
    if verdict == "transfers" and (lo > 0 or hi < 0):  # within tolerance, yet a shift is resolved: say so
        reason += f"; the interval excludes 0: eta* moves like m^{s:+.2f}, less than the tolerance"
    return Shift(s, sig, a, chi2, dof, verdict, reason, 0)


# ----------------------------------------------------------------------------- transfer regret


def _loss_at(line: LineOptimum, ys: Sequence[float], ln_lr: float) -> float:
    """The line's loss at ln_lr from point means ys: inside the fit's bracket its fitted parabola; else the
    parabola through the three consecutive grid points centred nearest ln_lr (exact at a grid point); next to
    a diverged point inf (the loss there is unbounded); outside the grid nan (unknown)."""
    u = line.ln_lrs
    if line.method == "fit" and u[line.bracket[0]] <= ln_lr <= u[line.bracket[2]]:
        return parabola([u[i] for i in line.bracket], [ys[i] for i in line.bracket])(ln_lr)
    if ln_lr in u:
        return ys[u.index(ln_lr)]
    if not u[0] < ln_lr < u[-1]:
        return math.nan
    mid = min(range(1, len(u) - 1), key=lambda k: abs(u[k] - ln_lr))  # >= 3 points: ln_lr is between two
    window = range(mid - 1, mid + 2)
    if not all(math.isfinite(ys[k]) for k in window):
        return math.inf
    return parabola([u[k] for k in window], [ys[k] for k in window])(ln_lr)


def _best_loss(line: LineOptimum, ys: Sequence[float]) -> float:
    return _loss_at(line, ys, line.refit(ys)) if line.method == "fit" else min(y for y in ys if math.isfinite(y))


def regret(base: LineOptimum, line: LineOptimum) -> Regret:
    """Loss at `line`'s width at the LR picked at the base width (its eta*), minus the best loss there.

    Both lines are re-evaluated from their point means, so the delta method carries the seeds' spread of
    both: through the picked LR and through this width's curve."""
    if not base.usable:
        return Regret(line.width, None, None, None, None, None, f"no LR picked at the base width ({base.note})")
    if not line.complete:
        return Regret(line.width, base.eta, None, None, None, None, f"incomplete: {line.n_missing} runs missing")
    if line.method == "none":
        return Regret(line.width, base.eta, None, None, None, None, line.note)
    nb = len(base.points)

    def value(ys: list[float]) -> float:
        return _loss_at(line, ys[nb:], base.refit(ys[:nb])) - _best_loss(line, ys[nb:])

    ys = [p.mean for p in base.points + line.points]
    r, best = value(ys), _best_loss(line, ys[nb:])
    note = "lower bound: this width's optimum is at the grid edge" if line.method == "edge" else ""
    if not math.isfinite(r):
        note = (
            "the picked LR lies outside this width's grid"
            if math.isnan(r)
            else "the picked LR is next to a diverged one"
        )
        return Regret(line.width, base.eta, None, best, None, None, note)
    sigma = propagate(value, ys, [p.se for p in base.points + line.points])
    return Regret(line.width, base.eta, best + r, best, r, sigma, note)


# ----------------------------------------------------------------------------- a panel


def analyse_panel(
    lines: Mapping[float, Mapping[float, Sequence[Outcome]]], base_width: Optional[float] = None, tol: float = 0.5
) -> Panel:
    """One rule: {width: {lr: [seed outcomes]}} -> optimum per width, the shift with width, the regret.

    base_width: d0 of m = width / d0 and the width whose optimum is the "picked" LR; default the smallest."""
    optima = tuple(line_optimum(w, lines[w]) for w in sorted(lines))
    d0 = float(base_width) if base_width is not None else optima[0].width
    base = next((ln for ln in optima if ln.width == d0), optima[0])
    return Panel(optima, shift(optima, d0, tol), tuple(regret(base, ln) for ln in optima), d0)


# ----------------------------------------------------------------------------- the paper's findings


@dataclasses.dataclass(frozen=True)
class PaperFinding:
    rule: str
    verdict: str  # the paper's reading, in this module's verdict words
    slope: Optional[float]  # expected slope of ln eta* vs ln m where the reported optima give one
    text: str
    source: str
    setup: str  # the experiment it comes from: compare only when the sweep is that setup


_LLAMA = "[002] App. G.3: llama, 20 blocks, d_emb 128-2048 (1x-16x), DCLM, 20k steps, AdamW lambda=0.1"
PAPER_FINDINGS: dict[str, PaperFinding] = {
    "independent": PaperFinding(
        "independent",
        "transfers",
        0.0,
        "muP with independent WD (eta/m, m lambda): the optimal eta_base stays put across widths "
        "(8e-3 at 1x, the optimum of 1x in G.3.2, and best overall 2.801 at 8e-3 in G.3.1).",
        "[002] Fig. 1, §3 (eq 8), App. G.3.1-G.3.2",
        _LLAMA,
    ),
    "standard": PaperFinding(
        "standard",
        "shifts with width",
        math.log(8) / math.log(16),  # our reading: 8e-3 at 1x (same run as independent at m=1) -> 6.4e-2 at 16x
        "muP with standard WD (eta/m, lambda): the optimal eta_base moves up with width (G.2: 'the shifted "
        "(higher) base learning rates'); 6.4e-2 at 16x (G.3.1, G.3.3) vs 8e-3 at 1x, slope ~ +0.75.",
        "[002] Fig. 1, §3 (eq 7), App. G.2, G.3.1, G.3.3",
        _LLAMA,
    ),
    "none": PaperFinding(
        "none",
        "inconclusive",
        None,
        "muP without WD: transfers better than standard WD but not as well as independent WD, and is less "
        "sensitive to the LR; best 2.815 at eta_base 6.4e-2 (G.3.1).",
        "[002] Fig. 1, App. C, App. G.3.1",
        _LLAMA,
    ),
    "sp": PaperFinding(
        "sp",
        "shifts with width",
        None,
        "no muP scaling (10% or 50% linear warmup): 'work relatively poorly' for transfer; the paper gives no "
        "optima, so no slope.",
        "[002] Fig. 6 (middle), App. B.2, G.3.5",
        _LLAMA,
    ),
    "timescale": PaperFinding(
        "timescale",
        "transfers",
        0.0,
        "muP LR with a fixed EMA timescale tau_iter = 1/(eta lambda) (lambda grows with width): the optimal "
        "eta_base is far more stable across widths than with a fixed lambda.",
        "[003] §4.3, Fig. 4 (bottom row), App. C Fig. 10",
        "[003]: ResNet-18 on CIFAR-10 / ImageNet 32x32 and ViT, width factors 0.5-2; not the llama setup",
    ),
    "sqrt": PaperFinding(
        "sqrt",
        "transfers",
        0.0,
        "lambda ~ sqrt(d) with vector-like params at eta_1 = Theta(1), lambda_1 = 0: zero-shot transfer of "
        "LR and WD from proxy to target width (abstract only; no figure available here).",
        "[001] abstract",
        "[001]: LLaMA-style transformers (details not in the seed text)",
    ),
}


def paper_finding(rule: str) -> Optional[PaperFinding]:
    """The paper's finding for a rule (scaling.rule_name: sp or the muP wd_mode; 'mup/independent' also
    accepted), or None where the papers report none (sqrt_lr: proposed in [002] App. B.1, not swept).
    Print it only when the sweep is the `setup` it comes from: the caller decides."""
    key = rule.split("/")
    return PAPER_FINDINGS.get("sp" if key[0] == "sp" else key[-1])
