"""Scan reports: group means per layer with CIs beside the nulls, the layer × head difference heatmap, one
sample's marker row as shaded text, and the console table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from rich.table import Table

from plipy.report.base import COLORS, Note, fmt_num, fmt_p, fmt_pct, mean_ci, pyplot
from plipy.results.scan import ScanResult
from plipy.results.views import VIEWS


@VIEWS.figure(ScanResult, "layers")
def layers_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Group means per layer with 95% CI bands; dashed lines: uniform null 1/(m+1); dotted: share on token 0."""
    plt = pyplot()
    layers = result["layers_scanned"]
    groups = result["provenance"]["config"]["groups"]
    samples = [s for s in result["samples"] if "attention" in s]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
    for gi, g in enumerate(groups):
        col = COLORS[gi % len(COLORS)]
        rows = [s for s in samples if s["group"] == g]
        if not rows:
            continue
        for key, axis in (("attention", ax), ("excess", ax2)):
            mci = np.array([mean_ci([s[key][i] for s in rows]) for i in range(len(layers))])
            axis.plot(layers, mci[:, 0], "-o", ms=3, color=col, label=f"{g} (n={len(rows)})")
            axis.fill_between(layers, mci[:, 1], mci[:, 2], color=col, alpha=0.18)
        null = float(np.mean([s["uniform_null"] for s in rows]))
        ax.axhline(null, color=col, ls="--", lw=1, label=f"{g}: uniform null 1/(m+1)")
        sink = np.mean([[s["first_token_share"][i] for s in rows] for i in range(len(layers))], axis=1)
        ax.plot(layers, sink, ":", color=col, lw=1.2, label=f"{g}: share on token 0")
    ax.set(xlabel="layer", ylabel="attention marker → targets (head mean)", title="Attention per layer (95% CI)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="best")
    ax2.axhline(1.0, color="grey", ls="--", lw=1)
    ax2.set(xlabel="layer", ylabel="attention / uniform null", title="Excess over uniform attention (95% CI)")
    ax2.legend(fontsize=7)
    model = result["provenance"].get("model", {}).get("spec", "")
    fig.suptitle(f"plipy scan — {model}", fontsize=10)
    return fig


@VIEWS.figure(ScanResult, "heads")
def heads_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Layer × head heatmap of the group difference in attention; BH-significant cells are outlined."""
    plt = pyplot()
    ph = result["per_head"]
    diff = np.array(ph["mean_diff"])
    sig = np.array(ph["p_bh"], dtype=float) < 0.05
    ga, gb = result["groups_compared"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * diff.shape[1], 1.2 + 0.22 * diff.shape[0]))
    lim = float(np.nanmax(np.abs(diff))) or 1.0
    im = ax.imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for li, hi in zip(*np.nonzero(sig), strict=True):
        ax.add_patch(plt.Rectangle((hi - 0.5, li - 0.5), 1, 1, fill=False, ec="black", lw=1.2))
    ax.set_yticks(range(len(ph["layers"])), ph["layers"], fontsize=6)
    ax.set_xticks(range(len(ph["heads"])), ph["heads"], fontsize=7)
    ax.set(xlabel="head", ylabel="layer", title=f"mean attention {ga} − {gb}\n(outlined: BH p < 0.05)")
    fig.colorbar(im, ax=ax, fraction=0.05)
    return fig


def token_row_figure(tokens: list[str], weights: list[float], marker: int, targets: list[int], title: str) -> Any:
    """One sample's marker row as text: each token's background shows its attention weight."""
    plt = pyplot()
    from matplotlib import colormaps

    cmap = colormaps["Oranges"]
    w = np.asarray(weights, float)
    top = float(w.max()) or 1.0
    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.32 * (1 + sum(t.count("\n") for t in tokens))))
    ax.axis("off")
    x, y, line_h = 0.0, 1.0, 0.09
    renderer = fig.canvas.get_renderer()
    for i, tok in enumerate(tokens):
        for j, part in enumerate(tok.split("\n")):
            if j > 0:
                x, y = 0.0, y - line_h
            if not part:
                continue
            shown = part.replace(" ", "·") if i <= marker else part
            color = cmap(0.1 + 0.9 * w[i] / top) if i <= marker else (1, 1, 1, 1)
            ec = "blue" if i == marker else ("green" if i in targets else "none")
            t = ax.text(
                x,
                y,
                shown,
                family="monospace",
                fontsize=8,
                va="top",
                color="black" if i <= marker else "#aaaaaa",
                bbox=dict(boxstyle="square,pad=0.1", fc=color, ec=ec, lw=1),
            )
            bb = t.get_window_extent(renderer=renderer).transformed(ax.transData.inverted())
            x += bb.width + 0.004
    ax.set_ylim(y - line_h, 1.02)
    ax.set_xlim(0, 1)
    ax.set_title(title + "  (blue box: marker; green: targets; grey: after the marker)", fontsize=8)
    return fig


@VIEWS.summary(ScanResult)
def summary(result: Mapping[str, Any]) -> list[Any]:
    """The console report of a scan: the per-layer table, the null line, best layers, samples not measured."""
    ga, gb = result["groups_compared"]
    t = Table(title=f"Layer scan: {ga} vs {gb} (attention marker → targets, head mean)", header_style="bold")
    for col in (
        "layer",
        f"{ga}",
        f"{gb}",
        "ratio",
        "t",
        "df",
        "p",
        "",
        "p Holm",
        "null ratio",
        "excess ratio",
        "p excess Holm",
        f"tok0 {ga}",
        f"tok0 {gb}",
    ):
        t.add_column(col, justify="right")
    for r in result["layers"]:
        e = r["excess"]
        t.add_row(
            str(r["layer"]),
            fmt_pct(r["groups"][ga]["mean"]),
            fmt_pct(r["groups"][gb]["mean"]),
            fmt_num(r["ratio"]) + "×",
            fmt_num(r["t"]),
            fmt_num(r["df"], ".1f"),
            fmt_p(r["p"]),
            r["stars"],
            fmt_p(r["p_holm"]),
            fmt_num(r["null_ratio"]) + "×",
            fmt_num(e["ratio"]) + "×",
            fmt_p(e["p_holm"]),
            fmt_pct(r["first_token_share"][ga]),
            fmt_pct(r["first_token_share"][gb]),
        )
    out: list[Any] = [t]
    nr = result["null_ratio"]
    out.append(
        f"uniform null 1/(m+1): {ga} {fmt_pct(result['uniform_null'][ga]['mean'])}, "
        f"{gb} {fmt_pct(result['uniform_null'][gb]['mean'])} → null ratio {fmt_num(nr)}× "
        "(a ratio near this is explained by marker position alone)"
    )
    b = result["best"]
    out.append(
        f"best layer, PLIP rule ({ga} > {gb}, min p): {b['plip_rule']['layer']} (p={fmt_p(b['plip_rule']['p'])}); "
        f"by Holm-corrected p: {b['holm']['layer']} (p_holm={fmt_p(b['holm']['p_holm'])}); "
        f"position-controlled (excess): {b['excess_holm']['layer']} (p_holm={fmt_p(b['excess_holm']['p_holm'])})"
    )
    skipped = [s for s in result["samples"] if "attention" not in s]
    for s in skipped:
        out.append(Note(f"not measured {s['id']} ({s['group']}): {s['status']} — {s.get('note', '')}"))
    partial = [s["id"] for s in result["samples"] if s["status"] == "partial-targets"]
    if partial:
        out.append(Note(f"targets after the marker left out of the mean for: {', '.join(partial)}"))
    return out


@VIEWS.figure(ScanResult, "tokens", unavailable=ScanResult.rows_unavailable)
def tokens_figure(result: ScanResult, sample: str | None = None, layer: int | None = None, **_options: Any) -> Any:
    """One measured sample's marker row at one layer (default: the first sample, the best Holm layer)."""
    rec = result.token_sample(sample)
    lay = result.token_layer(layer)
    row = result.marker_row(rec["id"], lay)
    title = f"{rec['id']} — layer {lay}, head-mean attention of the marker row"
    tokens = result.token_texts(rec["id"])
    return token_row_figure(tokens, row.tolist(), rec["marker_token"], rec["measured_targets"], title)
