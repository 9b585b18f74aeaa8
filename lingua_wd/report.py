"""LR-transfer report of a sweep: `lingua-wd report SWEEP_DIR [key=value ...]`.

For every run: the final training loss (mean over the last N steps, as the paper reports it, App. G.3)
and the last validation loss. Then per panel (a scaling rule) and line (a width, or any numeric key:
depth, batch size, steps): loss against base LR (Figure 1 of the paper), the optimum of each line, how
it moves with the multiplier m = line / base (the slope of ln eta* against ln m: 0 means the LR
transfers), and the transfer regret: the loss at each line at the LR picked at the base line, minus the
best loss there. The statistics are lingua_wd/transfer_stats.py's (its docstring gives every rule):

- a line whose runs are not all finished is *incomplete*; its optimum is shown, never used;
- an optimum at the edge of the finished LRs is a bound, marked *at grid edge*, never used;
- the optimum lies between grid points: a parabola in ln LR through the best point and its neighbours,
  with an uncertainty from the seeds' spread (or from the grid cell with one seed);
- the verdict (transfers / shifts / inconclusive, a 2-sigma interval of the slope against +-`tol`) is
  withheld, saying how many runs are missing, until every line it rests on is complete and bracketed.

Run states map onto transfer_stats' outcomes: done -> done (diverged if it logged a non-finite loss),
failed with exit 3 -> diverged (the LR is too high: that is information), every other state (new,
started, resume, queued, running, cancelled, other failures) -> incomplete.
Writes report.md, report.json and PNG figures into the sweep dir (or `out_dir`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import textwrap
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from lingua_wd import transfer_stats as ts
from lingua_wd.args import check, parse_args, run_cli
from lingua_wd.rundir import EXIT_DIVERGED, RunDir, probe_records, train_records
from lingua_wd.status import state_kind
from lingua_wd.sweep import REPO_ROOT, ReportArgs, load_manifest, run_states

METRICS = {"train": "final train loss (mean of last {n} steps)", "val": "final validation loss"}
# line key -> the runs' key holding the line value of m = 1 (other numeric lines: their smallest value)
BASE_KEYS = {
    "model.dim": "scaling.base_dim",
    "model.n_layers": "scaling.base_depth",
    "data.batch_size": "scaling.base_batch",
}
X_NAMES = {"optim.lr": ("base LR", "eta"), "optim.weight_decay": ("base weight decay", "lambda")}  # x -> plot names
AXIS_NAMES = {"model.dim": "width", "model.n_layers": "depth", "data.batch_size": "batch size", "steps": "run length"}
RULE_KEYS = ("scaling.width", "scaling.wd")  # which paper finding a panel is (transfer_stats.paper_finding)
PAPER_CONFIG = REPO_ROOT / "configs" / "paper" / "llama.yaml"
# The keys that make a sweep "the paper's setup" (App. G.3) besides the swept LR, width and rule
SETUP_KEYS = (
    "model.n_layers", "model.head_dim", "model.ffn_mult", "data.seq_len", "data.batch_size", "data.tokenizer.name",
    "steps", "optim.beta1", "optim.beta2", "optim.eps", "optim.weight_decay", "optim.variant", "schedule.kind",
    "schedule.warmup", "scaling.base_dim",
)  # fmt: skip


@dataclass
class RunResult:
    name: str
    state: str  # sweep.run_state: new | started | resume | queued | running | done | failed (...) | cancelled
    values: dict[str, Any]  # report keys (x, line, panel, averaged, other axes) -> value from the run's config
    last_step: int = 0  # last logged training step
    train: float = math.nan  # mean training loss over the last N steps
    val: float = math.nan  # last validation loss
    diverged: bool = False  # a non-finite loss was logged, or the trainer stopped for divergence (exit 3)

    def outcome(self, metric: str) -> ts.Outcome:
        """This run as transfer_stats sees it (the module docstring's mapping)."""
        if self.diverged:
            return ts.Outcome("diverged")
        value = getattr(self, metric)
        if state_kind(self.state) == "done" and math.isfinite(value):
            return ts.Outcome("done", value)
        return ts.Outcome("incomplete")


# ----------------------------------------------------------------------------- reading runs


def final_train_loss(records: list[dict], last_n: int) -> tuple[float, int]:
    """Mean training loss over the steps (last - last_n, last]; returns (loss, last step).

    Each train record's "loss" averages the steps since the previous one, so it is weighted by how many of
    its steps fall in the window; a step logged twice (re-logged after a resume) counts once, the newest.
    """
    by_step = {int(r["step"]): float(r["loss"]) for r in train_records(records)}
    if not by_step:
        return math.nan, 0
    steps = sorted(by_step)
    last = steps[-1]
    lo = last - last_n
    total = weight = 0.0
    prev = 0
    for s in steps:
        w = max(0, s - max(prev, lo))
        total, weight, prev = total + w * by_step[s], weight + w, s
    return total / weight, last


def last_val_loss(records: list[dict]) -> float:
    vals = [(int(r["step"]), float(r["val/loss"])) for r in records if r.get("val/loss") is not None]
    return max(vals)[1] if vals else math.nan


def run_values(sweep_dir: Path, run: dict, keys: list[str]) -> dict[str, Any]:
    """Values of `keys` from the config the run used (its dump dir's config.yaml, else the sweep's copy)."""
    for path in (sweep_dir / run["dump_dir"] / "config.yaml", sweep_dir / run["config"]):
        if path.is_file():
            cfg = OmegaConf.load(path)
            return {k: run["params"].get(k, OmegaConf.select(cfg, k, default=None)) for k in keys}
    return {k: run["params"].get(k) for k in keys}


def panel_keys(args: ReportArgs) -> list[str]:
    """`report.panel` is one dotted key or several joined by commas (scaling.width,scaling.wd)."""
    return [k.strip() for k in args.panel.split(",") if k.strip()]


def axis_keys(manifest: dict, args: ReportArgs) -> list[str]:
    """First key of each grid axis that is not plotted (x / line / panel) nor averaged: it splits panels."""
    used = {args.x, args.line, *panel_keys(args), *args.average}
    out = []
    for run in manifest["runs"][:1]:
        groups = manifest.get("axis_keys") or [[k] for k in run["params"]]
        out = [g[0] for g in groups if not used.intersection(g)]
    return out


def gather(sweep_dir: str | os.PathLike, args: ReportArgs) -> tuple[dict, list[RunResult]]:
    """Every run of the manifest, finished or not (the statistics must know what is missing)."""
    sweep_dir = Path(sweep_dir)
    manifest = load_manifest(sweep_dir)
    keys = list(dict.fromkeys([args.x, args.line, *panel_keys(args), *args.average, *axis_keys(manifest, args)]))
    keys += [k for k in (*RULE_KEYS, *SETUP_KEYS) if k not in keys]
    states = run_states(sweep_dir, manifest)
    results = []
    for run in manifest["runs"]:
        rd = RunDir(sweep_dir / run["dump_dir"])
        records = rd.read_metrics()
        train, last = final_train_loss(records, args.last_n)
        losses = [r[k] for r in records for k in ("loss", "val/loss") if isinstance(r.get(k), (int, float))]
        exit_code = (rd.read_exit() or {}).get("code")
        state = states[run["name"]]
        diverged = any(not math.isfinite(v) for v in losses) or (
            state_kind(state) == "failed" and exit_code == EXIT_DIVERGED
        )
        res = RunResult(run["name"], state, run_values(sweep_dir, run, keys), last, train, last_val_loss(records))
        res.diverged = diverged
        if diverged:
            res.train = res.val = math.nan
        results.append(res)
    return manifest, results


# ----------------------------------------------------------------------------- panels and their statistics


def panel_label(values: dict[str, Any], args: ReportArgs, extra: list[str]) -> str:
    parts = ["/".join(str(values[k]) for k in panel_keys(args) if values.get(k) is not None)]
    parts = [p for p in parts if p]
    parts += [f"{k.rsplit('.', 1)[-1]}={values[k]}" for k in extra]
    return ", ".join(parts) or "all runs"


def x_names(x: str) -> tuple[str, str]:
    """(axis label, symbol) of the swept key: base LR / eta for optim.lr, else the key's own name."""
    return X_NAMES.get(x, (f"base {x.rsplit('.', 1)[-1]}", x.rsplit(".", 1)[-1]))


def axis_name(args: ReportArgs) -> str:
    return AXIS_NAMES.get(args.line, args.line)


def group_runs(
    results: list[RunResult], args: ReportArgs, extra: list[str], metric: str
) -> dict[str, dict[float, dict[float, list[ts.Outcome]]]]:
    """{panel: {line value: {x: [outcome per run, seeds included]}}}; every run is counted, finished or not."""
    out: dict[str, dict[float, dict[float, list[ts.Outcome]]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        x, line = r.values.get(args.x), r.values.get(args.line)
        if x is None or line is None:
            continue
        check(isinstance(line, (int, float)), "report.line", f"{args.line} must be numeric, run {r.name} has {line!r}")
        check(isinstance(x, (int, float)) and x > 0, "report.x", f"{args.x} must be positive, run {r.name} has {x!r}")
        pts = out[panel_label(r.values, args, extra)][float(line)]
        pts.setdefault(float(x), []).append(r.outcome(metric))
    return out


def base_value(results: list[RunResult], args: ReportArgs, sweep_dir: Path, manifest: dict) -> float:
    """The line value of m = 1 (d0 of m = d / d0 for widths): report.base_dim, else the runs' base of the
    line's axis (BASE_KEYS: scaling.base_dim, base_depth, base_batch), else the smallest line value."""
    if args.base_dim > 0:
        return float(args.base_dim)
    dims = set()
    key = BASE_KEYS.get(args.line)
    for run in manifest["runs"] if key else []:
        d = run_values(sweep_dir, run, [key])[key]
        if isinstance(d, (int, float)) and d > 0:
            dims.add(float(d))
    if len(dims) == 1:
        return dims.pop()
    values = [float(r.values[args.line]) for r in results if isinstance(r.values.get(args.line), (int, float))]
    return min(values) if values else 1.0


def panel_rule(results: list[RunResult], label: str, args: ReportArgs, extra: list[str]) -> Optional[str]:
    """The scaling rule of a panel (scaling.rule_name's words: sp, or mup's wd rule) if all its runs share it."""
    rules = {
        "sp" if r.values.get("scaling.width") == "sp" else str(r.values.get("scaling.wd"))
        for r in results
        if panel_label(r.values, args, extra) == label
    }
    return rules.pop() if len(rules) == 1 else None


def setup_differences(results: list[RunResult]) -> list[str]:
    """SETUP_KEYS where the sweep's runs differ from the paper's reference experiment (configs/paper/llama.yaml)."""
    paper = OmegaConf.load(PAPER_CONFIG)
    diffs = []
    for key in SETUP_KEYS:
        want = OmegaConf.select(paper, key, default=None)
        have = sorted({str(r.values.get(key)) for r in results})
        if have != [str(want)]:
            diffs.append(f"{key}={'/'.join(have)} (paper: {want})")
    return diffs


def comparable_finding(rule: Optional[str], same_setup: bool) -> Optional[ts.PaperFinding]:
    """The paper's finding for a rule, only when the sweep is the setup it comes from (App. G.3)."""
    finding = ts.paper_finding(rule) if rule and same_setup else None
    return finding if finding is not None and finding.setup.startswith("[002]") else None


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib  # noqa: PLC0415 (headless backend before pyplot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _colors(n: int) -> list:
    import matplotlib  # noqa: PLC0415

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.1 + 0.75 * i / max(1, n - 1)) for i in range(n)]


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
DPI = 120  # the saved figures' resolution (a legend placed "best" moves with it)
LINESTYLES = ("-", "--", "-.", ":")


def _log_ticks(ax: Any, which: str, values: list[float]) -> None:
    """Log scale with a labelled tick at each grid value (8e-3, not 2^-7)."""
    import matplotlib.ticker as mticker  # noqa: PLC0415

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    if values and len(values) <= 12:
        axis.set_major_locator(mticker.FixedLocator(values))
        axis.set_major_formatter(mticker.FixedFormatter([f"{v:.3g}" for v in values]))
        axis.set_minor_locator(mticker.NullLocator())
        if which == "x" and len(values) > 5:
            ax.tick_params(axis="x", labelrotation=40)


def _ylim(panels: dict[str, ts.Panel]) -> Optional[tuple[float, float]]:
    """Zoom on the optima: from the lowest mean to the 90th percentile (points above get an arrow)."""
    ys = sorted(p.mean for pan in panels.values() for ln in pan.lines for p in ln.points if math.isfinite(p.mean))
    if not ys:
        return None
    fitted = [ln.fit(ln.ln_eta) for pan in panels.values() for ln in pan.lines if ln.fit is not None]
    bars = [p.mean - p.std for pan in panels.values() for ln in pan.lines for p in ln.points if math.isfinite(p.std)]
    lo, hi = min([ys[0], *fitted, *bars]), ys[min(len(ys) - 1, int(0.9 * len(ys)))]
    pad = 0.08 * max(hi - lo, 1e-3)
    return lo - pad, hi + 3 * pad


def _line_label(ln: ts.LineOptimum, args: ReportArgs, d0: float) -> str:
    label = f"{args.line.rsplit('.', 1)[-1]}={ln.width:g} (m={ln.width / d0:g})"
    return label + (f", incomplete: {ln.n_missing} missing" if not ln.complete else "")


def plot_transfer(panels: dict[str, ts.Panel], args: ReportArgs, d0: float, ylabel: str, path: Path) -> None:
    fig = transfer_figure(panels, args, d0, ylabel)
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)


def transfer_figure(panels: dict[str, ts.Panel], args: ReportArgs, d0: float, ylabel: str) -> Any:
    """Figure 1 of the paper: loss vs base LR, a panel per rule, a line per width (mean +- seed std), the fitted
    optimum starred with its +-1 sigma, an optimum at the grid edge as a triangle, diverged points as x."""
    plt = _plt()
    names = sorted(panels)
    widths = sorted({ln.width for p in panels.values() for ln in p.lines})
    style = {
        w: (c, MARKERS[i % len(MARKERS)]) for i, (w, c) in enumerate(zip(widths, _colors(len(widths)), strict=True))
    }
    width = max(6.0, 4.6 * len(names))
    fig, axes = plt.subplots(1, len(names), figsize=(width, 4.6), sharey=True, squeeze=False)
    lim = _ylim(panels)
    for ax, name in zip(axes[0], names, strict=True):
        for ln in panels[name].lines:
            _draw_line(ax, ln, style[ln.width], lim, _line_label(ln, args, d0))
        ax.set_title(name + "\n" + textwrap.fill(_verdict_text(panels[name].shift, args), 52), fontsize=9)
        _log_ticks(ax, "x", sorted({p.lr for ln in panels[name].lines for p in ln.points}))
        ax.set_xlabel(f"{x_names(args.x)[0]} ({args.x})")
        ax.set_ylabel(ylabel)
        ax.tick_params(labelleft=True)
        ax.grid(alpha=0.3, which="both")
        # below the axes: inside, a legend of many widths covered points
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        if lim:
            ax.set_ylim(*lim)
    note = (
        "points: mean over seeds, bars +-1 std; star: fitted optimum, bar +-1 sigma; < or > beside a point: the "
        "optimum lies at or beyond that edge of the grid (a bound); x: diverged; open ^ at the top: above the "
        "plotted range; dashed, open markers: an incomplete line (no optimum marked)"
    )
    note = textwrap.fill(note, int(17 * width))
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.03 * (note.count("\n") + 1), 1, 1))
    return fig


def _draw_line(ax: Any, ln: ts.LineOptimum, style: tuple, lim: Optional[tuple], label: str) -> None:
    color, marker = style
    pts = [p for p in ln.points if math.isfinite(p.mean)]
    top = lim[1] if lim else math.inf
    shown = [p for p in pts if p.mean <= top]
    ls = "-" if ln.complete else "--"
    ax.errorbar(
        [p.lr for p in shown], [p.mean for p in shown],
        yerr=[p.std if math.isfinite(p.std) else 0.0 for p in shown],
        fmt=marker + ls, color=color, ms=5, lw=1.4, capsize=2, label=label, mfc=color if ln.complete else "white",
    )  # fmt: skip
    above = [p.lr for p in pts if p.mean > top]
    diverged = [p.lr for p in ln.points if p.n_diverged]
    if lim and above:
        ax.plot(above, [top] * len(above), "^", color=color, ms=7, mfc="white", clip_on=False)
    if lim and diverged:
        ax.plot(diverged, [top] * len(diverged), "x", color=color, ms=8, mew=2, clip_on=False)
    if not ln.complete:  # its optimum is not an estimate of anything yet: no fit, no marker
        return
    if ln.fit is not None:  # the parabola through the bracket, thin
        u = [math.log(ln.points[i].lr) for i in ln.bracket]
        grid = [u[0] + (u[2] - u[0]) * k / 40 for k in range(41)]
        ax.plot([math.exp(g) for g in grid], [ln.fit(g) for g in grid], "-", color=color, lw=0.8, alpha=0.7)
    if ln.method in ("fit", "grid"):
        y = ln.fit(ln.ln_eta) if ln.fit is not None else min(p.mean for p in pts)
        err = [[ln.eta - math.exp(ln.ln_eta - ln.sigma)], [math.exp(ln.ln_eta + ln.sigma) - ln.eta]]
        ax.errorbar([ln.eta], [y], xerr=err, fmt="*", color=color, ms=14, mec="black", mew=0.7, capsize=3, zorder=5)
    elif ln.method == "edge":
        best = next(p for p in ln.points if p.lr == ln.best_lr)
        tri, beside = ("<", 0.84) if ln.edge == "low" else (">", 1.19)  # beside the point, pointing outwards
        ax.plot([best.lr * beside], [best.mean], tri, color=color, ms=10, mec="black", mew=0.7, zorder=5)


def plot_shift(panels: dict[str, ts.Panel], args: ReportArgs, path: Path) -> None:
    fig = shift_figure(panels, args)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _plt().close(fig)


def shift_figure(panels: dict[str, ts.Panel], args: ReportArgs) -> Any:
    """eta* against m (log-log) per rule with +-1 sigma bars and the fitted slope where a verdict is given.
    Series are offset sideways by a few percent and drawn with their own marker and line style, so rules
    with identical optima (all rules coincide at m = 1) stay visible."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    names = sorted(panels)
    drawn = False
    for i, (name, color) in enumerate(zip(names, _colors(len(names)), strict=True)):
        pan, marker, ls = panels[name], MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)]
        offset = 1 + 0.04 * (i - (len(names) - 1) / 2)
        lines = [ln for ln in pan.lines if ln.ln_eta is not None]
        if not lines:
            continue
        drawn = True
        ms = [ln.width / pan.base_width * offset for ln in lines]
        label = f"{name}: {_verdict_text(pan.shift, args)}"
        usable = [(m, ln) for m, ln in zip(ms, lines, strict=True) if ln.usable]
        if usable:
            ax.errorbar(
                [m for m, _ in usable], [ln.eta for _, ln in usable],
                yerr=[[ln.eta - math.exp(ln.ln_eta - ln.sigma) for _, ln in usable],
                      [math.exp(ln.ln_eta + ln.sigma) - ln.eta for _, ln in usable]],
                fmt=marker, color=color, ms=7, capsize=3, label=label, zorder=3,
            )  # fmt: skip
            label = None
        others = [(m, ln) for m, ln in zip(ms, lines, strict=True) if not ln.usable]
        for m, ln in others:  # a bound or an unfinished line: open markers, never in the fit
            mk = {"low": "v", "high": "^"}.get(ln.edge or "", marker) if ln.complete else marker
            ax.plot([m], [ln.eta], mk, color=color, ms=8, mfc="white", label=label, zorder=3)
            label = None
        s = pan.shift
        if s.verdict is not None:
            xs = [ln.width / pan.base_width for ln in pan.lines]
            ax.plot([x * offset for x in xs], [math.exp(s.intercept) * x**s.slope for x in xs], ls, color=color, lw=1)
    widths = sorted({ln.width / pan.base_width for pan in panels.values() for ln in pan.lines})
    _log_ticks(ax, "x", widths)
    _log_ticks(ax, "y", sorted({ln.eta for pan in panels.values() for ln in pan.lines if ln.eta is not None}))
    ax.set_xlabel(f"{axis_name(args)} multiplier m = {args.line} / base")
    ax.set_ylabel("optimal {} {}*".format(*x_names(args.x)))
    ax.set_title(
        "filled: optimum with +-1 sigma; open: incomplete line, or v/^ an optimum at the\n"
        "low/high edge of the grid (a bound); series offset sideways by a few % to stay visible",
        fontsize=8,
    )
    ax.grid(alpha=0.3, which="both")
    if drawn:  # below the axes: the labels carry the verdicts and are long; inside, "best" covered a point
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.tight_layout()
    return fig


def plot_alignment(records: list[dict], name: str, path: Path) -> bool:
    """Probe metrics of one run: a panel per metric, a line per probed layer (the probe records' keys
    probe/<layer>/<metric>), one legend for the figure; identical series keep their own marker and style."""
    from lingua_wd.probes import parse_probe_key  # noqa: PLC0415 (torch only when alignment plots are asked for)

    series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in probe_records(records):
        for k, v in r.items():
            key = parse_probe_key(k)  # (layer, metric); the layer may be median/<class>
            if key is not None and isinstance(v, (int, float)):
                series[key[1]][key[0]].append((r["step"], v))
    if not series:
        return False
    plt = _plt()
    metrics = sorted(series)
    layers = sorted({layer for m in metrics for layer in series[m]})
    style = {layer: (MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)]) for i, layer in enumerate(layers)}
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows + 0.6), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, metric in zip(axes.flat, metrics, strict=False):
        same: dict[tuple, list[str]] = {}
        for i, layer in enumerate(sorted(series[metric])):
            pts = sorted(series[metric][layer])
            same.setdefault(tuple(pts), []).append(layer)
            marker, ls = style[layer]
            every = max(len(layers), len(pts) // 12)  # each layer its own phase: coinciding markers never overlap
            (h,) = ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker, ms=4,
                markevery=(i % every, every), lw=1.2 + 1.2 * (len(layers) - 1 - i) / max(1, len(layers) - 1), label=layer,
            )  # fmt: skip
            handles.setdefault(layer, h)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        groups = [g for g in same.values() if len(g) > 1]  # lines drawn on top of each other: say so
        if groups:
            note = "identical: " + "; ".join(" = ".join(g) for g in groups)
            ax.text(0.01, 0.99, textwrap.fill(note, 60), transform=ax.transAxes, fontsize=6, va="top")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.suptitle(f"{name}: probe metrics per layer", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) // 4), 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- text


def _f(v: Any, fmt: str = ".4f") -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else format(v, fmt)
    return "-" if v is None else str(v)


def axis_words(text: str, line: str, x: str) -> str:
    """transfer_stats speaks of widths and LRs (eta*); a sweep along another axis (report.line) or over another
    key (report.x, e.g. lambda) reads its own words."""
    if line != "model.dim":
        name = AXIS_NAMES.get(line, line)
        text = re.sub(r"(?<![\w.])width(s?)(?![\w.])", lambda m: name + ("s" if m.group(1) else ""), text)
    if x != "optim.lr":
        label, sym = x_names(x)
        text = re.sub(r"\bLRs?\b", label.removeprefix("base "), text).replace("eta*", f"{sym}*")
    return text


def _verdict_text(s: ts.Shift, args: ReportArgs) -> str:
    if s.verdict is None:
        return axis_words(f"verdict withheld: {s.reason}", args.line, args.x)
    return axis_words(f"{s.verdict}: slope {s.slope:+.2f} +- {s.sigma:.2f}", args.line, args.x)


def _eta_text(ln: ts.LineOptimum) -> str:
    """eta* with its 1-sigma factor (x/ exp(sigma)), or the bound at an edge."""
    if ln.eta is None:
        return "-"
    if ln.method == "edge":  # eta* beyond the worse neighbour (ln.bound), or only one finished LR
        if ln.bound is None:
            return f"~ {ln.eta:.3g} (one finished LR)"
        return f"{'<' if ln.edge == 'low' else '>'} {ln.bound:.3g} (best grid point {ln.eta:.3g})"
    return f"{ln.eta:.3g} x/ {math.exp(ln.sigma):.2f}" if ln.sigma else f"{ln.eta:.3g}"


def _point_cell(p: ts.Point, best: bool) -> str:
    if p.n_diverged:
        cell = "div" + (f" ({p.n_diverged} of {p.n + p.n_diverged + p.n_missing})" if p.n + p.n_missing else "")
    elif not math.isfinite(p.mean):
        cell = "..."
    else:
        cell = _f(p.mean) + (f" +- {p.std:.4f}" if math.isfinite(p.std) else "")
        if p.n_missing:
            cell += f" ({p.n_missing} ...)"
    return f"**{cell}**" if best else cell


def loss_table(pan: ts.Panel, args: ReportArgs) -> list[str]:
    """Loss per line x LR: mean +- std over the finished seeds, `...` not finished, `div` diverged."""
    xs = sorted({p.lr for ln in pan.lines for p in ln.points})
    out = [f"| {args.line} \\ {args.x} | " + " | ".join(f"{x:.3g}" for x in xs) + " |", "|" + " --- |" * (len(xs) + 1)]
    for ln in pan.lines:
        by_lr = {p.lr: p for p in ln.points}
        cells = [_point_cell(by_lr[x], x == ln.best_lr) if x in by_lr else "" for x in xs]
        out.append(f"| {ln.width:g} | " + " | ".join(cells) + " |")
    return out


def panel_section(name: str, pan: ts.Panel, args: ReportArgs, finding: Optional[ts.PaperFinding]) -> list[str]:
    s = pan.shift
    md = ["", f"### {name}", ""]
    if s.verdict is None:
        md.append(f"**Verdict withheld**: {s.reason}.")
    else:
        md.append(f"**{s.verdict}**: {s.reason} (1 sigma {s.sigma:.3f}).")
    if finding is not None:
        slope = f", expected slope {finding.slope:+.2f}" if finding.slope is not None else ""
        md.append(f"The paper, same setup: **{finding.verdict}**{slope}. {finding.text} ({finding.source})")
    md += [
        "",
        f"| {args.line} | m | status | eta* (x/ 1 sigma) | best grid LR | loss there | how | regret at base eta* |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ln, rg in zip(pan.lines, pan.regret, strict=True):
        best = next((p for p in ln.points if p.lr == ln.best_lr), None)
        regret = _f(rg.regret) + (f" +- {rg.sigma:.4f}" if rg.sigma else "") if rg.regret is not None else "-"
        regret += f" ({rg.note})" if rg.note else ""
        md.append(
            f"| {ln.width:g} | {ln.width / pan.base_width:g} | {ln.status} | {_eta_text(ln)} | "
            f"{_f(ln.best_lr, '.3g')} | {_f(best.mean) if best else '-'} | {ln.note} | {regret} |"
        )
    return [axis_words(line, args.line, args.x) for line in md] + ["", *loss_table(pan, args)]


def runs_table(results: list[RunResult]) -> list[str]:
    md = ["", "## Runs", "", "| run | state | last step | train loss | val loss |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        state = f"diverged ({r.state})" if r.diverged and state_kind(r.state) != "done" else r.state
        state = "done, diverged" if r.diverged and state_kind(r.state) == "done" else state
        md.append(f"| {r.name} | {state} | {r.last_step} | {_f(r.train)} | {_f(r.val)} |")
    return md


def panel_json(pan: ts.Panel, finding: Optional[ts.PaperFinding]) -> dict:
    lines = []
    for ln in pan.lines:
        d = {k: v for k, v in asdict(ln).items() if k not in ("fit", "points")}
        d |= {"m": ln.width / pan.base_width, "status": ln.status, "eta": ln.eta, "complete": ln.complete}
        d["eta_text"] = _eta_text(ln)
        d["points"] = [asdict(p) for p in ln.points]
        lines.append(d)
    return {
        "base": pan.base_width,
        "lines": lines,
        "shift": asdict(pan.shift),
        "regret": [asdict(r) for r in pan.regret],
        "paper": asdict(finding) if finding else None,
    }


# ----------------------------------------------------------------------------- the report


def write_report(sweep_dir: Path, out: Path, manifest: dict, results: list[RunResult], args: ReportArgs) -> dict:
    extra = axis_keys(manifest, args)
    d0 = base_value(results, args, sweep_dir, manifest)
    counts: dict[str, int] = defaultdict(int)
    for r in results:
        counts["diverged" if r.diverged else state_kind(r.state)] += 1
    diffs = setup_differences(results)
    md = [axis_words(f"# LR transfer: sweep `{manifest['name']}`", args.line, args.x), ""]
    md.append(f"{len(results)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".")
    md += [
        "",
        axis_words(
            f"Multiplier m = {args.line} / {d0:g}. Final train loss = mean training loss of the last {args.last_n} steps "
            "(the paper takes the last 100); val = last validation loss. Seeds are averaged (mean +- sample std). The optimum "
            "of a line is the vertex of a parabola in ln LR through its best finished point and the neighbours, with "
            "its uncertainty from the seeds' spread (one seed: the grid cell); a line with unfinished runs is "
            "*incomplete*, an optimum at the edge of the finished LRs is only a bound (*at grid edge*), and neither "
            "enters a verdict. Verdicts compare the 2-sigma interval of the slope of ln eta* vs ln m with "
            f"+-{args.tol:g}. Regret: the loss at each {axis_name(args)} at the LR picked at m = 1, minus the best "
            "loss there (lingua_wd/transfer_stats.py).",
            args.line,
            args.x,
        ),
        "",
        "This sweep is the paper's setup (App. G.3): its findings are shown next to the measured ones."
        if not diffs
        else "Not the paper's setup (App. G.3), so its findings are not compared: " + "; ".join(diffs) + ".",
    ]
    summary: dict[str, Any] = {"sweep": manifest["name"], "base": d0, "line": args.line, "x": args.x}
    summary["last_n"] = args.last_n
    summary |= {"tol": args.tol, "paper_setup": not diffs, "setup_differences": diffs, "metrics": {}}
    for metric in ("train", "val"):
        grouped = group_runs(results, args, extra, metric)
        panels = {name: ts.analyse_panel(lines, d0, args.tol) for name, lines in sorted(grouped.items())}
        if not any(p.n for pan in panels.values() for ln in pan.lines for p in ln.points):
            continue  # no run has this metric (e.g. no validation set)
        ylabel = METRICS[metric].format(n=args.last_n)
        plot_transfer(panels, args, d0, ylabel, out / f"transfer_{metric}.png")
        plot_shift(panels, args, out / f"shift_{metric}.png")
        md += ["", f"## {ylabel}", "", f"![{metric}](transfer_{metric}.png)", ""]
        md += [f"![optimum vs {axis_name(args)}](shift_{metric}.png)"]
        summary["metrics"][metric] = {}
        for name, pan in panels.items():
            finding = comparable_finding(panel_rule(results, name, args, extra), not diffs)
            md += panel_section(name, pan, args, finding)
            summary["metrics"][metric][name] = panel_json(pan, finding)
    md += runs_table(results)
    for name in args.alignment_runs:
        run = next((r for r in manifest["runs"] if r["name"] == name), None)
        check(run is not None, "report.alignment_runs", f"no run named {name}")
        png = f"alignment_{name}.png"
        md += ["", f"## Alignment probes: {name}", ""]
        if plot_alignment(RunDir(sweep_dir / run["dump_dir"]).read_metrics(), name, out / png):
            md.append(f"![alignment {name}]({png})")
        else:
            md.append("(no probe records: enable probes in the run config)")
    summary["runs"] = [asdict(r) for r in results]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def report(sweep_dir: str | os.PathLike, args: Optional[ReportArgs] = None, out_dir: Optional[str] = None) -> dict:
    """Gather, analyse, plot and write report.md; returns the summary that report.json holds."""
    sweep_dir = Path(sweep_dir)
    args = args or report_args(sweep_dir, [])
    check(args.tol > 0, "report.tol", f"must be > 0, got {args.tol}")
    manifest, results = gather(sweep_dir, args)
    out = Path(out_dir) if out_dir else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    return write_report(sweep_dir, out, manifest, results, args)


def report_args(sweep_dir: Path, dotlist: list[str]) -> ReportArgs:
    """ReportArgs defaults <- the sweep's `report:` section <- `key=value` items."""
    return parse_args(ReportArgs, dotlist, base=[saved_report_section(sweep_dir)])


def saved_report_section(sweep_dir: Path) -> dict:
    saved = sweep_dir / "sweep.yaml"
    return OmegaConf.to_container(OmegaConf.load(saved).get("report") or {}) if saved.is_file() else {}


@dataclass
class ReportCommand(ReportArgs):
    sweep_dir: str = ""  # the sweep directory (its manifest.json, runs/ and sweep.yaml)
    out_dir: str = ""  # where report.md, report.json and the figures go ("" = the sweep dir)


def console_lines(summary: dict) -> list[str]:
    """Per metric and panel: the verdict or why it is withheld, then each line's optimum and status."""
    out = []
    for metric, panels in summary["metrics"].items():
        for name, pan in panels.items():
            s = pan["shift"]
            if s["verdict"] is None:
                head = f"verdict withheld: {s['reason']}"
            else:
                head = f"{s['verdict']}: {s['reason']}"
            out.append(f"[report] {metric:5s} {name}: {head}")
            for ln in pan["lines"]:
                out.append(
                    f"[report]       {ln['width']:g} (m={ln['m']:g}): eta* {ln['eta_text']} [{ln['status']}; {ln['note']}]"
                )
            if pan["paper"]:
                out.append(f"[report]       the paper (same setup): {pan['paper']['verdict']}")
    return [axis_words(line, summary["line"], summary.get("x", "optim.lr")) for line in out]


def _main(args: ReportCommand) -> int:
    check(bool(args.sweep_dir), "sweep_dir", "give the sweep directory: lingua-wd report SWEEP_DIR")
    fields_ = {k: v for k, v in args.__dict__.items() if k not in ("sweep_dir", "out_dir")}
    summary = report(args.sweep_dir, ReportArgs(**fields_), args.out_dir or None)
    print("\n".join(console_lines(summary)))
    print(f"[report] wrote {Path(args.out_dir or args.sweep_dir) / 'report.md'}")
    return 0


USAGE = """usage: lingua-wd report SWEEP_DIR [key=value ...] [out_dir=DIR]
  keys default to the sweep's `report:` section, e.g.
  lingua-wd report dumps/sweeps/cpu_small last_n=20 'alignment_runs=[d64_lr4e-3_mup]'"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE)
        return 2
    first = next((a for a in argv if "=" not in a and not a.startswith("-")), "")
    base = [saved_report_section(Path(first))] if first else []
    return run_cli(argv, ReportCommand, _main, USAGE, __doc__, positional=("sweep_dir",), base=base)


if __name__ == "__main__":
    sys.exit(main())
