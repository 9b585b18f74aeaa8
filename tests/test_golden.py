"""Golden values: the debug config's per-step losses and param_groups.json under four width rules.

They pin what a refactor must not change: every class's LR, WD, init and theory columns, and the
losses they train to. `python tests/test_golden.py --write` records them again (only after a
deliberate change of behaviour, said so in the commit). The bundled corpus is built from this
Python's standard library and the numbers depend on torch's kernels, so the values are checked
only in the environment they were recorded in (the file names it); elsewhere the test skips.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, Started, read_metrics, start_train

GOLDEN = ROOT / "tests" / "golden" / "debug_runs.json"
COMMON = ["config=configs/debug.yaml", "log_freq=1", "checkpoint.every=0", "eval_freq=0", "eval_batches=0"]
# 16 sequences of 128 tokens per step: dataset_tokens = 100 steps per epoch, tau_iter = 2 epochs = 200 steps
RUNS = {
    "sp": [],
    "mup_independent": ["scaling.width=mup", "scaling.wd=independent", "scaling.base_dim=32"],
    "mup_sqrt_decay_away": [
        "scaling.width=mup",
        "scaling.wd=sqrt",
        "scaling.base_dim=32",
        "scaling.extra_warmup=decay_away",
    ],
    "timescale": [
        "scaling.width=mup",
        "scaling.wd=timescale",
        "scaling.base_dim=32",
        "scaling.tau_epoch=2.0",
        "scaling.dataset_tokens=204800",
        "scaling.output_init=mup",
    ],
}


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__}


def start(name: str, dump: Path) -> Started:
    return start_train([*COMMON, *RUNS[name], f"dump_dir={dump}"], timeout=600)


def result(dump: Path) -> dict:
    losses = [r["loss"] for r in read_metrics(dump) if "loss" in r]
    return {"losses": losses, "param_groups": json.loads((dump / "param_groups.json").read_text())}


def assert_same(got, want, where: str) -> None:
    """Strings, ints and structure exactly; floats to 1e-12 (losses are compared separately)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-12, abs=0), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory) -> tuple[dict, dict[str, tuple[Started, Path]]]:
    """The four runs, started together (one core each, two at a time on two cores)."""
    golden = json.loads(GOLDEN.read_text())
    if golden["environment"] != environment():
        pytest.skip(f"golden values recorded with {golden['environment']}, this is {environment()}")
    root = tmp_path_factory.mktemp("golden")
    runs = {name: (start(name, root / name), root / name) for name in RUNS}
    yield golden, runs
    for started, _ in runs.values():
        started.stop()


@pytest.mark.slow  # a trainer process or several: see README, Tests
@pytest.mark.parametrize("name", list(RUNS))
def test_debug_config_matches_its_golden_values(golden_runs, name):
    golden, runs = golden_runs
    started, dump = runs[name]
    started.wait()
    got, want = result(dump), golden["runs"][name]
    assert len(got["losses"]) == len(want["losses"]) == 40
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-6, abs=0)
    assert_same(got["param_groups"], want["param_groups"], f"{name}/param_groups.json")


def test_the_rules_differ():
    """The four golden runs are four different trainings (else they would pin less than they seem to)."""
    runs = json.loads(GOLDEN.read_text())["runs"]
    finals = {name: run["losses"][-1] for name, run in runs.items()}
    assert len(set(finals.values())) == len(finals), finals
    hidden = {
        name: next(g for g in run["param_groups"]["groups"] if g["class"] == "hidden") for name, run in runs.items()
    }
    assert len({(g["lr"], g["weight_decay"]) for g in hidden.values()}) == len(hidden)


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_golden.py --write   (records tests/golden/debug_runs.json)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in RUNS:
            start(name, Path(tmp) / name).wait()
        runs = {name: result(Path(tmp) / name) for name in RUNS}
    GOLDEN.write_text(json.dumps({"environment": environment(), "runs": runs}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
