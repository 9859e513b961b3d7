"""Progress of long work: `start(description, total) -> step()`. The CLI draws rich bars on stderr; the Python API
shows a notebook-aware bar (`tqdm.auto`: a widget in Jupyter, text elsewhere) unless `progress=False`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plipy.runtime.experiment import Progress


def auto_bars(description: str, total: int) -> Callable[..., None]:
    """A `tqdm.auto` bar of `total` steps; `step(n=1, **metrics)` advances it (metrics shown beside it) and the bar
    closes itself at its total."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, leave=True, dynamic_ncols=True)

    def step(n: int = 1, **metrics: Any) -> None:
        bar.update(n)
        if metrics:
            bar.set_postfix(metrics, refresh=False)
        if bar.n >= total:
            bar.close()

    if total == 0:
        bar.close()
    return step


def resolve(progress: Progress | bool | None) -> Progress | None:
    """The progress callback of a Python API call: None or True → the notebook-aware bars, False → silent, a
    callable → itself."""
    if progress is False:
        return None
    if progress is None or progress is True:
        return auto_bars
    return progress
