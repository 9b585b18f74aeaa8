"""`lingua-wd <command> ...`: one console entry for the project's commands.

Commands are imported only when called (the trainer pulls in torch.distributed; `report` only needs
matplotlib). Each target is a `main(argv)` returning an exit code; a `main()` without parameters is
called with sys.argv set to the command line instead.
"""

from __future__ import annotations

import importlib
import inspect
import sys

COMMANDS = {
    "train": ("lingua_wd.train:main", "train one run: config=FILE.yaml key=value ..."),
    "sweep": ("lingua_wd.sweep:main", "expand a sweep YAML and run it locally or submit it to SLURM"),
    "status": ("lingua_wd.status:main", "every run of a sweep dir: state, step, last loss; k of N done and the ETA"),
    "report": ("lingua_wd.report:main", "LR-transfer plots and table of a sweep dir"),
    "coordcheck": ("lingua_wd.coordcheck:main", "activation / update RMS per layer class vs width"),
    "transfer": ("lingua_wd.transfer:main", "per-class LR and WD at other widths under each scaling rule"),
    "export": ("lingua_wd.export:main", "checkpoint -> HF LlamaForCausalLM folder (safetensors + tokenizer)"),
    "eval": ("lingua_wd.eval:main", "validation loss of a checkpoint or exported folder"),
    "generate": ("lingua_wd.generate:main", "sample text (temperature / top-p, seeded)"),
}


def usage() -> str:
    lines = ["usage: lingua-wd COMMAND [args ...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`lingua-wd COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"lingua-wd: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, _, func = COMMANDS[argv[0]][0].partition(":")
    try:
        fn = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        print(f"lingua-wd: command {argv[0]!r} is not available ({module} is missing)", file=sys.stderr)
        return 2
    if inspect.signature(fn).parameters:
        return fn(argv[1:]) or 0
    sys.argv = [f"lingua-wd {argv[0]}", *argv[1:]]
    return fn() or 0


if __name__ == "__main__":
    sys.exit(main())
