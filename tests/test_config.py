"""Config merge order, overrides, and the one-line errors that stop a run before any work."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TRAIN, env, losses, run_train
from lingua_wd.args import ConfigError, parse_args
from lingua_wd.train import TrainArgs, resolve_and_check


def parse(argv, world=1):
    args = parse_args(TrainArgs, argv)
    resolve_and_check(args, world)
    return args


def test_defaults_then_file_then_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 7\nmodel:\n  dim: 256\n  n_layers: 3\noptim:\n  lr: 1.0e-3\n")
    args = parse([f"config={cfg}", "optim.lr=5e-4", "model.head_dim=64"])
    assert args.steps == 7 and args.model.n_layers == 3  # from the file
    assert args.optim.lr == 5e-4 and args.model.head_dim == 64  # CLI wins over the file
    assert args.optim.beta2 == 0.95  # dataclass default untouched
    assert args.model.vocab_size == 258 and args.model.max_seq_len == args.data.seq_len  # derived


@pytest.mark.parametrize(
    "argv, key",
    [
        (["model.dimm=3"], "model.dimm"),  # unknown key
        (["optim.lr=fast"], "optim.lr"),  # wrong type
        (["model.dim=200"], "model.dim"),  # not divisible by head_dim=128
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-1e-3"], "optim.lr"),
        (["steps=10", "schedule.warmup_steps=11"], "schedule.warmup_steps"),
        (["data.batch_size=10", "data.micro_batch_size=4"], "data.batch_size"),
        (["model.n_kv_heads=3", "model.dim=512"], "model.n_kv_heads"),
        (["data.sources={/nonexistent/dir: 1.0}"], "data.sources"),
        (["nokey"], "nokey"),
    ],
)
def test_errors_name_the_key(argv, key):
    with pytest.raises(ConfigError) as err:
        args = parse(argv)
        from lingua_wd.data import TrainLoader, build_tokenizer

        TrainLoader(args.data, build_tokenizer(args.data.tokenizer), 0, 1)
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_batch_must_divide_by_ranks():
    parse(["data.batch_size=16", "data.micro_batch_size=4"], world=4)
    with pytest.raises(ConfigError, match=r"^data\.batch_size"):
        parse(["data.batch_size=16", "data.micro_batch_size=4"], world=3)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="^config: no such file"):
        parse(["config=/nonexistent.yaml"])


def test_cli_prints_one_line_and_writes_nothing(tmp_path):
    dump = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, TRAIN, f"dump_dir={dump}", "optim.lr=-1"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["config error: optim.lr: must be positive, got -1.0"]
    assert not dump.exists()


def test_resolved_config_round_trips(tmp_path):
    from lingua_wd.args import dump_config

    args = parse(["model.dim=256", "optim.lr=2e-3"])
    dump_config(args, tmp_path / "config.yaml")
    again = parse([f"config={tmp_path / 'config.yaml'}"])
    assert again == args
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["dim"] == 256


@pytest.mark.parametrize("name", ["debug.yaml", "base.yaml"])
def test_shipped_configs_parse(name):
    parse([f"config={ROOT / 'configs' / name}"])


def test_paper_config_is_the_reference_experiment():
    # the llama3 tokenizer.model is not shipped: check everything else with the byte tokenizer
    args = parse(
        [
            f"config={ROOT / 'configs' / 'paper' / 'llama.yaml'}",
            "data.tokenizer.name=bytes",
            "model.vocab_size=128256",
            "model.dim=2048",
            "scaling.wd=independent",
            "optim.lr=8e-3",
        ]
    )
    assert (args.model.n_layers, args.model.head_dim, args.model.ffn_mult, args.model.vocab_size) == (
        20,
        128,
        3,
        128256,
    )
    assert (args.data.seq_len, args.data.batch_size, args.steps) == (4096, 256, 20000)
    assert (args.optim.beta1, args.optim.beta2, args.optim.eps, args.optim.weight_decay) == (0.9, 0.95, 1e-8, 0.1)
    assert args.scaling.width == "mup" and args.scaling.base_dim == 128
    assert args.scaling.frozen_lr == {"input": 1.6e-2, "gain": 1.6e-2}


def test_renamed_keys_are_refused_with_the_new_name(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse(["scaling.wd_mode=independent"])
    assert str(err.value) == "scaling.wd_mode: renamed to scaling.wd"
    old = tmp_path / "old.yaml"
    old.write_text("scaling:\n  mode: mup\n  wd_mode: independent\n")
    with pytest.raises(ConfigError, match=r"^scaling\.mode: renamed to scaling\.width$"):
        parse([f"config={old}"])
    # a config saved by a run before the rename is still read, under the new names
    from lingua_wd.args import read_sections
    from lingua_wd.scaling import ScalingArgs

    saved = yaml.safe_load(old.read_text())
    got = read_sections({**saved, "scaling": {**saved["scaling"], "future_key": 1}}, {"scaling": ScalingArgs})
    assert (got["scaling"].width, got["scaling"].wd) == ("mup", "independent")


def test_a_bare_yaml_path_is_the_config_and_other_bare_words_are_errors():
    assert parse([str(ROOT / "configs" / "debug.yaml")]) == parse([f"config={ROOT / 'configs' / 'debug.yaml'}"])
    with pytest.raises(ConfigError, match=r"^configs/debug: expected key=value"):
        parse(["configs/debug"])


def test_trainer_help_lists_every_key_with_default_and_meaning():
    proc = subprocess.run([sys.executable, TRAIN, "--help"], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python apps/train.py")
    from lingua_wd.args import key_rows

    rows = key_rows(TrainArgs)
    assert len(rows) > 80
    for key, default, meaning in rows:
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(f"{key}="))
        assert default in line and meaning.split(" (one of")[0] in proc.stdout, key
    wd = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("scaling.wd="))
    assert "one of: none, standard, independent, sqrt, sqrt_lr, timescale" in wd  # from scaling.WD_RULES


@pytest.mark.parametrize(
    "command, key",
    [
        ("train", "optim.lr="),
        ("sweep", "launcher="),
        ("report", "last_n="),
        ("status", "parallel="),
        ("transfer", "transfer.widths="),
        ("coordcheck", "params="),
        ("export", "ckpt_dir="),
        ("eval", "val_sources="),
        ("generate", "top_p="),
    ],
)
def test_every_command_help_lists_its_keys(command, key, capsys):
    from lingua_wd.cli import COMMANDS, main

    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "keys (key=default  meaning):" in out
    assert any(line.strip().startswith(key) for line in out.splitlines()), out[-2000:]
    assert command in COMMANDS


def test_transfer_validates_shared_keys_as_the_trainer_does(capsys):
    from lingua_wd.transfer import main

    for argv in (["model.dim=100"], ["optim.lr=0"], ["scaling.width=mup", "scaling.wd=timescale"], ["probes.nope=1"]):
        with pytest.raises(ConfigError) as err:
            parse(argv)
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == f"config error: {err.value}"


@pytest.mark.slow  # a trainer process or several: see README, Tests
def test_a_run_saved_before_a_rename_resumes(tmp_path, tiny):
    """Checkpoints written with the old key names (scaling.mode / wd_mode) resume: saved keys are compared
    under their new names, so nothing looks changed."""
    dump = tmp_path / "run"
    argv = [f"dump_dir={dump}", *tiny, "steps=3", "checkpoint.every=1", "scaling.width=mup", "scaling.wd=independent",
            "scaling.base_dim=32"]  # fmt: skip
    run_train(argv)
    shutil.rmtree(dump / "checkpoints" / f"{3:010d}")  # as if killed after the checkpoint of step 2
    (dump / "DONE").unlink()
    saved = dump / "checkpoints" / f"{2:010d}" / "config.yaml"
    text = (
        saved.read_text().replace("  width: mup", "  mode: mup").replace("  wd: independent", "  wd_mode: independent")
    )
    assert "wd_mode: independent" in text
    saved.write_text(text)
    manifest = saved.parent / "MANIFEST.json"  # keep the checkpoint complete: the manifest holds file sizes
    info = json.loads(manifest.read_text())
    info["files"]["config.yaml"] = saved.stat().st_size
    manifest.write_text(json.dumps(info))
    proc = run_train(argv)
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr and "forced" not in proc.stderr
    assert max(losses(dump)) == 3
