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


def render_text(renderables: list[Any], width: int = 160) -> str:
    """Rich tables and lines as plain text (what `result.summary()` returns)."""
    import io

    from rich.console import Console

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
            target.print(r)
