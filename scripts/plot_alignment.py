"""Alignment panels over training steps, in the style of Figures 3, 4, 5 and 8 of seeds/002.

    python scripts/plot_alignment.py RUN_DIR [RUN_DIR ...] [--layer layers.13.feed_forward.w1] [--out PREFIX]

Reads each run's metrics.jsonl (its probe records, `probe/<layer>/<metric>` of lingua_wd/probes.py), its
config.yaml (hyperparameters for the labels) and param_groups.json (the width and each layer's fan-in C),
one line per run, and
draws the theory next to the measurements (dashed, in the run's colour):
relative update vs its equilibrium sqrt(2 eta lambda - eta^2 lambda^2) (eq 36), weight RMS vs
sqrt(eta / (2 lambda)) (eq 33), weight alignment vs 1/sqrt(C) (its value at init), alignment ratio
vs muP's assumption sqrt(C) (eq 5) and 1 (what the paper measures later), update alignment vs
1/sqrt(C) (its large-batch value, App. E), the update's stable rank ||dW||^2 / ||dW||_2^2 vs min(K, C) (an
orthogonal update's, as Muon makes it; logged with probes.metrics=[..., update_srank]). The last panel is
Figure 5's ratio of each run's relative update to the first run's (the warmup effect s_t, eq 38). Writes
PREFIX.png and PREFIX.pdf. Runs whose series coincide (e.g. every rule at m = 1) stay visible: each run has
its own marker, at staggered steps, earlier runs are drawn wider underneath, and the legend names the runs a
run's probe series are identical to. Measured lines are solid with markers; theory lines are dashed, thin,
unmarked.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua_wd.args import read_sections  # noqa: E402
from lingua_wd.optim import OptimArgs  # noqa: E402
from lingua_wd.probes import parse_probe_key, probe_key  # noqa: E402
from lingua_wd.rundir import RunDir, probe_records  # noqa: E402
from lingua_wd.scaling import ScalingArgs, rule_label  # noqa: E402

PAPER_LAYER = "layers.13.feed_forward.w1"  # the layer of the paper's figures (App. G.3.2)
# panel: (metric, title, y label, log y)
PANELS = [
    ("rel_update", r"relative update $\|\Delta W\| / \|W\|$", "rel_update", True),
    ("rrc", r"relative repr. change $\|\Delta Y\| / \|Y\|$ (eq 4)", "rrc", True),
    ("align_ratio", r"alignment ratio $\alpha_{\Delta W} / \alpha_W$", "align_ratio", True),
    ("weight_align", r"weight alignment $\alpha_W$", "weight_align", True),
    ("update_align", r"update alignment $\alpha_{\Delta W}$ (eq 2)", "update_align", True),
    ("weight_rms", r"weight RMS $\|W\| / \sqrt{KC}$", "weight_rms", True),
    ("sigma_max", r"top singular value $\sigma_1(W)$", "sigma_max", True),
    ("update_srank", r"update stable rank $\|\Delta W\|^2 / \|\Delta W\|_2^2$", "update_srank", True),
    ("update_ratio", "relative update / first run's (Fig. 5, eq 38)", "ratio to the first run", False),
]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h"]


def load_run(run_dir: Path) -> tuple[list[dict], dict]:
    """(probe records of metrics.jsonl, {"optim", "scaling": the run's config sections, "fan_in": parameter -> fan-in})."""
    run = RunDir(run_dir)
    raw = yaml.safe_load(run.config.read_text()) if run.config.is_file() else {}
    info = read_sections(raw or {}, {"optim": OptimArgs, "scaling": ScalingArgs}) if raw else {}
    groups = json.loads(run.param_groups.read_text()) if run.param_groups.is_file() else {}
    info["fan_in"] = {p["name"]: p["fan_in"] for p in groups.get("params", [])}  # the width plan's dump
    info["shape"] = {p["name"]: p["shape"] for p in groups.get("params", [])}
    info["dim"] = groups.get("dim")
    records = run.read_metrics()
    info["last_step"] = max((r["step"] for r in records if "step" in r), default=0)  # the run's, for --drop-last
    return probe_records(records), info


def probed_layers(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for key in r:
            parsed = parse_probe_key(key)
            if parsed is not None:
                seen[parsed[0]] = None
    return list(seen)


def pick_layer(runs: list[tuple[list[dict], dict]], wanted: str | None) -> str:
    """The requested layer, else the paper's layer, else the first layer every run probed."""
    common = set.intersection(*(set(probed_layers(r)) for r, _ in runs)) if runs else set()
    if wanted:
        if wanted not in common:
            raise SystemExit(f"--layer {wanted}: not probed in every run (have {', '.join(sorted(common)) or 'none'})")
        return wanted
    if PAPER_LAYER in common:
        return PAPER_LAYER
    order = [lay for lay in probed_layers(runs[0][0]) if lay in common]
    if not order:
        raise SystemExit("no probed layer common to all runs (turn probes on: probes.layers=[...])")
    return order[0]


def series(
    records: list[dict], layer: str, metric: str, drop_last: float, last: int = 0
) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; the last `drop_last` share of the run is cut (the paper drops
    the final 0.5%: updates go to zero with the LR)."""
    key = probe_key(layer, metric)
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    if not pts:
        return [], []
    last = last or max(s for s, _ in pts)
    pts = [(s, v) for s, v in pts if s <= last * (1 - drop_last)] or pts
    steps, values = zip(*pts, strict=True)
    return list(steps), list(values)


def fan_in(layer: str, info: dict) -> int | None:
    """C of a probed linear: its fan-in in the run's param_groups.json (None for a class median)."""
    return info.get("fan_in", {}).get(f"{layer}.weight")


def label(run_dir: Path, info: dict) -> str:
    if "optim" not in info:
        return run_dir.name
    o, s = info["optim"], info["scaling"]
    rule = ("muP/" if s.width == "mup" else "") + rule_label(s.width, s.wd)
    opt = f" Muon ({o.muon_adjust_lr})" if o.variant == "muon" else ""
    return f"d={info['dim']} lr={o.lr:.3g} wd={o.weight_decay:.3g} {rule}{opt}"


def identical_to(runs: list[tuple[list[dict], dict]], layer: str, names: list[str]) -> list[list[str]]:
    """For each run, the earlier runs whose probe series of `layer` are all equal to its own."""

    def key(records: list[dict]) -> list:
        return [(r["step"], sorted((k, v) for k, v in r.items() if (parse_probe_key(k) or ("",))[0] == layer))
                for r in records]  # fmt: skip

    keys = [key(records) for records, _ in runs]
    return [[names[j] for j in range(i) if keys[j] == keys[i] and keys[i]] for i in range(len(runs))]


def plot(run_dirs: list[Path], layer: str | None, out: Path, drop_last: float, labels: list[str] | None) -> str:
    runs = [load_run(d) for d in run_dirs]
    layer = pick_layer(runs, layer)
    fig, axes = plt.subplots(3, 3, figsize=(16, 13.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [
        f"[{i + 1}] " + (labels[i] if labels else label(d, info))
        for i, (d, (_, info)) in enumerate(zip(run_dirs, runs, strict=True))
    ]
    shared: dict[int, dict[tuple, list[int]]] = {}  # panel -> theory curve -> the runs drawing it
    same = identical_to(runs, layer, names)
    base: dict[int, float] = {}
    handles = []
    for i, (records, info) in enumerate(runs):
        color, name = colors[i % len(colors)], names[i]
        # coinciding runs stay visible: own marker, staggered, earlier (wider) lines underneath
        style = dict(color=color, ls="-", marker=MARKERS[i % len(MARKERS)], ms=4, zorder=2 + i,
                     lw=1.2 + 2.6 * (len(runs) - 1 - i) / max(1, len(runs) - 1))  # fmt: skip
        if same[i]:
            name += f"  (identical to {', '.join(same[i])})"
        C = fan_in(layer, info)
        K = (info.get("shape", {}).get(f"{layer}.weight") or [None])[0]
        for ax, (metric, *_rest) in zip(axes.flat, PANELS, strict=True):
            if metric == "update_ratio":
                steps, rel = series(records, layer, "rel_update", drop_last, info["last_step"])
                if i == 0:
                    base = dict(zip(steps, rel, strict=True))
                pts = [(s, v / base[s]) for s, v in zip(steps, rel, strict=True) if base.get(s)]
                if pts:
                    _draw(ax, *zip(*pts, strict=True), style, i, len(runs))
                continue
            steps, values = series(records, layer, metric, drop_last, info["last_step"])
            line = _draw(ax, steps, values, style, i, len(runs))
            if metric == "rel_update" and line is not None:
                handles.append((line, name))
            curve = theory(ax, metric, records, layer, drop_last, C, color, info["last_step"], K)
            if curve is not None:
                shared.setdefault(id(ax), {}).setdefault(curve, []).append(i + 1)
    for ax, (_, title, ylabel, logy) in zip(axes.flat, PANELS, strict=True):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy and any(len(line.get_ydata()) and min(line.get_ydata()) > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes.flat:  # dashed lines drawn on top of each other: say so in the panel
        groups = [runs_ for runs_ in shared.get(id(ax), {}).values() if len(runs_) > 1]
        if groups:
            text = "; ".join(f"runs {', '.join(map(str, g))}" for g in groups)
            ax.text(0.01, 0.01, f"theory: one dashed line for {text}", transform=ax.transAxes, fontsize=7, va="bottom")
    axes.flat[2].axhline(1.0, color="gray", lw=0.8, ls=":")
    axes.flat[-1].axhline(1.0, color="gray", lw=0.8, ls=":")
    theory_key = plt.Line2D([], [], color="gray", lw=1.0, ls=(0, (2, 2)), label="theory (dashed, thin)")
    fig.legend([h for h, _ in handles] + [theory_key], [n for _, n in handles] + [theory_key.get_label()],
               loc="lower center", ncol=min(3, len(handles) + 1), fontsize=9)  # fmt: skip
    fig.suptitle(f"{layer}: measured (solid, one colour and marker per run) and theory (dashed, thin)",
                 fontsize=13)  # fmt: skip
    rows = math.ceil((len(handles) + 1) / 3)
    fig.tight_layout(rect=(0, 0.025 + 0.028 * rows, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(with_ext(out, ext), dpi=130)
    plt.close(fig)
    return layer


def _draw(ax, steps, values, style: dict, i: int, n: int):
    """One run's series; markers every ~1/10 of the points, shifted per run so coinciding runs show them all."""
    if not len(steps):
        return None
    every = max(n, len(steps) // 10)  # each run its own phase: markers of coinciding runs never overlap
    (line,) = ax.plot(steps, values, markevery=(i % every, every), **style)
    return line


def theory(
    ax,
    metric: str,
    records: list[dict],
    layer: str,
    drop_last: float,
    C: int | None,
    color: str,
    last: int = 0,
    K: int | None = None,
) -> tuple | None:
    """The theory line of a panel, dashed in the run's colour; returns its values (to find coinciding ones)."""
    eq = {"rel_update": "eq_rel_update", "weight_rms": "eq_weight_rms"}.get(metric)
    dashed = {"color": color, "lw": 0.9, "ls": (0, (2, 2))}
    if eq:  # the simple RMS model's equilibrium at the current LR and WD (eq 33, 36)
        steps, values = series(records, layer, eq, drop_last, last)
        ax.plot(steps, values, **dashed)
        return tuple(steps) + tuple(round(v, 12) for v in values) if steps else None
    if C and metric in ("weight_align", "update_align"):
        ax.axhline(1 / math.sqrt(C), **dashed)  # 1/sqrt(C): init (alpha_W), B >> C (App. E)
        return (1 / math.sqrt(C),)
    if C and metric == "align_ratio":
        ax.axhline(math.sqrt(C), **dashed)  # muP's assumption Theta(sqrt(C)), eq 5
        return (math.sqrt(C),)
    if C and K and metric == "update_srank":
        ax.axhline(min(K, C), **dashed)  # an orthogonal update's (Muon's) stable rank
        return (float(min(K, C)),)
    return None


def with_ext(prefix: Path, ext: str) -> Path:
    return prefix.parent / f"{prefix.name}.{ext}"  # not with_suffix: layer names contain dots


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (metrics.jsonl, config.yaml)")
    ap.add_argument("--layer", help=f"probed layer or median/<class> (default {PAPER_LAYER} or the first probed)")
    ap.add_argument("--out", type=Path, help="output prefix (default RUN_DIR/alignment_<layer>)")
    ap.add_argument("--drop-last", type=float, default=0.005, help="share of the final steps left out (paper: 0.5%%)")
    ap.add_argument("--labels", nargs="+", help="one legend label per run (default from config.yaml)")
    args = ap.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit("--labels: give one label per run")
    out = args.out
    if out is None:
        layer = pick_layer([load_run(d) for d in args.runs], args.layer)
        out = args.runs[0] / f"alignment_{layer.replace('/', '_')}"
    layer = plot(args.runs, args.layer, out, args.drop_last, args.labels)
    print(f"{layer}: wrote {with_ext(out, 'png')} and {with_ext(out, 'pdf')}")


if __name__ == "__main__":
    main()
