"""The SAE-attention view, per measure: per-head bars, original-vs-steered scatter, the layer × head heatmap with
the steering layer marked, known-vs-unknown boxes and the random-latent test table."""

from __future__ import annotations

from typing import Any

import numpy as np

from plipy.report.base import fmt_num, fmt_p
from plipy.report.html.common import color, go, layout
from plipy.report.html.page import Section, esc
from plipy.report.sae import LABEL_COLORS, scatter_heads
from plipy.results.sae_attention import SaeAttentionResult
from plipy.results.views import VIEWS

SYMBOLS = ["circle", "square", "diamond", "x", "triangle-up", "triangle-down", "cross", "star"]


@VIEWS.html(SaeAttentionResult)
def view(result: Any, sec: Section) -> None:
    """Every measure of the run, one after the other; the prompts at the end."""
    prompts = result["prompts"]
    for m in result["measures"]:
        sec.figure(
            f"bars-{m}",
            bars(result, m),
            title=f"{m}: mean difference per head (steered − original)",
            note="Mean ± std (ddof 0) over prompts for each saved head, as upstream's plot_head_differences.",
        )
        sec.figure(
            f"scatter-{m}",
            scatter(result, m, prompts),
            title=f"{m}: original vs steered, the heads that moved most",
            note="One point per prompt: colour per head, symbol per entity type; dashed: no change.",
        )
        sec.figure(
            f"heatmap-{m}",
            heatmap(result, m),
            title=f"{m}: mean difference per layer and head",
            note=f"The black line marks the steering layer {result['layer']} (the latent is added at its "
            "input): heads above it cannot change.",
        )
        box = boxes(result, m, prompts)
        if box is not None:
            sec.figure(f"boxes-{m}", box, title=f"{m}: known vs unknown prompts (original values)")
        tests(result, m, sec)
    rows = [[p["prompt"], p.get("entity"), p.get("entity_type"), p.get("label")] for p in prompts]
    sec.table("prompts", ["prompt", "entity", "type", "label"], rows, title=f"Prompts ({len(prompts)})")


def _diff(result: Any, m: str) -> np.ndarray:
    return np.asarray(result.arrays["steered"][result["latent"]][m]) - np.asarray(result.arrays["original"][m])


def bars(result: Any, m: str) -> Any:
    """Per saved head: the mean difference with ± std error bars; hover gives the original and steered means."""
    g = go()
    ph = {h["head"]: h for h in result["measures"][m]["per_head"]}
    names = [h for h in result["heads"] if h in ph]
    mean = [ph[h]["mean_difference"] for h in names]
    fig = g.Figure(
        g.Bar(
            x=names,
            y=mean,
            error_y={"type": "data", "array": [ph[h]["std_difference"] for h in names], "thickness": 1, "width": 2},
            marker={"color": color(0)},
            customdata=[[ph[h]["mean_original"], ph[h]["mean_steered"], ph[h]["std_difference"]] for h in names],
            hovertemplate=(
                "%{x}: difference %{y:+.4g} ± %{customdata[2]:.3g}<br>original %{customdata[0]:.4g}, "
                "steered %{customdata[1]:.4g}<extra></extra>"
            ),
        )
    )
    fig.update_layout(
        **layout(
            height=380,
            xaxis={"type": "category", "tickangle": -60, "tickfont": {"size": 9}},
            yaxis={"title": {"text": f"{m} difference"}},
        )
    )
    return fig


def scatter(result: Any, m: str, prompts: list[dict], n: int = 2) -> Any:
    """Original (x) vs steered (y) per prompt for the `n` heads with the largest |mean difference|."""
    g = go()
    orig = np.asarray(result.arrays["original"][m])
    steered = np.asarray(result.arrays["steered"][result["latent"]][m])
    types = list(dict.fromkeys(p.get("entity_type") for p in prompts))
    fig, top = g.Figure(), 0.0
    for ci, (la, h) in enumerate(scatter_heads({"measures": result["measures"]}, m, n)):
        for ti, t in enumerate(types):
            idx = [i for i, p in enumerate(prompts) if p.get("entity_type") == t]
            xs, ys = orig[idx, la, h], steered[idx, la, h]
            top = max(top, float(np.max(xs, initial=0)), float(np.max(ys, initial=0)))
            fig.add_trace(
                g.Scatter(
                    x=xs.tolist(),
                    y=ys.tolist(),
                    mode="markers",
                    name=f"L{la}H{h} · {t or '—'}",
                    marker={
                        "color": color(ci),
                        "symbol": SYMBOLS[ti % len(SYMBOLS)],
                        "size": 9,
                        "line": {"color": "black", "width": 0.5},
                    },
                    text=[f"{prompts[i]['prompt']} ({prompts[i].get('label')})" for i in idx],
                    hovertemplate="%{text}<br>original %{x:.4g} → steered %{y:.4g}<extra>" + f"L{la}H{h}</extra>",
                )
            )
    top = top * 1.05 or 1.0
    fig.add_shape(type="line", x0=0, y0=0, x1=top, y1=top, line={"color": "lightgrey", "dash": "dash"})
    fig.update_layout(
        **layout(
            height=400,
            xaxis={"title": {"text": f"original {m}"}, "range": [0, top]},
            yaxis={"title": {"text": f"steered {m}"}, "range": [0, top]},
        )
    )
    return fig


def heatmap(result: Any, m: str) -> Any:
    """Layer × head mean difference over all prompts; a line above the steering layer."""
    g = go()
    diff = np.array(result["measures"][m]["mean_difference_layer_head"], dtype=float)
    lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
    lim = lim or 1.0
    n_layers, n_heads = diff.shape
    fig = g.Figure(
        g.Heatmap(
            z=diff.tolist(),
            x=[f"H{h}" for h in range(n_heads)],
            y=[f"L{la}" for la in range(n_layers)],
            colorscale="RdBu",
            reversescale=True,
            zmin=-lim,
            zmax=lim,
            zmid=0,
            colorbar={"title": {"text": "difference", "side": "right"}, "thickness": 12},
            hovertemplate="%{y} %{x}: mean difference %{z:.4g}<extra></extra>",
        )
    )
    y = result["layer"] - 0.5
    fig.add_shape(type="line", xref="paper", x0=0, x1=1, y0=y, y1=y, line={"color": "black", "width": 2})
    fig.update_layout(
        **layout(
            height=140 + 16 * n_layers,
            xaxis={"type": "category", "title": {"text": "head"}},
            yaxis={"type": "category", "autorange": "reversed", "title": {"text": "layer"}},
        )
    )
    return fig


def boxes(result: Any, m: str, prompts: list[dict]) -> Any | None:
    """Original values of each label for the scatter heads (None without two labels)."""
    labels = [lab for lab in dict.fromkeys(p.get("label") for p in prompts) if lab is not None]
    if len(labels) < 2:
        return None
    g = go()
    orig = np.asarray(result.arrays["original"][m])
    heads = scatter_heads({"measures": result["measures"]}, m)
    fig = g.Figure()
    for li, lab in enumerate(labels):
        idx = [i for i, p in enumerate(prompts) if p.get("label") == lab]
        xs = [f"L{la}H{h}" for la, h in heads for _ in idx]
        ys = [float(orig[i, la, h]) for la, h in heads for i in idx]
        fig.add_trace(
            g.Box(
                x=xs,
                y=ys,
                name=str(lab),
                boxpoints="all",
                jitter=0.3,
                pointpos=0,
                marker={"color": LABEL_COLORS.get(str(lab), color(li))},
                text=[prompts[i]["prompt"] for _ in heads for i in idx],
                hovertemplate="%{text}<br>%{x}: %{y:.4g}<extra>" + esc(lab) + "</extra>",
            )
        )
    fig.update_layout(**layout(height=360, boxmode="group", yaxis={"title": {"text": f"original {m}"}}))
    return fig


def tests(result: Any, m: str, sec: Section) -> None:
    """The random-latent test per label: each random latent's Welch t, df, p and Hedges' g."""
    rows = []
    lines = []
    for lab, gr in result["measures"][m]["by_label"].items():
        lines.append(
            f"{lab} (n={gr['n_prompts']}, expected {gr['expected']}): mean difference "
            f"{fmt_num(gr['mean_difference'], '+.4f')}; {gr['summary']}"
        )
        for x in gr.get("random", []):
            rows.append(
                [
                    lab,
                    x["latent"],
                    fmt_num(x.get("mean_top"), "+.4g"),
                    fmt_num(x.get("mean_random"), "+.4g"),
                    fmt_num(x.get("t"), ".3f"),
                    fmt_num(x.get("df"), ".1f"),
                    fmt_p(x.get("p")),
                    fmt_num(x.get("hedges_g"), ".3f"),
                    "yes" if x.get("significant") else "no",
                ]
            )
    sec.table(
        f"tests-{m}",
        ["label", "random latent", "mean top", "mean random", "t", "df", "p", "Hedges' g", "significant"],
        rows,
        title=f"{m}: top latent {result['latent']} vs random latents",
        note=" · ".join(lines) or "no labelled prompts",
    )
