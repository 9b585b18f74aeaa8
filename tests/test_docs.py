"""The README's config reference lists every key with its current default; every script answers --help."""

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


@pytest.mark.slow  # a process per script
def test_every_script_answers_help_without_doing_its_work(tmp_path):
    """`--help` prints a usage line and exits 0 for every script (setup.sh included), in a scratch directory
    that stays empty (issue 15: config_reference.py printed its table, setup.sh ran the set-up); the two that
    parse by hand refuse an unknown option with exit 2."""
    cmds = [[sys.executable, str(p), "--help"] for p in sorted((ROOT / "scripts").glob("*.py"))]
    cmds += [["bash", str(ROOT / "scripts" / "setup.sh"), "--help"], ["bash", str(ROOT / "scripts" / "setup.sh"), "-x"]]
    cmds += [[sys.executable, str(ROOT / "scripts" / "config_reference.py"), "-x"]]
    procs = [subprocess.Popen(c, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    for cmd, proc in zip(cmds, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        want = 0 if cmd[-1] == "--help" else 2
        assert proc.returncode == want and out.lower().startswith("usage:") == (want == 0), (cmd, out[:200], err[-300:])
    assert list(tmp_path.iterdir()) == []


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
