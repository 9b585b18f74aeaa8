"""Figures of examples/resnet_digits.py from its runs/*.jsonl (App. D of seeds/002 at small scale):
- lr_transfer.png (Figure 10): final train loss, validation loss and validation error vs the base LR, one line
  per width (mean over seeds, bars from the lowest to the highest seed), one column per WD rule;
- rrc_widths.png (Figure 11): relative update, alignment ratio and relative representation change of the
  probed layer over time at one base LR, one line per width, one row per WD rule;
- alignment_time.png (Figure 12): weight alignment, update alignment and alignment ratio over time, one line
  per width, one row per WD rule (dotted: 1/sqrt(C), the weight alignment of a random W).
Only finished runs are drawn; a point missing from the grid is missing from the plot.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

FINALS = [("train_loss", "train loss (final weights)", True), ("val_loss", "validation loss", True),
          ("val_err", "validation error (%)", False)]  # fmt: skip
RRC_PANELS = [("rel_update", "relative update ||dW||/||W||"), ("align_ratio", "alignment ratio"),
              ("rrc", "rel. representation change")]  # fmt: skip
ALIGN_PANELS = [("weight_align", "weight alignment"), ("update_align", "update alignment"),
                ("align_ratio", "alignment ratio")]  # fmt: skip


def load_runs(out_dir: str | Path, config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One dict per finished run trained with `config` (None: any): its header fields, `final` (the last
    record) and `curve` (the log records)."""
    runs = []
    for path in sorted((Path(out_dir) / "runs").glob("*.jsonl")):
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not recs or not recs[-1].get("final") or (config is not None and recs[0].get("config") != config):
            continue
        final = dict(recs[-1])
        final["val_err"] = 100.0 * (1.0 - final["val_acc"])
        runs.append({**recs[0], "final": final, "curve": recs[1:-1]})
    return runs


def _colors(widths: list[float]) -> dict[float, Any]:
    cmap = plt.get_cmap("viridis")
    return {w: cmap(0.15 + 0.7 * i / max(1, len(widths) - 1)) for i, w in enumerate(widths)}


def _finite(v: Any) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else float("nan")


def best_lr(runs: list[dict], wd: str, width: float, key: str = "train_loss") -> float | None:
    """The base LR with the lowest seed-mean `key` among the finished runs of (wd, width)."""
    by_lr = defaultdict(list)
    for r in runs:
        if r["wd"] == wd and r["width"] == width:
            by_lr[r["lr"]].append(_finite(r["final"][key]))
    means = {lr: np.mean(v) for lr, v in by_lr.items() if np.isfinite(np.mean(v))}
    return min(means, key=means.get) if means else None


def plot_lr_transfer(runs: list[dict], path: Path) -> Path:
    wds = sorted({r["wd"] for r in runs}, key=["standard", "independent"].index)
    widths = sorted({r["width"] for r in runs})
    colors = _colors(widths)
    grid = sorted({r["lr"] for r in runs})
    fig, axes = plt.subplots(len(FINALS), len(wds), figsize=(4.6 * len(wds), 3.0 * len(FINALS)), squeeze=False,
                             sharex=True, sharey="row")  # fmt: skip
    for col, wd in enumerate(wds):
        for row, (key, label, log) in enumerate(FINALS):
            ax = axes[row][col]
            for w in widths:
                by_lr = defaultdict(list)
                for r in runs:
                    if r["wd"] == wd and r["width"] == w:
                        by_lr[r["lr"]].append(_finite(r["final"][key]))
                lrs = sorted(by_lr)
                vals = [np.array(by_lr[lr]) for lr in lrs]
                mean = np.array([v.mean() for v in vals])
                lo, hi = mean - np.array([v.min() for v in vals]), np.array([v.max() for v in vals]) - mean
                n = max(len(v) for v in vals)
                ax.errorbar(lrs, mean, yerr=[lo, hi], color=colors[w], marker="o", ms=3, capsize=2,
                            label=f"{w:g}x (n={n})")  # fmt: skip
                if np.isfinite(mean).any():
                    i = int(np.nanargmin(mean))
                    ax.plot(lrs[i], mean[i], marker="*", ms=12, color=colors[w], mec="k", mew=0.5, zorder=5)
            ax.set_xscale("log", base=2)
            ax.set_xticks(grid, [f"{lr:g}" for lr in grid], rotation=45, fontsize=8)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            if row == 0:
                ax.set_title(f"muP, {wd} WD")
            if row == len(FINALS) - 1:
                ax.set_xlabel("base LR (at the base width)")
            if col == 0:
                ax.set_ylabel(label)
    axes[0][-1].legend(title="width", fontsize=8)
    fig.suptitle("ResNet on digits: LR transfer (star: best LR per width)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curves(runs: list[dict], wd: str, width: float, lr: float, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the seed-mean of probe/<layer>/<metric> for one (wd, width, lr)."""
    series = []
    for r in runs:
        if (r["wd"], r["width"], r["lr"]) != (wd, width, lr):
            continue
        pts = {c["step"]: _finite(v) for c in r["curve"] for k, v in c.items() if k.endswith(f"/{metric}")
               and k.startswith("probe/") and "/median/" not in k}  # fmt: skip
        series.append(pts)
    steps = sorted(set().union(*series)) if series else []
    vals = np.array([np.nanmean([s.get(t, np.nan) for s in series]) for t in steps]) if steps else np.array([])
    return np.array(steps), vals


def plot_over_time(
    runs: list[dict], lr: float, panels: list[tuple[str, str]], path: Path, title: str, log_steps: bool = False
) -> Path:
    """One row per WD rule, one column per metric, one line per width; the y range is set by the first 85% of
    the run (the cosine decay to 0 sends the updates to 0 at the end; those points are still drawn)."""
    wds = sorted({r["wd"] for r in runs}, key=["standard", "independent"].index)
    widths = sorted({r["width"] for r in runs})
    colors = _colors(widths)
    fig, axes = plt.subplots(len(wds), len(panels), figsize=(4.4 * len(panels), 3.2 * len(wds)), squeeze=False,
                             sharex=True, sharey="col")  # fmt: skip
    lows: dict[int, float] = {}
    for row, wd in enumerate(wds):
        for col, (metric, label) in enumerate(panels):
            ax = axes[row][col]
            for w in widths:
                steps, vals = _curves(runs, wd, w, lr, metric)
                if len(steps):
                    ax.plot(steps, vals, color=colors[w], label=f"{w:g}x", marker="." if log_steps else None)
                    body = vals[(steps <= 0.85 * steps.max()) & np.isfinite(vals)]
                    if len(body):
                        lows[col] = min(lows.get(col, np.inf), 0.7 * body.min())
                if metric == "rel_update":  # eq 36: the equilibrium relative update sqrt(2 eta lambda)
                    s, eq = _curves(runs, wd, w, lr, "eq_rel_update")
                    if len(s):
                        ax.plot(s, eq, color=colors[w], ls="--", lw=0.8)
                if metric == "weight_align":  # a random W: alpha_W about 1/sqrt(C)
                    c = _fan_in(runs, wd, w, lr)
                    if c:
                        ax.axhline(1 / math.sqrt(c), color=colors[w], ls=":", lw=0.8)
            ax.set_yscale("log")
            if log_steps:
                ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{label}\nmuP, {wd} WD", fontsize=9)
            if row == len(wds) - 1:
                ax.set_xlabel("step")
    for col, low in lows.items():
        axes[0][col].set_ylim(bottom=low)  # the columns share y
    axes[0][0].legend(title="width", fontsize=8)
    fig.suptitle(f"{title} (base LR {lr:g})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fan_in(runs: list[dict], wd: str, width: float, lr: float) -> int | None:
    """C of the probed 1x1 convolution: its input channels (= 16 x stage-1 planes: layer3 outputs 4 x 4p)."""
    for r in runs:
        if (r["wd"], r["width"], r["lr"]) == (wd, width, lr):
            return 16 * r["planes"]
    return None


def plot_all(args: Any, config: dict[str, Any]) -> list[Path]:
    """Draw the three figures into <out_dir>/figures from the finished runs trained with `config`."""
    runs = load_runs(args.out_dir, config)
    if not runs:
        print("no finished runs to plot")
        return []
    out = Path(args.out_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_lr_transfer(runs, out / "lr_transfer.png")]
    base = min(r["width"] for r in runs) if args.base_width not in {r["width"] for r in runs} else args.base_width
    lr = args.curve_lr or best_lr(runs, "independent", base) or best_lr(runs, runs[0]["wd"], base)
    layer = args.probe_layer
    title = f"{layer}: updates across widths (dashed: eq 36's equilibrium relative update)"
    paths.append(plot_over_time(runs, lr, RRC_PANELS, out / "rrc_widths.png", title))
    title = f"{layer}: alignment over time (dotted: 1/sqrt(C), a random W's weight alignment)"
    paths.append(plot_over_time(runs, lr, ALIGN_PANELS, out / "alignment_time.png", title, log_steps=True))
    return paths
