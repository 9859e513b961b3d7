"""Corpus reports: the token-position table of `plipy corpus verify` and its status counts."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.table import Table
from rich.text import Text

from plipy.corpus import STATUSES, SamplePositions

STATUS_STYLE = {
    "perfect": "green",
    "ok": "cyan",
    "fallback": "yellow",
    "causal-violation": "magenta",
    "target-on-marker": "magenta",
    "failed": "bold red",
}


def verify_summary(positions: list[SamplePositions], model: str) -> tuple[dict[str, int], list[Any]]:
    """(status counts, the console report): one table row per sample, then what each status means."""
    out: list[Any] = [_table(positions, model)]
    counts = Counter(sp.status for sp in positions)
    # target-on-marker (added later) only when it occurs: earlier documents keep their keys
    summary = {s: counts.get(s, 0) for s in STATUSES if s != "target-on-marker" or counts.get(s)}
    parts = [f"{n} {s}" for s, n in summary.items() if n]
    out.append(f"{len(positions)} samples: " + ", ".join(parts))
    if summary["causal-violation"]:
        out.append(
            Text(
                f"{summary['causal-violation']} samples have targets after the marker (marked !): attention to those "
                "is causally impossible; scans report them, knockout/steering refuse those edges",
                style="magenta",
            )
        )
    if summary.get("target-on-marker"):
        out.append(
            Text(
                f"{summary.get('target-on-marker')} samples have a target on the marker's own token (marked =): that"
                " is the marker's self-attention; scans leave such targets out, knockout/steering refuse them",
                style="magenta",
            )
        )
    if summary["fallback"]:
        out.append(
            Text(
                f"{summary['fallback']} samples have positions no token covers (marked ~): mapped to "
                "the token with the nearest midpoint",
                style="yellow",
            )
        )
    if summary["failed"]:
        out.append(Text(f"{summary['failed']} samples failed: a position has no token", style="bold red"))
    return summary, out


def _table(positions: list[SamplePositions], model: str) -> Table:
    table = Table(title=f"token positions ({model})", title_justify="left")
    for col in ("id", "group", "marker", "targets", "status"):
        table.add_column(col, overflow="fold")
    for sp in positions:
        # Text objects, not markup strings: token texts such as "#[" would be read as rich markup.
        marker = Text(_mark(sp.marker_token, sp.marker_text, sp.marker_match, False))
        targets = Text(
            " ".join(
                _mark(t, text, how, after, t is not None and t == sp.marker_token)
                for t, text, how, after in zip(
                    sp.target_tokens, sp.target_texts, sp.target_matches, sp.after_marker, strict=True
                )
            )
        )
        status = Text(sp.status, style=STATUS_STYLE.get(sp.status, ""))
        table.add_row(Text(sp.sample.id), Text(sp.sample.group), marker, targets, status)
    return table


def _mark(token: int | None, text: str | None, how: str, after: bool, on_marker: bool = False) -> str:
    """`12:' add'`, prefixed by `~` for a fallback match, `!` for a target after the marker and `=` for one on the
    marker's own token."""
    if token is None:
        return "?"
    return ("!" if after else "=" if on_marker else "") + ("~" if how == "fallback" else "") + f"{token}:{text!r}"
