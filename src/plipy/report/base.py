"""What every report shares: colours, the matplotlib (Agg) handle, PNG writing, 95% CIs, number formats, and
rendering console tables to text."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from plipy.io import atomic_write_bytes

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # a notebook that chose its backend keeps it
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, close: bool = True) -> bytes:
    """The figure as PNG bytes (closed afterwards unless `close=False`)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    if close:
        pyplot().close(fig)
    return buf.getvalue()


def save_png(fig: Any, path: str | Path) -> Path:
    """Write the figure as a PNG atomically and close it."""
    return atomic_write_bytes(path, png_bytes(fig))


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and t-based 95% CI of the mean."""
    from scipy import stats as st

    a = np.asarray(values, float)
    m = float(a.mean())
    if len(a) < 2:
        return m, m, m
    h = float(st.sem(a) * st.t.ppf(0.975, len(a) - 1))
    return m, m - h, m + h


def fmt_pct(x: Any) -> str:
    """A fraction as a percentage with two decimals; None as a dash."""
    return "—" if x is None else f"{100 * x:.2f}%"


def fmt_num(x: Any, spec: str = ".2f") -> str:
    """A number in `spec` format; None as a dash."""
    return "—" if x is None else format(x, spec)


def fmt_p(p: Any) -> str:
    """A p-value: scientific below 1e-4, four decimals otherwise; None as a dash."""
    if p is None:
        return "—"
    return f"{p:.1e}" if p < 1e-4 else f"{p:.4f}"


def fmt_kl(x: Any) -> str:
    """A KL (nats) in scientific notation; None as a dash."""
    return "—" if x is None else f"{x:.2e}"


def run_seconds(result: Mapping[str, Any]) -> float:
    """Wall-clock seconds of a run: `provenance.timing` (files written before it moved there: top-level `timing`)."""
    timing = result["provenance"].get("timing") or result.get("timing") or {}
    return float(timing.get("seconds") or 0.0)


def text_width() -> int:
    """The width of plain-text reports: $COLUMNS when set (a terminal says its width there), else 160."""
    import os

    try:
        return max(40, int(os.environ["COLUMNS"]))
    except (KeyError, ValueError):
        return 160


def render_text(renderables: list[Any], width: int | None = None) -> str:
    """Rich tables and lines as plain text (what `result.summary()` returns), `width` columns wide (default
    `text_width()`); a cell wraps at word boundaries and never cuts a word."""
    import io

    from rich.console import Console

    width = width or text_width()
    buf = io.StringIO()
    con = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False, soft_wrap=False)
    print_all(con, renderables)
    return buf.getvalue()


class Note(str):
    """A report line that warns (a sample left out, a target not measured): the CLI prints it on stderr."""


def print_all(console: Any, renderables: list[Any], notes: Any = None) -> None:
    """Print tables and lines; plain strings are printed as text (ids and notes may hold `[`, never markup).
    `Note`s go to the `notes` console (stderr in the CLI) when one is given."""
    from rich.text import Text

    for r in renderables:
        target = notes if notes is not None and isinstance(r, Note) else console
        if isinstance(r, str):
            target.print(Text(r, style="yellow" if isinstance(r, Note) else ""), soft_wrap=True)
        else:
            target.print(whole_words(r))


LONGEST_WORD = 40  # a longer "word" is a path or a URL: it may fold rather than widen its column past the screen


def whole_words(renderable: Any) -> Any:
    """A rich Table whose columns are at least as wide as their longest word (header or cell; up to
    `LONGEST_WORD`), so a narrow terminal wraps cells between words and never cuts a name in two; other
    renderables as they are."""
    from rich.table import Table

    if not isinstance(renderable, Table):
        return renderable
    for col in renderable.columns:
        texts = [str(col.header), *(str(c) for c in col._cells)]
        longest = max((len(w) for t in texts for w in t.split() if len(w) <= LONGEST_WORD), default=0)
        col.min_width = max(col.min_width or 0, longest)
        col.overflow = "fold"
    return renderable
