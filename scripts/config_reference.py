"""Generate the config reference (every key, its default, one line) from the *Args dataclasses.

The help text is each field's trailing `# comment`. `python scripts/config_reference.py --write`
refreshes the table between the markers in README.md; tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua_wd.train import TrainArgs  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def comments(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = FIELD.match(line)
            if m and m.group(2):
                out[m.group(1)] = m.group(2).strip()
    return out


def rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    out = []
    helps = comments(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out += rows(type(value), f"{prefix}{f.name}.")
        else:
            out.append(
                (f"{prefix}{f.name}", repr(value) if isinstance(value, str) else str(value), helps.get(f.name, ""))
            )
    return out


def table() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {h} |" for k, d, h in rows(TrainArgs)]
    return "\n".join(lines)


def render(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        README.write_text(render(README.read_text()))
    else:
        print(table())
