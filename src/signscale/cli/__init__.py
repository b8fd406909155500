"""``signscale ...``: one subcommand per library function: parse -> config -> call -> print summary.

Nothing here does work of its own; every command is a call Python code can make too. Each module
of this package registers its commands (see ``_registry.py``), so the parser is the union of them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from types import ModuleType
from typing import Any

from rich.markup import escape

from signscale.cli._commands import Commands, Parser, console

__all__ = ["build_parser", "console", "main", "run"]


def _modules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    names.sort(key=lambda n: n != "core")  # core commands first in --help
    return [importlib.import_module(f"{__name__}.{n}") for n in names]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="signscale", description="Traffic-sign recognition from a laptop to a cluster.",
               epilog="Every option works as --key value and --key=value. Exit codes: 0 the work was done, "
                      "1 nothing usable came out (or an unexpected error), 2 a usage error (see the README).")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error (also SIGNSCALE_DEBUG=1); may appear anywhere")
    reg = Commands(p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser))
    for mod in _modules():
        mod.register(reg)
    return p


def _errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [FileNotFoundError]
    for mod in _modules():
        errs.extend(getattr(mod, "errors", lambda: ())())
    return tuple(errs)


def _debug(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` wherever it is (before a ``--``), or SIGNSCALE_DEBUG=1; the rest of argv."""
    end = argv.index("--") if "--" in argv else len(argv)
    flag = "--debug" in argv[:end]
    rest = [a for i, a in enumerate(argv) if not (i < end and a == "--debug")]
    return flag or os.environ.get("SIGNSCALE_DEBUG", "") not in ("", "0"), rest


def _say_error(exc: BaseException, *, hint: str = "") -> None:
    text = str(exc) or type(exc).__name__
    if text.startswith("Caught "):  # from a DataLoader worker: its own message, not torch's traceback
        from signscale.data.stream import worker_message

        text = worker_message(exc)
    # one unbroken line (a path or a command in it stays copyable), the text as written (no markup)
    console.print(f"[red]error:[/] {escape(text)}{hint}", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    debug, argv = _debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, _errors()):  # bad input: the message says which and how to fix it
            _say_error(exc)
            return 2
        # not a known kind of bad input, so possibly a bug: the last line of the traceback, and how to see it
        name = type(exc).__name__
        _say_error(exc, hint=f" ({name}; run again with --debug or SIGNSCALE_DEBUG=1 for the traceback)")
        return 1


def run() -> Any:
    sys.exit(main())
