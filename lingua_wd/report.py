"""LR-transfer report of a sweep: `lingua-wd report SWEEP_DIR [key=value ...]`.

For every run: the final training loss (mean over the last N steps, as the paper reports it, App. G.3)
and the last validation loss. Then, per panel (WD mode) and line (width, or any numeric key: depth, batch,
steps): loss against base LR with the optimum marked (Figure 1 of the paper), and how the optimum moves
with the multiplier m = line / base: the slope of ln eta* against ln m. A slope of 0 means the LR transfers. The optimum is only known to within the
grid: a grid step of Delta in ln eta gives each eta* an error uniform over +-Delta/2, i.e. a standard
deviation of Delta/sqrt(12), which propagates to the slope as Delta/sqrt(12) / sqrt(sum (ln m - mean)^2).
Writes report.md, report.json and PNG figures into the sweep dir (or `out_dir`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from lingua_wd.args import check, parse_args, run_cli
from lingua_wd.rundir import RunDir, read_metrics
from lingua_wd.sweep import ReportArgs, load_manifest, run_state

METRICS = {"train": "final train loss (mean of last {n} steps)", "val": "final validation loss"}
X_NAMES = {"optim.lr": ("base LR", "eta"), "optim.weight_decay": ("base weight decay", "lambda")}  # x -> plot names
# line key -> the runs' key holding the line value of m = 1 (other numeric lines: their smallest value)
BASE_KEYS = {
    "model.dim": "scaling.base_dim",
    "model.n_layers": "scaling.base_depth",
    "data.batch_size": "scaling.base_batch",
}


@dataclass
class RunResult:
    name: str
    state: str  # new | started | resume | done
    values: dict[str, Any]  # report keys (x, line, panel, averaged, other axes) -> value from the run's config
    last_step: int = 0  # last logged training step
    train: float = math.nan  # mean training loss over the last N steps
    val: float = math.nan  # last validation loss
    diverged: bool = False  # a non-finite loss was logged


# ----------------------------------------------------------------------------- reading runs


def final_train_loss(records: list[dict], last_n: int) -> tuple[float, int]:
    """Mean training loss over the steps (last - last_n, last]; returns (loss, last step).

    Each record's "loss" averages the steps since the previous record, so it is weighted by how many of
    its steps fall in the window; a step logged twice (re-logged after a resume) counts once, the newest.
    """
    by_step = {int(r["step"]): float(r["loss"]) for r in records if "loss" in r and "step" in r}
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


def axis_keys(manifest: dict, args: ReportArgs) -> list[str]:
    """First key of each grid axis that is not plotted (x / line / panel) nor averaged: it splits panels."""
    used = {args.x, args.line, *panel_keys(args), *args.average}
    out = []
    for run in manifest["runs"][:1]:
        groups = manifest.get("axis_keys") or [[k] for k in run["params"]]
        out = [g[0] for g in groups if not used.intersection(g)]
    return out


def gather(sweep_dir: str | os.PathLike, args: ReportArgs) -> tuple[dict, list[RunResult]]:
    sweep_dir = Path(sweep_dir)
    manifest = load_manifest(sweep_dir)
    keys = [args.x, args.line, *panel_keys(args), *args.average, *axis_keys(manifest, args)]
    results = []
    for run in manifest["runs"]:
        dump = sweep_dir / run["dump_dir"]
        records = RunDir(dump).read_metrics()
        train, last = final_train_loss(records, args.last_n)
        losses = [r[k] for r in records for k in ("loss", "val/loss") if isinstance(r.get(k), (int, float))]
        diverged = any(not math.isfinite(v) for v in losses)
        res = RunResult(
            run["name"], run_state(dump), run_values(sweep_dir, run, keys), last, train, last_val_loss(records)
        )
        res.diverged = diverged
        if diverged:
            res.train = res.val = math.nan
        results.append(res)
    return manifest, results


# ----------------------------------------------------------------------------- optimum and its shift


@dataclass
class Curve:
    panel: str
    width: Any
    xs: list[float]  # every x tried (sorted)
    ys: list[float]  # mean metric over the finished runs at x (nan: diverged or none finished)
    status: list[str] = field(default_factory=list)  # per x: ok | div (a run diverged) | missing (none finished)


def panel_keys(args: ReportArgs) -> list[str]:
    """`report.panel` is one dotted key or several joined by commas (scaling.width,scaling.wd)."""
    return [k.strip() for k in args.panel.split(",") if k.strip()]


def panel_label(values: dict[str, Any], args: ReportArgs, extra: list[str]) -> str:
    parts = ["/".join(str(values[k]) for k in panel_keys(args) if values.get(k) is not None)]
    parts = [p for p in parts if p]
    parts += [f"{k.rsplit('.', 1)[-1]}={values[k]}" for k in extra]
    return ", ".join(parts) or "all runs"


def build_curves(results: list[RunResult], args: ReportArgs, extra: list[str], metric: str) -> list[Curve]:
    """One curve per (panel, width): metric against x, averaged over the `average` keys (seeds).

    A diverged seed makes the point diverged (never an optimum); unfinished runs are left out.
    """
    acc: dict[tuple[str, Any], dict[float, list[Optional[float]]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        x = r.values.get(args.x)
        if x is None:
            continue
        key = (panel_label(r.values, args, extra), r.values.get(args.line))
        v = getattr(r, metric)
        acc[key][float(x)].append(math.nan if r.diverged else (v if r.state == "done" and math.isfinite(v) else None))
    curves = []
    for (panel, width), pts in acc.items():
        c = Curve(panel, width, sorted(pts), [], [])
        for x in c.xs:
            vals = [v for v in pts[x] if v is not None]
            div = any(not math.isfinite(v) for v in vals)
            c.ys.append(math.nan if div or not vals else sum(vals) / len(vals))
            c.status.append("div" if div else "ok" if vals else "missing")
        curves.append(c)
    return sorted(curves, key=lambda c: (c.panel, _sort_key(c.width)))


def _sort_key(v: Any) -> tuple:
    return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))


def optimum(c: Curve) -> Optional[dict]:
    """Grid argmin of the curve; `edge` when it is the smallest or largest x tried (eta* may lie outside)."""
    finite = [i for i, y in enumerate(c.ys) if math.isfinite(y)]
    if not finite:
        return None
    i = min(finite, key=lambda j: c.ys[j])
    return {"x": c.xs[i], "loss": c.ys[i], "index": i, "edge": i in (0, len(c.xs) - 1) and len(c.xs) > 1}


def grid_step(xs: list[float]) -> float:
    """Median spacing of the grid in ln x (ln 2 for LRs by factors of 2)."""
    logs = sorted({math.log(x) for x in xs if x > 0})
    diffs = sorted(b - a for a, b in zip(logs, logs[1:], strict=False))
    return diffs[len(diffs) // 2] if diffs else math.nan


def fit_shift(ms: list[float], etas: list[float], step: float) -> dict:
    """Least-squares slope of ln eta* against ln m, with its uncertainty from the grid spacing.

    Each ln eta* carries a quantization error uniform on +-step/2 (std step/sqrt(12)); the slope's std is
    that over sqrt(sum (ln m - mean ln m)^2). With three or more widths the residual standard error is
    reported too. Slope 0: the optimal base LR transfers; -1: it moves like 1/m.
    """
    x = [math.log(m) for m in ms]
    y = [math.log(e) for e in etas]
    n = len(x)
    if n < 2:
        return {"slope": math.nan, "sigma_grid": math.nan, "sigma_resid": math.nan, "intercept": math.nan, "n": n}
    xm, ym = sum(x) / n, sum(y) / n
    sxx = sum((a - xm) ** 2 for a in x)
    if sxx == 0:
        return {"slope": math.nan, "sigma_grid": math.nan, "sigma_resid": math.nan, "intercept": math.nan, "n": n}
    slope = sum((a - xm) * (b - ym) for a, b in zip(x, y, strict=False)) / sxx
    intercept = ym - slope * xm
    resid = [b - (intercept + slope * a) for a, b in zip(x, y, strict=False)]
    sigma_resid = math.sqrt(sum(r * r for r in resid) / (n - 2) / sxx) if n > 2 else math.nan
    sigma_grid = step / math.sqrt(12) / math.sqrt(sxx)
    return {"slope": slope, "sigma_grid": sigma_grid, "sigma_resid": sigma_resid, "intercept": intercept, "n": n}


def base_width(results: list[RunResult], args: ReportArgs, sweep_dir: Path, manifest: dict) -> float:
    """The line value of m = 1 (d0 of m = d / d0 for widths): report.base_dim, else the runs' base of the line's
    axis (BASE_KEYS: scaling.base_dim, base_depth, base_batch), else the smallest line value."""
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
    widths = [float(r.values[args.line]) for r in results if isinstance(r.values.get(args.line), (int, float))]
    return min(widths) if widths else 1.0


def analyse(curves: list[Curve], d0: float) -> dict[str, dict]:
    """Per panel: the optimum of each width and the fitted shift of ln eta* with ln m."""
    out: dict[str, dict] = {}
    for c in curves:
        p = out.setdefault(c.panel, {"optima": [], "xs": set()})
        p["xs"].update(c.xs)
        opt = optimum(c)
        if opt is not None:
            m = float(c.width) / d0 if isinstance(c.width, (int, float)) else math.nan
            p["optima"].append({"width": c.width, "m": m, **opt})
    for p in out.values():
        step = grid_step(sorted(p.pop("xs")))
        pts = [o for o in p["optima"] if math.isfinite(o["m"])]
        p["grid_step_ln"] = step
        p["fit"] = fit_shift([o["m"] for o in pts], [o["x"] for o in pts], step)
        p["any_edge"] = any(o["edge"] for o in pts)
    return out


def verdict(fit: dict, any_edge: bool, line: str = "model.dim") -> str:
    """Judged against the grid uncertainty alone: with few widths the residual error is itself too noisy."""
    s, sg = fit["slope"], fit["sigma_grid"]
    axis = "width" if line == "model.dim" else line
    if not math.isfinite(s):
        return "needs two widths" if axis == "width" else f"needs two values of {axis}"
    text = (
        "transfers (slope within 2 sigma_grid of 0)"
        if abs(s) <= 2 * sg
        else f"shifts with {axis} (slope beyond 2 sigma_grid)"
    )
    return text + ("; an optimum is at the grid edge" if any_edge else "")


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib  # noqa: PLC0415 (headless backend before pyplot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _colors(n: int) -> list:
    import matplotlib  # noqa: PLC0415

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.15 + 0.7 * i / max(1, n - 1)) for i in range(n)]


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


def plot_transfer(curves: list[Curve], analysis: dict, args: ReportArgs, d0: float, ylabel: str, path: Path) -> None:
    """Figure 1 of the paper: loss vs base LR, a panel per WD mode, a line per width, optima starred."""
    plt = _plt()
    panels = sorted({c.panel for c in curves})
    widths = sorted({c.width for c in curves}, key=_sort_key)
    colors = dict(zip(widths, _colors(len(widths)), strict=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    finite = sorted(y for c in curves for y in c.ys if math.isfinite(y))
    for ax, panel in zip(axes[0], panels, strict=False):
        for c in [c for c in curves if c.panel == panel]:
            m = f" (m={float(c.width) / d0:g})" if isinstance(c.width, (int, float)) else ""
            ax.plot(
                c.xs,
                c.ys,
                "o-",
                color=colors[c.width],
                ms=4,
                lw=1.5,
                label=f"{args.line.rsplit('.', 1)[-1]}={c.width}{m}",
            )
            bad = [x for x, s in zip(c.xs, c.status, strict=False) if s == "div"]
            if bad and finite:
                ax.plot(bad, [finite[-1]] * len(bad), "x", color=colors[c.width], ms=7)
            opt = optimum(c)
            if opt is not None:
                ax.plot([opt["x"]], [opt["loss"]], "*", color=colors[c.width], ms=15, mec="black", mew=0.8, zorder=5)
        fit = analysis[panel]["fit"]
        slope = (
            ""
            if not math.isfinite(fit["slope"])
            else f"\nslope ln {x_names(args.x)[1]}*/ln m = {fit['slope']:+.2f} ± {fit['sigma_grid']:.2f}"
        )
        ax.set_title(f"{panel}{slope}", fontsize=10)
        _log_ticks(ax, "x", sorted({x for c in curves if c.panel == panel for x in c.xs}))
        ax.set_xlabel(f"{x_names(args.x)[0]} ({args.x})")
        ax.grid(alpha=0.3, which="both")
    if finite:
        lo, hi = finite[0], finite[min(len(finite) - 1, int(0.9 * len(finite)))]
        pad = 0.06 * max(hi - lo, 1e-3)
        axes[0][0].set_ylim(lo - pad, hi + 3 * pad)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def x_names(x: str) -> tuple[str, str]:
    """(axis label, symbol) of the swept key: base LR / eta for optim.lr, else the key's own name."""
    return X_NAMES.get(x, (f"base {x.rsplit('.', 1)[-1]}", x.rsplit(".", 1)[-1]))


def plot_shift(analysis: dict, path: Path, line: str = "model.dim", x: str = "optim.lr") -> None:
    """eta* against m (log-log) per panel with the fitted line; bars are +-half a grid step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for color, (panel, p) in zip(_colors(len(analysis)), sorted(analysis.items()), strict=False):
        pts = [o for o in p["optima"] if math.isfinite(o["m"])]
        if not pts:
            continue
        ms, etas = [o["m"] for o in pts], [o["x"] for o in pts]
        half = math.exp(p["grid_step_ln"] / 2) if math.isfinite(p["grid_step_ln"]) else 1.0
        err = [[e - e / half for e in etas], [e * half - e for e in etas]]
        fit = p["fit"]
        label = panel if not math.isfinite(fit["slope"]) else f"{panel}: {fit['slope']:+.2f} ± {fit['sigma_grid']:.2f}"
        ax.errorbar(ms, etas, yerr=err, fmt="o", color=color, capsize=3, label=label)
        edge = [o for o in pts if o["edge"]]  # open markers: eta* at the grid edge, the true optimum may lie beyond
        ax.plot([o["m"] for o in edge], [o["x"] for o in edge], "o", mfc="white", mec=color, ms=8, zorder=4)
        if math.isfinite(fit["slope"]):
            ax.plot(ms, [math.exp(fit["intercept"]) * m ** fit["slope"] for m in ms], "-", color=color, lw=1)
    _log_ticks(ax, "x", sorted({o["m"] for p in analysis.values() for o in p["optima"] if math.isfinite(o["m"])}))
    _log_ticks(ax, "y", sorted({o["x"] for p in analysis.values() for o in p["optima"]}))
    ax.set_xlabel("width multiplier m" if line == "model.dim" else f"multiplier m = {line} / base")
    label, sym = x_names(x)
    ax.set_title(f"open markers: {sym}* at the edge of the grid", fontsize=9)
    ax.set_ylabel(f"optimal {label} {sym}*")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_alignment(records: list[dict], name: str, path: Path) -> bool:
    """Probe metrics of one run: a panel per metric, a line per probed layer (keys probe/<layer>/<metric>)."""
    from lingua_wd.probes import parse_probe_key  # noqa: PLC0415 (torch only when alignment plots are asked for)

    series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for k, v in r.items():
            key = parse_probe_key(k)  # (layer, metric); the layer may be median/<class>
            if key is not None and isinstance(v, (int, float)):
                series[key[1]][key[0]].append((r["step"], v))
    if not series:
        return False
    plt = _plt()
    metrics = sorted(series)
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for layer, pts in sorted(series[metric].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) < 30 else "-", ms=3, lw=1.2, label=layer)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- report.md


def _f(v: Any, fmt: str = ".4f") -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else format(v, fmt)
    return "-" if v is None else str(v)


def loss_table(curves: list[Curve], panel: str, args: ReportArgs) -> list[str]:
    cs = [c for c in curves if c.panel == panel]
    xs = sorted({x for c in cs for x in c.xs})
    lines = [f"| {args.line} \\ {args.x} | " + " | ".join(f"{x:.3g}" for x in xs) + " |"]
    lines.append("|" + " --- |" * (len(xs) + 1))
    for c in cs:
        opt = optimum(c)
        cells = []
        for x in xs:
            if x not in c.xs:
                cells.append("")
                continue
            i = c.xs.index(x)
            cell = {"ok": _f(c.ys[i]), "div": "div", "missing": "..."}[c.status[i]]
            cells.append(f"**{cell}**" if opt and x == opt["x"] else cell)
        lines.append(f"| {c.width} | " + " | ".join(cells) + " |")
    return lines


def write_report(sweep_dir: Path, out: Path, manifest: dict, results: list[RunResult], args: ReportArgs) -> dict:
    extra = axis_keys(manifest, args)
    d0 = base_width(results, args, sweep_dir, manifest)
    states = defaultdict(int)
    for r in results:
        states["diverged" if r.diverged else r.state] += 1
    md = [f"# LR transfer: sweep `{manifest['name']}`", ""]
    md.append(f"{len(results)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(states.items())) + ".")
    md.append(
        f"Multiplier m = {args.line} / {d0:g}. Final train loss = mean training loss of the last {args.last_n} "
        "steps (the paper's measure); val = last validation loss. Unfinished runs are left out (`...`); diverged runs "
        "(a non-finite loss) are marked x / `div` and never count as an optimum. The slope of ln eta* against ln m is "
        "0 when the optimal base LR transfers; its `+- grid` is the error from locating eta* on the grid alone."
    )
    summary: dict[str, Any] = {"sweep": manifest["name"], "base_dim": d0, "last_n": args.last_n, "metrics": {}}
    for metric in ("train", "val"):
        curves = build_curves(results, args, extra, metric)
        if not any(math.isfinite(y) for c in curves for y in c.ys):
            continue
        analysis = analyse(curves, d0)
        png = f"transfer_{metric}.png"
        ylabel = METRICS[metric].format(n=args.last_n)
        plot_transfer(curves, analysis, args, d0, ylabel, out / png)
        plot_shift(analysis, out / f"shift_{metric}.png", args.line, args.x)
        md += ["", f"## {ylabel}", "", f"![{metric}]({png})", "", f"![optimum vs width](shift_{metric}.png)", ""]
        md += [
            "| panel | slope of ln eta* vs ln m | +- grid | +- residual | widths | verdict |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for panel, p in sorted(analysis.items()):
            f = p["fit"]
            md.append(
                f"| {panel} | {_f(f['slope'], '+.3f')} | {_f(f['sigma_grid'], '.3f')} | {_f(f['sigma_resid'], '.3f')} | {f['n']} | {verdict(f, p['any_edge'], args.line)} |"
            )
        md += [
            "",
            "Optimum per width:",
            "",
            f"| panel | {args.line} | m | eta* | {metric} loss at eta* | at grid edge |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for panel, p in sorted(analysis.items()):
            for o in p["optima"]:
                md.append(
                    f"| {panel} | {o['width']} | {_f(o['m'], 'g')} | {o['x']:.4g} | {o['loss']:.4f} | {'yes' if o['edge'] else ''} |"
                )
        for panel in sorted(analysis):
            md += ["", f"{metric} loss, {panel} (optimum in bold):", "", *loss_table(curves, panel, args)]
        summary["metrics"][metric] = {k: {**v, "optima": v["optima"]} for k, v in analysis.items()}
    md += ["", "## Runs", "", "| run | state | last step | train loss | val loss |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        state = "diverged" if r.diverged else r.state
        md.append(f"| {r.name} | {state} | {r.last_step} | {_f(r.train)} | {_f(r.val)} |")
    for name in args.alignment_runs:
        run = next((r for r in manifest["runs"] if r["name"] == name), None)
        check(run is not None, "report.alignment_runs", f"no run named {name}")
        png = f"alignment_{name}.png"
        if plot_alignment(read_metrics(sweep_dir / run["dump_dir"] / "metrics.jsonl"), name, out / png):
            md += ["", f"## Alignment probes: {name}", "", f"![alignment {name}]({png})"]
        else:
            md += [
                "",
                f"## Alignment probes: {name}",
                "",
                "(no probe/* metrics logged: enable probes in the run config)",
            ]
    summary["runs"] = [r.__dict__ for r in results]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def report(sweep_dir: str | os.PathLike, args: Optional[ReportArgs] = None, out_dir: Optional[str] = None) -> dict:
    """Gather, analyse, plot and write report.md; returns the summary that report.json holds."""
    sweep_dir = Path(sweep_dir)
    args = args or report_args(sweep_dir, [])
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


def _main(args: ReportCommand) -> int:
    check(bool(args.sweep_dir), "sweep_dir", "give the sweep directory: lingua-wd report SWEEP_DIR")
    fields_ = {k: v for k, v in args.__dict__.items() if k not in ("sweep_dir", "out_dir")}
    summary = report(args.sweep_dir, ReportArgs(**fields_), args.out_dir or None)
    for metric, panels in summary["metrics"].items():
        for panel, p in sorted(panels.items()):
            opts = ", ".join(f"{o['width']}: {o['x']:.3g}" for o in p["optima"])
            f = p["fit"]
            print(
                f"[report] {metric:5s} {panel}: eta* {opts}; slope {_f(f['slope'], '+.3f')} +- {_f(f['sigma_grid'], '.3f')}"
            )
    print(f"[report] wrote {Path(args.out_dir or args.sweep_dir) / 'report.md'}")
    return 0


USAGE = """usage: lingua-wd report SWEEP_DIR [key=value ...] [out_dir=DIR]
  keys default to the sweep's `report:` section, e.g.
  lingua-wd report dumps/sweeps/cpu_small last_n=20 'alignment_runs=[d64_lr4e-3_independent]'"""


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
