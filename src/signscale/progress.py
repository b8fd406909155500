"""Progress bars for long work: rich on a terminal, a quiet no-op elsewhere (CI logs, tests)."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True,
                 unit: str = "samples") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows rate and ETA when stderr is a terminal and ``enabled``."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*columns, transient=True) as prog:
        task = prog.add_task(description, total=total, rate="")

        def advance(n: int) -> None:
            prog.update(task, advance=n)
            t = prog.tasks[0]
            if t.speed:
                prog.update(task, rate=f"{t.speed:,.0f} {unit}/s")

        yield advance
