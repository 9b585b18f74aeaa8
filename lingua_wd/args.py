"""Typed configuration: dataclass defaults <- `config=FILE.yaml` <- dotted CLI overrides.

Every error is a `ConfigError` whose message is one line starting with the offending key, so a
misspelt key, a wrong type or an invalid value stops the run before any work is done.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration: the message is one line, `key: what is wrong`."""


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", None) or err).splitlines()[0].strip()
    return f"{key}: {msg}" if key else msg


def load_config(cls: type[T], argv: list[str]) -> Any:
    """Merge the structured defaults of `cls`, an optional `config=FILE`, and `key=value` items."""
    files = [a.split("=", 1)[1] for a in argv if a.startswith("config=")]
    dotlist = [a for a in argv if not a.startswith("config=")]
    if len(files) > 1:
        raise ConfigError("config: given more than once")
    for item in dotlist:
        if "=" not in item:
            raise ConfigError(f"{item}: expected key=value")
    layers = [OmegaConf.structured(cls)]
    try:
        if files:
            path = Path(files[0])
            if not path.is_file():
                raise ConfigError(f"config: no such file {path}")
            layers.append(OmegaConf.load(path))
        layers.append(OmegaConf.from_dotlist(dotlist))
        return OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    except Exception as err:  # YAML syntax errors and the like
        if isinstance(err, ConfigError):
            raise
        name = files[0] if files else "config"
        raise ConfigError(f"{name}: {str(err).splitlines()[0]}") from None


def parse_args(cls: type[T], argv: list[str]) -> T:
    """Return a `cls` instance built from defaults, `config=FILE.yaml` and dotted overrides."""
    cfg = load_config(cls, argv)
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None


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


def check(cond: bool, key: str, msg: str) -> None:
    """Raise a one-line `ConfigError` naming `key` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


INT64 = 2**63


def check_values(args: Any, prefix: str = "") -> None:
    """Values a typed merge lets through but no run can use, each a one-line ConfigError naming the
    key: a non-finite float, an int outside int64, and a value under a mapping- or list-typed field
    (e.g. `data.sources.x.y=1`) that is not of the declared element type. Walks nested dataclasses."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{prefix}{f.name}.")
        else:
            _check_value(f"{prefix}{f.name}", value, hints[f.name])


def _check_value(key: str, value: Any, hint: Any) -> None:
    import math
    import types
    import typing

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


def run_cli(argv: list[str], doc: str, body: Callable[[list[str]], None]) -> int:
    """The shared shape of the small CLIs: -h prints the module doc, logging to the console, a
    ConfigError becomes `config error: ...` on stderr and exit code 2."""
    import logging
    import sys

    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    try:
        body(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0
