"""App. D of seeds/002 at small scale: a bottleneck ResNet on sklearn's 8x8 digits at widths 0.25x..1x,
muP with standard vs independent weight decay, alignment probes on `layer3.2.conv1` (a 1x1 convolution).

A plain PyTorch training loop; the lines the library adds to it are marked `# lingua_wd` (docs/library.md,
"ResNet on digits", quotes them). Every run (rule x width x base LR x seed) writes one metrics JSONL under
out_dir/runs/; a finished run's file is reused (if its settings are this command's), so running the command
again fills in only what is missing.
Then the figures: the LR-transfer plot (final loss vs base LR, one line per width, one panel per WD rule),
the relative update / alignment ratio / relative representation change across widths, and the weight and
update alignment over time (out_dir/figures/).

The data: sklearn.datasets.load_digits (1797 images of 8x8 pixels, 10 classes, shipped inside the package,
no download), standardized, a validation split held out by a fixed seed. The model: a ResNet v1.5 with
bottleneck blocks (1x1, 3x3, 1x1 convolutions, post-norm, downsampling on the 3x3 convolution; App. G.4),
3 stages x 3 blocks, stage planes (p, 2p, 4p) with p = base_planes x width, expansion 4, no max-pool.
Width multipliers are relative to base_planes; the hyperparameters are tuned at `base_width` (m = width /
base_width), as the paper takes its 0.25x ResNet-50 as the base. The LR of the classes that do not scale
with width (the stem convolution, BN gains and biases, the classifier bias) is frozen at `vector_lr`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua_wd import library as lw
from lingua_wd.args import check, check_choice, run_cli
from lingua_wd.scaling import ScalingArgs
from lingua_wd.schedule import ScheduleArgs

USAGE = "usage: python examples/resnet_digits.py [key=value ...]"
WD_RULES = ("standard", "independent")  # scaling.wd under scaling.width=mup (App. D, Figure 10)
VECTOR_CLASSES = ("input", "gain", "bias")  # not width-scaled: their LR is frozen (App. G.2)
# the settings recorded in each run's file: a file with others is not reused
RUN_KEYS = ("base_width", "base_planes", "weight_decay", "vector_lr", "steps", "batch_size", "warmup",
            "probe_layer", "probe_every", "probe_first", "val_frac", "data_seed")  # fmt: skip
COST_0 = 0.3  # a run's fixed time in units of the time per unit of width (measured: ~8 s at 0.25x, ~21 s at 1x)


@dataclass
class ResnetDigitsArgs:
    out_dir: str = "dumps/resnet_digits"  # runs/*.jsonl (one per run, reused when finished) and figures/*.png
    widths: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # multiples of the 1x network (base_planes)
    base_width: float = 0.25  # the width the hyperparameters are tuned at: m = width / base_width (App. D)
    base_planes: int = 16  # stage-1 planes of the 1x network (stages: p, 2p, 4p planes, x4 channels out)
    lrs: list[float] = field(default_factory=lambda: [4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1])  # base LRs
    wds: list[str] = field(default_factory=lambda: list(WD_RULES))  # scaling.wd rules under scaling.width=mup
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # init and batch-order seeds
    weight_decay: float = 1.0  # lambda_base (App. G.4: 0.1 over ~50 EMA timescales; 1.0: eta lambda T = 2.4 at 8e-3)
    vector_lr: float = 3.2e-2  # frozen LR of the classes that do not scale with width (input, gain, bias)
    steps: int = 300  # optimizer steps per run
    batch_size: int = 64  # images per step
    warmup: float = 0.05  # linear warmup as a fraction of the run, then cosine decay to 0 (App. G.4)
    probe_layer: str = "layer3.2.conv1"  # the probed layer (a 1x1 convolution, as in Figures 11-13)
    probe_every: int = 10  # probe and log every N steps
    probe_first: int = 5  # also probe (and log) each of the first N steps: muP's start (Figure 12)
    val_frac: float = 0.2  # share of the 1797 images held out for validation
    data_seed: int = 0  # the validation split's seed (fixed across runs)
    workers: int = 2  # runs in parallel (processes of one thread each)
    threads: int = 1  # torch threads per run
    curve_lr: float = 0.0  # base LR of the over-time figures (0: wd=independent's best train loss at base_width)
    plot: bool = True  # draw the figures after the runs
    verbose: bool = False  # print each run's parameter-group table


# ----------------------------------------------------------------------------- data


def load_data(val_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): digits as (N, 1, 8, 8) float32, standardized by the train split."""
    from sklearn.datasets import load_digits  # optional dependency: pip install -e ".[examples]"

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), pixel values 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_frac * len(y)))
    val, train = perm[:n_val], perm[n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[val], y[val]


# ----------------------------------------------------------------------------- model


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (App. G.4): 1x1 -> 3x3 (stride here) -> 1x1, BN after each, post-norm sum."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """3 stages x `blocks` bottlenecks on 1-channel 8x8 images: 8x8 -> 4x4 -> 2x2 -> average -> fc."""

    def __init__(self, planes: int, blocks: int = 3, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, planes, 3, padding=1, bias=False)  # the stem: no max-pool on 8x8 inputs
        self.bn1 = nn.BatchNorm2d(planes)
        c = planes
        for i, (p, stride) in enumerate([(planes, 1), (2 * planes, 2), (4 * planes, 2)], 1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(c, p, stride if b == 0 else 1))
                c = p * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 10)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def planes_of(args: ResnetDigitsArgs, width: float) -> int:
    return max(1, int(round(args.base_planes * width)))


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Run:
    wd: str
    width: float
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.wd}_w{self.width:g}_lr{self.lr:g}_s{self.seed}"


def run_path(args: ResnetDigitsArgs, run: Run) -> Path:
    return Path(args.out_dir) / "runs" / f"{run.name}.jsonl"


def train_run(args: ResnetDigitsArgs, run: Run) -> dict[str, Any]:
    """Train one network and write its metrics JSONL (atomically: a file on disk is a finished run)."""
    torch.set_num_threads(args.threads)
    x_tr, y_tr, x_val, y_val = load_data(args.val_frac, args.data_seed)
    torch.manual_seed(run.seed)
    planes = planes_of(args, run.width)
    model = ResNet(planes)
    order = torch.Generator().manual_seed(run.seed)

    # lingua_wd: per-class LR/WD of the width plan, re-init by the plan, probes on the 1x1 convolution
    base_planes, frozen = planes_of(args, args.base_width), dict.fromkeys(VECTOR_CLASSES, args.vector_lr)
    scaling = ScalingArgs(width="mup", wd=run.wd, base_dim=base_planes, frozen_lr=frozen)
    base = ResNet(base_planes if run.width != args.base_width else 2 * planes)
    classes = lw.classify(model, base=base)  # the width dims: those that differ from `base` (at m = 1: any width)
    plan = lw.plan(scaling, dim=planes, lr=run.lr, weight_decay=args.weight_decay, steps=args.steps)
    lw.reinit(model, plan, classes)
    groups = lw.param_groups(model, plan, classes, print_table=args.verbose)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)  # App. G.4
    sched = lw.scheduler(opt, plan, schedule=ScheduleArgs(kind="cosine", warmup=args.warmup), steps=args.steps)
    probes = lw.attach_probes(model, [args.probe_layer], classes, every=args.probe_every, fraction=1.0)
    # lingua_wd: end

    peak = {g["class"]: {"lr": g["initial_lr"], "weight_decay": g["weight_decay"]} for g in groups}
    records = [{"run": run.name, **asdict(run), "config": run_config(args), "planes": planes,
                "width_mult": plan.width_mult, "groups": peak}]  # fmt: skip
    losses = torch.zeros(args.steps)  # per-step train loss, read on log steps only (no per-step host sync)
    logged = 0  # the last step with a record
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(y_tr), (args.batch_size,), generator=order)
        x, y = x_tr[idx], y_tr[idx]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses[step - 1] = loss.detach()
        probe = probes.due(step) or step <= args.probe_first  # lingua_wd: every N steps, and each of the first
        if probe:  # lingua_wd
            probes.before_step(step, x)  # lingua_wd: snapshot W_t, the probe forward on x
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = probes.after_step(step, opt) if probe else {}  # lingua_wd: {"probe/<layer>/<metric>": value}
        sched.step()
        if probe or step == args.steps:  # the loss: mean over the steps since the last record
            records.append({"step": step, "loss": losses[logged:step].mean().item(), **rec})
            logged = step
    tail = max(1, args.steps // 10)  # the running train loss: mean of the last 10% of steps (App. G.3: last 100)
    train_loss, _ = evaluate(model, x_tr, y_tr)  # the final weights on the whole train split (less noisy)
    val_loss, val_acc = evaluate(model, x_val, y_val)
    result = {"final": True, "train_loss": train_loss, "running_loss": losses[-tail:].mean().item(),
              "val_loss": val_loss, "val_acc": val_acc}  # fmt: skip
    records.append(result)
    path = run_path(args, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def run_config(args: ResnetDigitsArgs) -> dict[str, Any]:
    """The settings a finished run's file was trained with (those that change its numbers)."""
    return {k: getattr(args, k) for k in RUN_KEYS}


def read_run(args: ResnetDigitsArgs, run: Run) -> Optional[list[dict]]:
    """A finished run's records, or None (missing or unfinished file); a file trained with other settings
    is a ConfigError (never reused as if it were this command's)."""
    path = run_path(args, run)
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records or not records[-1].get("final"):
        return None
    old, new = records[0].get("config", {}), run_config(args)
    diff = [f"{k}={old.get(k)!r} there, {v!r} here" for k, v in new.items() if old.get(k) != v]
    check(not diff, "out_dir", f"{path} was trained with other settings ({'; '.join(diff)}): use another out_dir")
    return records


def _worker(args: ResnetDigitsArgs, run: Run) -> tuple[Run, dict[str, Any], float]:
    t0 = time.time()
    out = train_run(args, run)
    return run, out, time.time() - t0


# ----------------------------------------------------------------------------- the sweep


def check_args(args: ResnetDigitsArgs) -> None:
    for rule in args.wds:
        check_choice(rule, "wds", WD_RULES)
    check(args.widths and all(w > 0 for w in args.widths), "widths", f"must be positive, got {args.widths}")
    check(args.base_width > 0, "base_width", f"must be > 0, got {args.base_width}")
    check(args.lrs and all(lr > 0 for lr in args.lrs), "lrs", f"must be positive, got {args.lrs}")
    check(args.steps >= args.probe_every > 0, "probe_every", f"must be in [1, steps], got {args.probe_every}")
    check(args.probe_first >= 0, "probe_first", f"must be >= 0, got {args.probe_first}")
    check(0 < args.val_frac < 1, "val_frac", f"must be in (0, 1), got {args.val_frac}")
    check(args.workers >= 1 and args.threads >= 1, "workers", "workers and threads must be >= 1")
    check(args.base_planes * min(args.widths) >= 1, "base_planes", "the narrowest width has no channels")


def sweep(args: ResnetDigitsArgs) -> None:
    """Train every missing run, `workers` at a time, with a progress line per run."""
    runs = [Run(wd, w, lr, s) for wd in args.wds for w in args.widths for lr in args.lrs for s in args.seeds]
    todo = [r for r in runs if read_run(args, r) is None]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} finished before, {len(todo)} to train in {args.out_dir}")
    if not todo:
        return
    todo.sort(key=lambda r: -r.width)  # the widest first: the last minutes run the quick ones side by side
    cost = {r: COST_0 + r.width for r in todo}  # a run's time is about linear in the width here
    t0, left = time.time(), sum(cost.values())
    for done, (run, out, secs) in enumerate(_results(args, todo), 1):
        left -= cost[run]
        eta = (time.time() - t0) / (sum(cost.values()) - left) * max(0.0, left)
        print(f"[{done}/{len(todo)}] {run.name}: train {out['train_loss']:.4f} val {out['val_loss']:.4f} "
              f"acc {100 * out['val_acc']:.1f}% ({secs:.1f}s, ETA {eta / 60:.1f} min)", flush=True)  # fmt: skip


def _results(args: ResnetDigitsArgs, todo: list[Run]) -> Iterator[tuple[Run, dict[str, Any], float]]:
    """The runs' results as they finish: in this process (workers=1) or in `workers` spawned processes."""
    if args.workers == 1:
        yield from (_worker(args, r) for r in todo)
        return
    signal.signal(signal.SIGTERM, _exit)  # so that the pool's exit below also ends the workers
    with get_context("spawn").Pool(args.workers) as pool:  # leaving the block terminates the workers
        yield from pool.imap_unordered(_worker_star, [(args, r) for r in todo])


def _worker_star(item: tuple[ResnetDigitsArgs, Run]) -> tuple[Run, dict[str, Any], float]:
    return _worker(*item)


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _main(args: ResnetDigitsArgs) -> int:
    check_args(args)
    sweep(args)
    if args.plot:
        from plot_resnet_digits import plot_all  # examples/: the script's own directory is on sys.path

        for path in plot_all(args, run_config(args)):
            print(f"wrote {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(argv, ResnetDigitsArgs, _main, USAGE, __doc__)


if __name__ == "__main__":
    sys.exit(main())
