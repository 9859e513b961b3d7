"""The scan's view: per-layer curves of each group with CIs beside the uniform null and the token-0 share (hover:
each sample), the layer × head difference heatmap with BH outlines, and the token view that clicks on either open."""

from __future__ import annotations

from typing import Any

import numpy as np

from plipy.report.html.common import ci_traces, color, go, layout
from plipy.report.html.page import Section
from plipy.report.html.tokens import TokenSample, payload
from plipy.results.scan import ScanResult
from plipy.results.views import VIEWS

NO_ROWS = (
    "No token view: the attention rows are not in this result. A scan saves them beside its JSON as "
    "<stem>-rows.npz; {why}. Rerun the scan (one forward per sample) to get them."
)


@VIEWS.html(ScanResult)
def view(result: Any, sec: Section) -> None:
    """Layer curves (attention, excess), the per-head heatmap, and the token view when the rows are here."""
    measured = [s for s in result["samples"] if "attention" in s]
    rows = result.extras.get("rows", {}) if result.has_rows else {}
    shown = [s for s in measured if s["id"] in rows]
    index = {s["id"]: i for i, s in enumerate(shown)}
    tv = sec.id("tokens") if shown else None
    click = {"target": tv, "fields": ["layer", "head", "sample"]} if tv else None
    hint = " Click a sample's point to show its tokens at that layer." if tv else ""
    sec.figure(
        "layers",
        curves(result, measured, "attention", index),
        click=click,
        title="Attention marker → targets per layer (95% CI)",
        note="Group means with t-based 95% CIs; faint points: each sample; dashed: the uniform null 1/(m+1) "
        "of each group; dotted (right axis): the share of attention on token 0, the sink." + hint,
    )
    sec.figure(
        "excess",
        curves(result, measured, "excess", index),
        click=click,
        title="Excess over uniform attention per layer (95% CI)",
        note="attention / (1/(m+1)): the position-controlled effect; 1 = uniform attention." + hint,
    )
    sec.figure(
        "heads",
        heads_heatmap(result, index),
        title="Layer × head difference of the group means",
        click={"target": tv, "fields": ["layer", "head"]} if tv else None,
        note="Outlined: Benjamini–Hochberg p < 0.05 (Welch per head)."
        + (" Click a cell to show that layer and head in the token view." if tv else ""),
    )
    if tv:
        sec.tokens(
            "tokens",
            token_payload(result, shown),
            title="Token view: the marker's attention row",
            note="Colour: the marker row's weight on each token at the chosen layer and head (or the mean of "
            "the heads the metric averages), relative to the largest weight after token 0. Blue outline:"
            " the marker; green: the targets; grey: tokens after the marker (causally invisible).",
        )
    else:
        missing = result.extras.get("rows_missing")
        why = f"{missing} is missing" if missing else "this result has none"
        sec.text("tokens", NO_ROWS.format(why=why), title="Token view")


def token_payload(result: Any, shown: list[dict[str, Any]]) -> dict[str, Any]:
    """The token view of every measured sample, opened at the scan's token layer (best by Holm, else the last)."""
    samples = [
        TokenSample(
            id=s["id"],
            group=s["group"],
            tokens=result.token_texts(s["id"]),
            marker=s["marker_token"],
            targets=s["measured_targets"],
            after=[t for t in s.get("targets_after_marker", []) if t is not None],
            rows=result.extras["rows"][s["id"]],
            values=s["attention"],
        )
        for s in shown
    ]
    return payload(samples, result["layers_scanned"], result["heads"], initial_layer=result.token_layer())


def curves(result: Any, measured: list[dict[str, Any]], key: str, index: dict[str, int]) -> Any:
    """One group per colour: mean with CI band, each sample as a faint point, the nulls as dashed/dotted lines."""
    g = go()
    layers = result["layers_scanned"]
    groups = result.provenance["config"]["groups"]
    fig = g.Figure()
    for gi, grp in enumerate(groups):
        rows = [s for s in measured if s["group"] == grp]
        if not rows:
            continue
        col = color(gi)
        vals = [[s[key][i] for s in rows] for i in range(len(layers))]
        fig.add_traces(ci_traces(layers, vals, name=f"{grp} (n={len(rows)})", col=col, legendgroup=grp))
        off = (gi - (len(groups) - 1) / 2) * 0.12  # groups side by side at each layer
        pts = [
            (layer + off, s[key][i], [layer, None, index.get(s["id"])], s["id"])
            for s in rows
            for i, layer in enumerate(layers)
        ]
        fig.add_trace(
            g.Scatter(
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                customdata=[p[2] for p in pts],
                text=[p[3] for p in pts],
                mode="markers",
                marker={"size": 5, "color": col, "opacity": 0.35},
                name=f"{grp}: samples",
                legendgroup=grp,
                showlegend=False,
                hovertemplate=f"%{{text}} ({grp})<br>layer %{{customdata[0]}}: {key} %{{y:.4g}}<extra></extra>",
            )
        )
        if key == "attention":
            null = float(np.mean([s["uniform_null"] for s in rows]))
            fig.add_trace(
                g.Scatter(
                    x=[layers[0], layers[-1]],
                    y=[null, null],
                    mode="lines",
                    legendgroup=grp,
                    line={"color": col, "dash": "dash", "width": 1},
                    name=f"{grp}: uniform null 1/(m+1)",
                    hovertemplate=f"{grp}: mean uniform null %{{y:.4g}}<extra></extra>",
                )
            )
            sink = [float(np.mean([s["first_token_share"][i] for s in rows])) for i in range(len(layers))]
            fig.add_trace(
                g.Scatter(
                    x=layers,
                    y=sink,
                    mode="lines",
                    yaxis="y2",
                    legendgroup=grp,
                    line={"color": col, "dash": "dot", "width": 1.2},
                    name=f"{grp}: share on token 0",
                    hovertemplate=f"{grp}: token-0 share %{{y:.3f}} at layer %{{x}}<extra></extra>",
                )
            )
    more: dict[str, Any] = {"xaxis": {"title": {"text": "layer"}}}
    if key == "attention":
        more["yaxis"] = {"title": {"text": "attention (head mean)"}, "rangemode": "tozero"}
        more["yaxis2"] = {
            "title": {"text": "share on token 0 (dotted)"},
            "overlaying": "y",
            "side": "right",
            "range": [0, 1],
            "tickmode": "linear",
            "dtick": 0.2,
            "showgrid": False,
        }
        more["margin"] = {"l": 60, "r": 60, "t": 20, "b": 50}
    else:
        more["yaxis"] = {"title": {"text": "attention / uniform null"}}
        fig.add_hline(y=1.0, line={"color": "grey", "dash": "dash", "width": 1})
    fig.update_layout(**layout(height=420, **more))
    return fig


def heads_heatmap(result: Any, index: dict[str, int]) -> Any:
    """Mean attention of group A − group B per layer (rows) and head (columns); BH-significant cells outlined."""
    g = go()
    ph = result["per_head"]
    ga, gb = result["groups_compared"]
    diff = np.array(ph["mean_diff"], dtype=float)
    t, p, pbh = (np.array(ph[k], dtype=float) for k in ("t", "p", "p_bh"))
    layers, heads = ph["layers"], ph["heads"]
    cd = [
        [[layer, head, _num(t[li, hi]), _num(p[li, hi]), _num(pbh[li, hi])] for hi, head in enumerate(heads)]
        for li, layer in enumerate(layers)
    ]
    lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
    fig = g.Figure(
        g.Heatmap(
            z=diff.tolist(),
            x=[f"H{h}" for h in heads],
            y=[f"L{layer}" for layer in layers],
            customdata=cd,
            colorscale="RdBu",
            reversescale=True,
            zmin=-(lim or 1.0),
            zmax=lim or 1.0,
            zmid=0,
            colorbar={"title": {"text": f"{ga} − {gb}", "side": "right"}, "thickness": 12},
            hovertemplate=(
                "layer %{customdata[0]}, head %{customdata[1]}<br>mean difference %{z:.4g}<br>"
                "t %{customdata[2]:.3g}, p %{customdata[3]:.3g}, p BH %{customdata[4]:.3g}<extra></extra>"
            ),
        )
    )
    sig = np.nan_to_num(pbh, nan=1.0) < 0.05
    for li, hi in zip(*np.nonzero(sig), strict=True):
        fig.add_shape(
            type="rect", x0=hi - 0.5, x1=hi + 0.5, y0=li - 0.5, y1=li + 0.5, line={"color": "black", "width": 2}
        )
    fig.update_layout(
        **layout(
            height=140 + 18 * len(layers),
            xaxis={"title": {"text": "head"}, "type": "category"},
            yaxis={"title": {"text": "layer"}, "type": "category", "autorange": "reversed"},
        )
    )
    return fig


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
