"""Bits every command shares: the console, progress bars, and option parsing helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """Yields `start(description, total) -> step()`; bars draw on stderr so stdout stays a clean table."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=err_console, transient=False,
    ) as prog:

        def start(desc: str, total: int) -> Callable[[], None]:
            task = prog.add_task(desc, total=total)
            return lambda: prog.advance(task)

        yield start


def split_list(values: list[str] | None) -> list[str] | None:
    """`--groups a b`, `--groups a,b` and repeated options all give ['a', 'b']."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]
