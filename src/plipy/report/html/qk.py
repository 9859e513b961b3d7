"""The QK attribution's view: a component × component heatmap per group (and for the contrast and the intervention),
each input's value of the top pairs (stability), and the tables of top pairs and side components."""

from __future__ import annotations

from typing import Any

from plipy.report.html.common import color, go, layout
from plipy.report.html.page import Section
from plipy.report.qk import fmt, fmt_share, head_label, panels, stability_points
from plipy.results.qk import QkResult
from plipy.results.views import VIEWS


def heatmap(m: dict[str, Any], title: str) -> Any:
    """One panel's mean matrix (query side rows, key side columns) on a symmetric red-blue scale."""
    g = go()
    vals = [v for row in m["values"] for v in row]
    lim = max((abs(v) for v in vals), default=1.0) or 1.0
    fig = g.Figure(
        g.Heatmap(
            z=m["values"],
            x=m["key"],
            y=m["query"],
            colorscale="RdBu",
            reversescale=True,
            zmin=-lim,
            zmax=lim,
            hovertemplate="query %{y} · key %{x}: %{z:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        **layout(
            title,
            height=220 + 16 * len(m["query"]),
            xaxis={"title": "key side", "tickfont": {"size": 9}},
            yaxis={"title": "query side", "autorange": "reversed", "tickfont": {"size": 9}},
        )
    )
    return fig


def stability(result: QkResult, head: str) -> Any:
    """Every input's value of the top pairs, one colour per group."""
    g = go()
    pts = stability_points(result, head, n=8)
    groups = list(result["decomposition"][head]["groups"])
    traces = []
    for gi, grp in enumerate(groups):
        xs, ys = [], []
        for name, by_group in pts:
            v = by_group.get(grp, [])
            xs += v
            ys += [name] * len(v)
        traces.append(
            g.Box(
                x=xs,
                y=ys,
                name=grp,
                orientation="h",
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker={"color": color(gi), "size": 5},
                line={"width": 1},
                fillcolor="rgba(0,0,0,0)",
            )
        )
    fig = g.Figure(traces)
    fig.update_layout(
        **layout(
            height=140 + 42 * len(pts),
            boxmode="group",
            xaxis={"title": "contribution to the score", "zeroline": True},
            yaxis={"autorange": "reversed", "tickfont": {"size": 9}},
        )
    )
    return fig


def _pair_rows(b: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    if b["pairs"] and "diff" in b["pairs"][0]:
        cols = ["query", "key", "mean A", "mean B", "A − B", "share of the difference", "Welch p (BH)"]
        rows = [
            [
                p["query"],
                p["key"],
                fmt(p["mean_a"]),
                fmt(p["mean_b"]),
                fmt(p["diff"]),
                fmt_share(p["share"]),
                fmt(p["p_bh"], ".2g"),
            ]
            for p in b["pairs"]
        ]
        return cols, rows
    cols = ["query", "key", "mean", "sd", "share of the score", "same sign", "in the input's top"]
    rows = [
        [
            p["query"],
            p["key"],
            fmt(p["mean"]),
            fmt(p["sd"]),
            fmt_share(p["share"]),
            fmt_share(p["same_sign"]),
            fmt_share(p["in_top"]),
        ]
        for p in b["pairs"]
    ]
    return cols, rows


def _side_rows(b: dict[str, Any]) -> list[list[Any]]:
    key = "diff" if b["query_side"] and "diff" in b["query_side"][0] else "mean"
    return [
        [q["component"], fmt(q[key]), fmt_share(q["share"]), k["component"], fmt(k[key]), fmt_share(k["share"])]
        for q, k in zip(b["query_side"], b["key_side"], strict=False)
    ]


@VIEWS.html(QkResult)
def view(result: QkResult, sec: Section) -> None:
    """Heatmaps, stability of the top pairs, and per panel the tables of top pairs and side components (the
    headline head: the mean over heads when there are several)."""
    head = result.headline()
    for i, (title, b) in enumerate(panels(result, head)):
        sec.figure(
            f"heatmap-{i}",
            heatmap(b["matrix"], title),
            title=f"Contributions to the score — {title} ({head_label(head)})",
            note="Rows: query-side components; columns: key-side components; each cell the mean over inputs of "
            "their term (the largest components by absolute mass; the table file holds every pair).",
        )
    sec.figure(
        "stability",
        stability(result, head),
        title="Stability: every input's value of the top pairs",
        note="One point per input; the pairs are the contrast's top pairs (else the first group's).",
    )
    for i, (title, b) in enumerate(panels(result, head)):
        cols, rows = _pair_rows(b)
        sec.table(f"pairs-{i}", cols, rows, title=f"Top pairs — {title}")
        sec.table(
            f"sides-{i}",
            ["query side", "value", "share", "key side", "value", "share"],
            _side_rows(b),
            title=f"Each side's top components — {title}",
        )
