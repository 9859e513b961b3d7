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
    from matplotlib.ticker import MaxNLocator

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
    ax2.axhline(1.0, color="grey", ls="--", lw=1)
    ax2.set(xlabel="layer", ylabel="attention / uniform null", title="Excess over uniform attention (95% CI)")
    for axis in (ax, ax2):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    # below the plots, not over them: the token-0 lines rise to the top of the left panel
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
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
    """One sample's marker row as text: each token's background shows its attention weight, on a colour scale
    drawn below; the canvas fits the code. The scale's top is the largest weight after token 0 (the sink, which
    would wash every other token out), so token 0 may lie beyond it (said on the scale)."""
    plt = pyplot()
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cmap = colormaps["Oranges"]
    w = np.asarray(weights, float)
    top = float(w[1 : marker + 1].max()) if marker > 0 else float(w[0])
    top = top or 1.0
    n_lines = 1 + sum(t.count("\n") for t in tokens)
    line_h, margin = 0.24, 0.25  # inches
    height = 0.55 + n_lines * line_h + 0.75  # title, the code, the colour scale
    fig = plt.figure(figsize=(30, height))
    renderer = fig.canvas.get_renderer()
    x, y, right = margin, height - 0.6, 0.0
    for i, tok in enumerate(tokens):
        for j, part in enumerate(tok.split("\n")):
            if j > 0:
                x, y = margin, y - line_h
            if part:
                x += _token_box(fig, renderer, x, y, part, i, w[i], top, cmap, marker, targets) + 0.03
                right = max(right, x)
    width = max(right + margin, 6.0)
    fig.set_size_inches(width, height)
    fig.text(margin / width, 1 - 0.12 / height, title, fontsize=9, va="top")
    legend = "blue box: marker; green: targets; grey: after the marker"
    fig.text(margin / width, 1 - 0.32 / height, legend, fontsize=7, va="top", color="#555555")
    cax = fig.add_axes((margin / width, 0.3 / height, min(0.45, 3.5 / width), 0.1 / height))
    sink = f"; token 0 (the sink): {w[0]:.3f}, beyond the scale" if w[0] > top else ""
    bar = fig.colorbar(ScalarMappable(Normalize(0, top), cmap), cax=cax, orientation="horizontal")
    bar.set_label(f"attention weight of the marker row (head mean){sink}", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    return fig


def _token_box(
    fig: Any,
    renderer: Any,
    x: float,
    y: float,
    text: str,
    i: int,
    weight: float,
    top: float,
    cmap: Any,
    marker: int,
    targets: list[int],
) -> float:
    """Draw one token's text at (x, y) inches; its width in inches."""
    seen = i <= marker
    color = cmap(min(1.0, weight / top)) if seen else (1, 1, 1, 1)
    edge = "blue" if i == marker else ("green" if i in targets else "none")
    t = fig.text(
        x,
        y,
        text.replace(" ", "·") if seen else text,
        transform=fig.dpi_scale_trans,
        family="monospace",
        fontsize=8,
        va="top",
        color="black" if seen else "#aaaaaa",
        bbox=dict(boxstyle="square,pad=0.1", fc=color, ec=edge, lw=1),
    )
    return float(t.get_window_extent(renderer=renderer).width / fig.dpi)


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
    out.extend(best_layer_lines(result))
    skipped = [s for s in result["samples"] if "attention" not in s]
    for s in skipped:
        out.append(Note(f"not measured {s['id']} ({s['group']}): {s['status']} — {s.get('note', '')}"))
    partial = [s["id"] for s in result["samples"] if s["status"] == "partial-targets"]
    if partial:
        out.append(Note(f"targets after the marker left out of the mean for: {', '.join(partial)}"))
    return out


ALPHA = 0.05


def best_layer_lines(result: Mapping[str, Any]) -> list[str]:
    """The best layer by each rule, with the direction of its effect (which group attends more, by how much), or
    "none significant" when its p-value does not pass 0.05 — a best layer is never named without its direction."""
    ga, gb = result["groups_compared"]
    by_layer = {r["layer"]: r for r in result["layers"]}
    b = result["best"]
    rules = (
        (f"PLIP rule ({ga} > {gb}, smallest p)", b["plip_rule"]["layer"], b["plip_rule"]["p"], "p", None),
        ("largest difference (Holm-corrected p)", b["holm"]["layer"], b["holm"]["p_holm"], "p_holm", None),
        (
            "position-controlled, excess (Holm)",
            b["excess_holm"]["layer"],
            b["excess_holm"]["p_holm"],
            "p_holm",
            "excess",
        ),
    )
    out = []
    for name, layer, p, p_name, key in rules:
        if layer is None or p is None or not p < ALPHA:
            shown = "" if layer is None or p is None else f"; smallest {p_name} {fmt_p(p)} at layer {layer}"
            out.append(f"best layer, {name}: none significant at {ALPHA}{shown}")
            continue
        row = by_layer[layer] if key is None else by_layer[layer][key]
        out.append(f"best layer, {name}: {layer} — {_direction(row, ga, gb)} ({p_name}={fmt_p(p)})")
    return out


def _direction(row: Mapping[str, Any], ga: str, gb: str) -> str:
    """`A > B (2.31×)` from a comparison row's group means (the ratio A/B)."""
    ma, mb = (row["groups"][g]["mean"] for g in (ga, gb))
    if ma is None or mb is None:
        return "direction unknown"
    ratio = f" ({ma / mb:.2f}×)" if mb else ""
    return f"{ga} {'>' if ma > mb else '<' if ma < mb else '='} {gb}{ratio}"


@VIEWS.figure(ScanResult, "tokens", unavailable=ScanResult.rows_unavailable)
def tokens_figure(result: ScanResult, sample: str | None = None, layer: int | None = None, **_options: Any) -> Any:
    """One measured sample's marker row at one layer (default: the first sample, the best Holm layer)."""
    rec = result.token_sample(sample)
    lay = result.token_layer(layer)
    row = result.marker_row(rec["id"], lay)
    title = f"{rec['id']} — layer {lay}, head-mean attention of the marker row"
    tokens = result.token_texts(rec["id"])
    return token_row_figure(tokens, row.tolist(), rec["marker_token"], rec["measured_targets"], title)
