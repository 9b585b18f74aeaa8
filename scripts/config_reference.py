"""Generate the config reference (every key, its default, one line) from the *Args dataclasses.

The rows are those of every command's `--help` (lingua_wd.args.key_rows: each field's trailing
`# comment`, and the table keys of a `one_of` field). `python scripts/config_reference.py --write`
refreshes the table between the markers in README.md; tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua_wd.args import key_rows  # noqa: E402
from lingua_wd.train import TrainArgs  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def table() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {h.replace('|', chr(92) + '|')} |" for k, d, h in key_rows(TrainArgs)]
    return "\n".join(lines)


def render(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description="Print the config reference table (every trainer key, default, meaning).")
    ap.add_argument("--write", action="store_true", help="refresh the table between the markers in README.md")
    if ap.parse_args().write:
        README.write_text(render(README.read_text()))
    else:
        print(table())


if __name__ == "__main__":
    main()
