"""Typed configuration: dataclass defaults <- base layers <- `config=FILE.yaml` <- dotted CLI overrides,
and the one command-line shape every command shares (`run_cli`).

Every error is a `ConfigError` whose message is one line starting with the offending key, so a
misspelt key, a wrong type, an invalid value or a renamed key stops the run before any work is done.
`--help` is generated from the command's dataclass: each field's trailing `# comment` is its
meaning, and a field declared `one_of(default, table)` lists that table's keys, so a
new row of a table (a weight-decay rule, a schedule, a probe metric) is documented where it is added.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
log = logging.getLogger(__name__)
CONFIG_SUFFIXES = (".yaml", ".yml")  # a bare argument ending so is the config file (as config=FILE)
FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")  # `name: type = default  # meaning`


class ConfigError(ValueError):
    """A bad configuration: the message is one line, `key: what is wrong`."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise a one-line `ConfigError` naming `key` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def one_of(default: Any, table: Callable[[], Iterable[str]]) -> Any:
    """A config field whose valid values (a list field: whose items) are the keys of `table()`, a callable
    so the table may be defined after the dataclass. `--help` and the README's config reference list them."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"choices": table})
    return dataclasses.field(default=default, metadata={"choices": table})


def check_choice(value: str, key: str, table: Iterable[str]) -> None:
    names = list(table)
    check(value in names, key, f"unknown {value!r} (choose from {', '.join(names)})")


# ----------------------------------------------------------------------------- the loader


def _one_line(err: OmegaConfBaseException, prefix: str = "") -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", None) or err).splitlines()[0].strip()
    return f"{prefix}{key}: {msg}" if key else f"{prefix.rstrip('.') or 'config'}: {msg}"


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(config files, key=value items); a bare argument ending in .yaml is the config file."""
    files, dotlist = [], []
    for item in argv:
        if item.startswith("config="):
            files.append(item.split("=", 1)[1])
        elif "=" in item:
            dotlist.append(item)
        elif item.endswith(CONFIG_SUFFIXES):
            files.append(item)
        else:
            raise ConfigError(f"{item}: expected key=value (a config file is config=FILE.yaml or FILE.yaml)")
    check(len(files) <= 1, "config", "given more than once")
    return files, dotlist


def sections(cls: type) -> dict[str, type]:
    """The fields of `cls` that are themselves config dataclasses (model, optim, ...), by name."""
    defaults = cls()
    return {
        f.name: type(getattr(defaults, f.name))
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(getattr(defaults, f.name))
    }


def _check_keys(cls: type, raw: Any, prefix: str, drop_unknown: bool) -> None:
    """Refuse renamed keys (a class's RENAMED: old -> new) with the new name; drop unknown keys if asked."""
    if not isinstance(raw, DictConfig):
        return
    for old, new in getattr(cls, "RENAMED", {}).items():
        check(old not in raw, f"{prefix}{old}", f"renamed to {prefix}{new}")
    if drop_unknown:
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            log.warning("config: ignoring keys unknown to this version: %s", ", ".join(prefix + k for k in unknown))
            for key in unknown:
                del raw[key]
    for name, sub in sections(cls).items():
        if name in raw:
            _check_keys(sub, raw._get_node(name), f"{prefix}{name}.", drop_unknown)


def upgrade_keys(cls: type, cfg: Any) -> Any:
    """Rename in place the keys of a saved config (a mapping) that `cls` or its sections renamed since it was
    written (their RENAMED: old -> new), so a run saved by older code compares and loads; returns cfg."""
    if not isinstance(cfg, (dict, DictConfig)):
        return cfg
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in cfg:
            if new not in cfg:
                cfg[new] = cfg[old]
            del cfg[old]
    for name, sub in sections(cls).items():
        if name in cfg:
            upgrade_keys(sub, cfg[name])
    return cfg


def _read_file(path: str) -> DictConfig:
    p = Path(path).expanduser()
    check(p.is_file(), "config", f"no such file {path}")
    try:
        return OmegaConf.load(p)
    except OmegaConfBaseException:
        raise
    except Exception as err:  # YAML syntax errors and the like
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None


def _read_item(item: str) -> DictConfig:
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException:
        raise
    except Exception as err:  # a value that is not YAML
        raise ConfigError(f"{item.split('=', 1)[0]}: {str(err).splitlines()[0]}") from None


def load_config(
    cls: type[T], argv: Sequence[str] = (), *, base: Sequence[Any] = (), section: str = "", drop_unknown: bool = False
) -> DictConfig:
    """The structured defaults of `cls` <- each mapping of `base` <- `config=FILE` <- `key=value` items.

    section: the key path `cls` lives under (`model`), put in front of every error's key.
    drop_unknown: for configs saved by another version of the code (a checkpoint opened for export):
    renamed keys are read under their new names, keys `cls` does not know are dropped with a warning.
    """
    prefix = f"{section}." if section else ""
    try:
        files, dotlist = split_argv(argv)
        layers = [("config", b if isinstance(b, DictConfig) else OmegaConf.create(b)) for b in base if b is not None]
        layers += [(f, _read_file(f)) for f in files] + [(i.split("=", 1)[0], _read_item(i)) for i in dotlist]
        cfg = schema = _schema(cls)  # never changed: each merge returns a new config
        for name, layer in layers:
            if drop_unknown:  # a config saved by another version: renamed keys are read under their new names
                upgrade_keys(cls, layer)
            _check_keys(cls, layer, prefix, drop_unknown)
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except (TypeError, ValueError) as err:  # e.g. a mapping given where a list is declared
                raise ConfigError(f"{prefix}{name}: {str(err).splitlines()[0]}") from None
        return copy.deepcopy(schema) if cfg is schema else cfg  # the caller may change what it gets
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err, prefix)) from None


@functools.cache
def _schema(cls: type) -> DictConfig:
    """`OmegaConf.structured(cls)`, built once per class: it is most of a config's load time (a sweep's
    dry run validates every run's config)."""
    return OmegaConf.structured(cls)


def parse_args(cls: type[T], argv: Sequence[str] = (), **options: Any) -> T:
    """A `cls` instance from defaults, base layers, `config=FILE.yaml` and dotted overrides (the options
    are load_config's)."""
    return to_args(load_config(cls, argv, **options), options.get("section", ""))


def to_args(cfg: DictConfig, section: str = "") -> Any:
    """The dataclass instance of a loaded config (load_config's), errors as one line under `section`."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err, f"{section}." if section else "")) from None


def read_sections(cfg: Any, classes: dict[str, type]) -> dict[str, Any]:
    """Sections of a saved config (a run's config.yaml, as a mapping) as their dataclasses, e.g.
    {"model": ModelArgs}: renamed keys are read under their new names and keys this version does not
    know are dropped with a warning, so runs saved by older or newer code still open."""
    return {
        name: parse_args(cls, base=[cfg.get(name) or {}], section=name, drop_unknown=True)
        for name, cls in classes.items()
    }


def to_yaml(args: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(args))


def to_dict(args: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(args), resolve=True)  # type: ignore[return-value]


def dump_config(args: Any, path: str | os.PathLike) -> None:
    """Write the resolved config (what actually ran) next to the run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(to_yaml(args))
    tmp.replace(path)


# ----------------------------------------------------------------------------- value checks


INT64 = 2**63


def check_values(args: Any, prefix: str = "") -> None:
    """Values a typed merge lets through but no run can use, each a one-line ConfigError naming the
    key: a non-finite float, an int outside int64, and a value under a mapping- or list-typed field
    (e.g. `data.sources.x.y=1`) that is not of the declared element type. Walks nested dataclasses."""
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{prefix}{f.name}.")
        else:
            _check_value(f"{prefix}{f.name}", value, hints[f.name])


def _check_value(key: str, value: Any, hint: Any) -> None:
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in params:
            return
        hint = next(p for p in params if p is not type(None))
        origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        for k, v in value.items():
            _check_value(f"{key}.{k}", v, params[1])
    elif origin is list:
        check(isinstance(value, list), key, f"expected a list, got {value!r}")
        for i, v in enumerate(value):
            _check_value(f"{key}[{i}]", v, params[0])
    elif hint is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        check(math.isfinite(value), key, f"must be a finite number, got {value}")
    elif hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        check(-INT64 <= value < INT64, key, f"{value} is out of range (64-bit integers)")
    elif hint is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
    elif hint is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")


# ----------------------------------------------------------------------------- generated help


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its trailing `# comment` in the class source (and its dataclass bases')."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                m = FIELD.match(line)
                if m and m.group(2):
                    out[m.group(1)] = m.group(2).strip()
    return out


def key_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) of every leaf field, nested sections in place; a `one_of` field
    has its table's keys appended to the meaning."""
    helps, defaults, out = field_help(cls), cls(), []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out += key_rows(type(value), f"{prefix}{f.name}.")
            continue
        meaning = helps.get(f.name, "")
        if "choices" in f.metadata:
            meaning += f" (one of: {', '.join(f.metadata['choices']())})"
        out.append((f"{prefix}{f.name}", repr(value) if isinstance(value, str) else str(value), meaning))
    return out


def help_text(cls: type, usage: str, doc: str = "") -> str:
    """usage, the description, then every key with its default and meaning, grouped by section."""
    lines = [usage.rstrip()]
    if doc.strip():
        lines += ["", doc.strip()]
    lines += ["", "keys (key=default  meaning):"]
    group = None
    for key, default, meaning in key_rows(cls):
        head = key.rsplit(".", 1)[0] if "." in key else ""
        if head != group:
            group = head
            lines.append(f"{head}:" if head else "")
        item = f"  {key}={default}"
        lines += [item.ljust(HELP_COLUMN) + meaning] if len(item) < HELP_COLUMN else [item, " " * HELP_COLUMN + meaning]
    return "\n".join(lines)


HELP_COLUMN = 40  # where --help starts the meanings


# ----------------------------------------------------------------------------- the one CLI shape


def fill_positional(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """Leading arguments without `=` (and not a .yaml config) become `name=value` for the given names."""
    out, i = [], 0
    for item in argv:
        if "=" not in item and i < len(names) and not item.endswith(CONFIG_SUFFIXES):
            out.append(f"{names[i]}={item}")
            i += 1
        else:
            out.append(item)
    return out


def run_cli(
    argv: Sequence[str],
    cls: type[T],
    body: Callable[[T], int | None],
    usage: str,
    doc: str = "",
    positional: Sequence[str] = (),
    verbatim: Sequence[str] = (),
    base: Sequence[Any] = (),
) -> int:
    """Every command's shape: `-h`/`--help` prints usage, doc and every key of `cls`; leading bare
    arguments fill the `positional` keys; `verbatim` keys keep their text as given (not parsed as
    YAML); the rest is `config=FILE.yaml` and `key=value`. A ConfigError anywhere, the body included,
    prints `config error: ...` and returns 2; otherwise body's return value (None = 0)."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cls, usage, doc))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    try:
        flags = [a for a in argv if a.startswith("--")]
        check(not flags, flags[0] if flags else "", "options are key=value (see --help)")
        items = fill_positional(argv, positional)
        texts = dict(a.split("=", 1) for a in items if a.split("=", 1)[0] in verbatim)
        args = parse_args(cls, [a for a in items if a.split("=", 1)[0] not in verbatim], base=base)
        for key, text in texts.items():
            setattr(args, key, text)
        return body(args) or 0
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
