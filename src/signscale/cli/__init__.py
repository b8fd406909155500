"""``signscale ...``: one subcommand per library function: parse -> config -> call -> print summary.

Nothing here does work of its own; every command is a call Python code can make too. Each module
of this package registers its commands (see ``_registry.py``), so the parser is the union of them.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType
from typing import Any

from rich.markup import escape

from signscale.cli._registry import Registry, console

__all__ = ["build_parser", "main", "run", "console"]


def _modules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    names.sort(key=lambda n: n != "core")  # core commands first in --help
    return [importlib.import_module(f"{__name__}.{n}") for n in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="signscale", description="Traffic-sign recognition from a laptop to a cluster.")
    reg = Registry(p.add_subparsers(dest="cmd", metavar="COMMAND"))
    for mod in _modules():
        mod.register(reg)
    return p


def _errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [FileNotFoundError]
    for mod in _modules():
        errs.extend(getattr(mod, "errors", lambda: ())())
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "cmd", None) == "train":
        args.extra = unknown  # --key=value overrides
    elif unknown and hasattr(args, "overrides") and all("=" in u for u in unknown):
        args.overrides = [*args.overrides, *unknown]  # key=value overrides given after the options
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except Exception as exc:
        if not isinstance(exc, _errors()):  # a bug, not bad input: keep the traceback
            raise
        text = str(exc)
        if text.startswith("Caught "):  # from a DataLoader worker: its own message, not torch's traceback
            from signscale.stream import worker_message

            text = worker_message(exc)
        # one unbroken line (a path or a command in it stays copyable), the text as written (no markup)
        console.print(f"[red]error:[/] {escape(text)}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def run() -> Any:
    sys.exit(main())
