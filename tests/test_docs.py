"""The README's config reference lists every key with its current default."""

import subprocess
import sys

from conftest import ROOT


def test_config_reference_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    import config_reference

    text = (ROOT / "README.md").read_text()
    assert config_reference.render(text) == text, "run: python scripts/config_reference.py --write"
    for key in ("model.dim", "optim.lr", "scaling.wd", "probes.every", "guard.max_nonfinite", "data.seq_len"):
        assert f"| `{key}` |" in text


def test_every_key_has_a_help_line():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py")], capture_output=True, text=True, check=True
    ).stdout
    missing = [line.split("`")[1] for line in out.splitlines()[2:] if line.rstrip().endswith("|  |")]
    assert not missing, f"fields without a '# help' comment: {missing}"
