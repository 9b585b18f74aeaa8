"""The README's config reference lists every key with its current default; every script answers --help."""

import runpy
import subprocess
import sys

import pytest

from conftest import ROOT


def test_config_reference_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    import config_reference

    text = (ROOT / "README.md").read_text()
    assert config_reference.render(text) == text, "run: python scripts/config_reference.py --write"
    for key in ("model.dim", "optim.lr", "scaling.wd", "probes.every", "guard.max_nonfinite", "data.seq_len"):
        assert f"| `{key}` |" in text


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_every_key_has_a_help_line():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py")], capture_output=True, text=True, check=True
    ).stdout
    missing = [line.split("`")[1] for line in out.splitlines()[2:] if line.rstrip().endswith("|  |")]
    assert not missing, f"fields without a '# help' comment: {missing}"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_answers_help_without_doing_its_work(script, tmp_path, monkeypatch, capsys):
    """`--help` prints a usage line and exits 0, in a scratch directory that stays empty (issue 15:
    config_reference.py printed its table). In process: a subprocess per script re-imported torch each time."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    assert exit_.value.code == 0 and capsys.readouterr().out.lower().startswith("usage:")
    assert list(tmp_path.iterdir()) == []


def test_setup_script_answers_help_and_refuses_other_arguments(tmp_path):
    """It used to run the whole set-up on `--help`."""
    setup = ["bash", str(ROOT / "scripts" / "setup.sh")]
    out = subprocess.run([*setup, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: bash scripts/setup.sh")
    out = subprocess.run([*setup, "-x"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "unexpected argument '-x'" in out.stderr and not out.stdout


def test_default_outputs_stay_out_of_the_source_tree(tmp_path, monkeypatch):
    """Every command and script writes into a run or sweep dir, dumps/ (git-ignored) or a path the user names:
    no default output path points into the source tree (issue 15: docs/benchmarks_perf.md, transfer.yaml)."""
    import ast
    import dataclasses
    import importlib
    import pkgutil

    import lingua_wd

    def ok(default) -> bool:
        return default in ("", None) or str(default).startswith("dumps/")

    assert "dumps/" in (ROOT / ".gitignore").read_text().split()
    for script in sorted((ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
                flag = getattr(node.args[0], "value", "")
                default = next((k.value for k in node.keywords if k.arg == "default"), None)
                if flag in ("--out", "--out-dir", "--output") and not isinstance(default, ast.Constant | type(None)):
                    raise AssertionError(f"{script.name} {flag}: a computed default")
                if flag in ("--out", "--out-dir", "--output") and default is not None:
                    assert ok(default.value), f"{script.name} {flag} defaults to {default.value!r}"
    for info in pkgutil.iter_modules(lingua_wd.__path__):
        module = importlib.import_module(f"lingua_wd.{info.name}")
        for cls in vars(module).values():
            if dataclasses.is_dataclass(cls) and isinstance(cls, type) and cls.__module__ == module.__name__:
                for f in dataclasses.fields(cls):
                    if f.name in ("out", "out_dir", "plot", "dump_dir", "dump_root") and isinstance(f.default, str):
                        assert ok(f.default), f"{cls.__name__}.{f.name} defaults to {f.default!r}"
    # and for real: lingua-wd-transfer with its defaults writes nothing where it runs
    from lingua_wd.transfer import main as transfer_main

    monkeypatch.chdir(tmp_path)
    assert transfer_main(["model.dim=128", "transfer.widths=[256]"]) in (0, None)
    assert list(tmp_path.iterdir()) == []
