"""The patching view: per condition the layer × head (+ attention block, MLP) heatmap of the mean normalised metric
(hover: its bootstrap CI and n), a click on a cell opens that site's value in every sample; the identity null and,
for attribution, the check against exact patching."""

from __future__ import annotations

from typing import Any

from plipy.report.base import fmt_num, fmt_p
from plipy.report.html.common import go, layout
from plipy.report.html.page import Section, esc, table_html
from plipy.report.patching import MAX_PANELS, fmt_ci, ranked
from plipy.results.patching import PatchResult, condition_label, condition_sites, site_grid
from plipy.results.views import VIEWS


@VIEWS.html(PatchResult)
def view(result: Any, sec: Section) -> None:
    """A heatmap per condition (click: the site's per-sample values), the nulls, the attribution check."""
    panel = sec.id("samples")
    shown = range(min(len(result["conditions"]), MAX_PANELS))
    for i in shown:
        c = result["conditions"][i]
        sec.figure(
            f"heatmap-{i}",
            heatmap(result, i),
            click={"target": panel, "fields": ["key"]},
            title=f"{condition_label(c)}: mean normalised {result['metric']['name']} (n = {c['n']})",
            note="0 = no effect, 1 = the whole clean − corrupt difference. Hover: the 95% bootstrap CI; click a "
            "cell for its value in every sample.",
        )
    panels = {key(i, s): sample_panel(result, i, j, s) for i in shown for j, s in ranked(result, i)}
    first = next(iter(ranked(result, 0)), None) if result["conditions"] else None
    sec.detail(
        "samples",
        panels,
        initial=None if first is None else key(0, first[1]),
        title="Per-sample values",
        note="The clicked site under the clicked condition (first shown: the largest mean effect).",
    )
    nulls(result, sec)
    if "attribution" in result:
        checks(result, sec)


def key(i: int, site: int) -> str:
    """The detail-panel key of a site under a condition (the customdata of its cell)."""
    return f"{i}|{site}"


def heatmap(result: Any, i: int) -> Any:
    """The condition's layer × column matrix; customdata [key, mean, CI, n]."""
    g = go()
    grid, columns, layers = site_grid(result, i)
    lo, _, _ = site_grid(result, i, "lo")
    hi, _, _ = site_grid(result, i, "hi")
    c = result["conditions"][i]
    where = {}
    for s in condition_sites(result, c):
        site = result["sites"][s]
        col = site["head"] if site["kind"] == "head" else columns.index(site["kind"])
        where[(layers.index(site["layer"]), col)] = s
    cd = [
        [
            [
                None if (r, k) not in where else key(i, where[(r, k)]),
                fmt_num(grid[r][k], ".3f"),
                fmt_ci(None if lo[r][k] is None else [lo[r][k], hi[r][k]]),
                c["n"],
            ]
            for k in range(len(columns))
        ]
        for r in range(len(layers))
    ]
    vals = [abs(v) for row in grid for v in row if v is not None]
    vmax = max(vals, default=1.0) or 1.0
    fig = g.Figure(
        g.Heatmap(
            z=grid,
            x=columns,
            y=[str(x) for x in layers],
            customdata=cd,
            colorscale="RdBu",
            reversescale=True,
            zmin=-vmax,
            zmax=vmax,
            colorbar={"title": {"text": "normalised", "side": "right"}, "thickness": 12},
            hoverongaps=False,
            hovertemplate="layer %{y}, %{x}<br>mean %{customdata[1]}<br>95% CI %{customdata[2]}"
            "<br>n = %{customdata[3]}<extra></extra>",
        )
    )
    fig.update_layout(
        **layout(
            height=max(260, 120 + 16 * len(layers)),
            xaxis={"type": "category", "tickfont": {"size": 9}},
            yaxis={"type": "category", "title": {"text": "layer"}, "autorange": "reversed"},
        )
    )
    return fig


def sample_panel(result: Any, i: int, j: int, s: int) -> str:
    """One site under one condition: its mean and CI, then its value in every sample."""
    c = result["conditions"][i]
    site = result["sites"][s]
    ci = None if c["ci"] is None else c["ci"][j]
    head = (
        f"<p><b>{esc(site['label'])}</b> — {esc(condition_label(c))}: mean {esc(fmt_num(c['mean'][j], '.4f'))}, "
        f"95% CI {esc(fmt_ci(ci))}, n = {c['n']}</p>"
    )
    group = {r["id"]: r["group"] for r in result["samples"]}
    per = c["samples"]
    rows = [
        [sid, group.get(sid), fmt_num(None if norm is None else norm[j], ".4f"), fmt_num(metric[j], ".5g")]
        for sid, metric, norm in zip(per["ids"], per["metric"], per["normalised"], strict=True)
    ]
    return head + table_html(["sample", "group", "normalised", result["metric"]["name"]], rows)


def nulls(result: Any, sec: Section) -> None:
    """The identity null per direction and the samples left out."""
    rows = [
        [n["direction"], n["n"], "yes" if n["exact"] else "no", f"{n['max_abs_metric_change']:.3g}"]
        for n in result.get("identity", [])
    ]
    excl = "; ".join(f"{e['id']} ({e['group']}): {e['status']}" for e in result["excluded"]) or "none"
    sec.table(
        "nulls",
        ["direction", "samples", "metric unchanged exactly", "largest change"],
        rows,
        title="Identity null",
        note="The target run patched with its own values at every site and position must keep its metric "
        f"exactly. Samples left out of the statistics: {excl}.",
    )


def checks(result: Any, sec: Section) -> None:
    """Attribution against exact patching of the heads it ranks highest."""
    a = result["attribution"]
    rows = [
        [
            f"{ch['direction']} @ {ch['position']}",
            len(ch["sites"]),
            fmt_num(ch["spearman"], ".3f"),
            fmt_p(ch["p"]),
            ", ".join(
                f"{s} {fmt_num(x, '.2f')}→{fmt_num(y, '.2f')}"
                for s, x, y in list(zip(ch["sites"], ch["attribution"], ch["exact"], strict=True))[:5]
            ),
        ]
        for ch in a["checks"]
    ]
    sec.table(
        "attribution",
        ["condition", "heads", "Spearman ρ", "p", "top heads: estimate → exact"],
        rows,
        title=f"Attribution checked against exact patching of its top {a['top']} heads",
        note=a["note"],
    )
