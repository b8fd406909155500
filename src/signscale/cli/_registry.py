"""How command modules plug into ``signscale``: each ``cli/*.py`` has ``register(r: Registry)``.

A module adds its commands with ``r.add(name, run, help)`` (or under a group such as ``bench`` or
``data`` with ``parent=``) and may list the exceptions that mean "bad input" in ``ERRORS``; those
end as one red line and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from rich.console import Console

console = Console(stderr=False, highlight=False)

Run = Callable[[argparse.Namespace], int]

GROUPS = {
    "data": "inspect packed datasets",
    "bench": "benchmarks that print side-by-side figures",
    "registry": "model versions and aliases (production, candidate, previous)",
    "continual": "the continual-learning loop: ingest, retrain, gate, promote",
}


class Registry:
    """Wraps argparse's subparsers so modules can add commands and sub-commands in any order."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub
        self._groups: dict[str, Any] = {}

    def group(self, name: str) -> Any:
        if name not in self._groups:
            p = self._sub.add_parser(name, help=GROUPS.get(name, name))
            self._groups[name] = p.add_subparsers(dest=f"{name}_cmd", metavar="SUBCOMMAND", required=True)
        return self._groups[name]

    def add(self, name: str, run: Run, help: str, *, parent: str | None = None,
            **kw: Any) -> argparse.ArgumentParser:
        sub = self.group(parent) if parent else self._sub
        p = sub.add_parser(name, help=help, **kw)
        p.set_defaults(run=run)
        return p
