"""Plots and console tables for results. Matplotlib with the Agg backend: PNGs, no display needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from plipy.io import atomic_write_bytes

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    _plt().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and t-based 95% CI of the mean."""
    from scipy import stats as st

    a = np.asarray(values, float)
    m = float(a.mean())
    if len(a) < 2:
        return m, m, m
    h = float(st.sem(a) * st.t.ppf(0.975, len(a) - 1))
    return m, m - h, m + h


def scan_layers_plot(result: dict, path: Path) -> Path:
    """Group means per layer with 95% CI bands; dashed lines: uniform null 1/(m+1); dotted: share on token 0."""
    plt = _plt()
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
            mci = np.array([_mean_ci([s[key][i] for s in rows]) for i in range(len(layers))])
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
    return _save(fig, path)


def scan_heads_plot(result: dict, path: Path) -> Path:
    """Layer × head heatmap of the group difference in attention; BH-significant cells are outlined."""
    plt = _plt()
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
    return _save(fig, path)


def token_row_plot(tokens: list[str], weights: list[float], marker: int, targets: list[int], title: str,
                   path: Path) -> Path:
    """One sample's marker row as text: each token's background shows its attention weight."""
    plt = _plt()
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
            t = ax.text(x, y, shown, family="monospace", fontsize=8, va="top",
                        color="black" if i <= marker else "#aaaaaa",
                        bbox=dict(boxstyle="square,pad=0.1", fc=color, ec=ec, lw=1))
            bb = t.get_window_extent(renderer=renderer).transformed(ax.transData.inverted())
            x += bb.width + 0.004
    ax.set_ylim(y - line_h, 1.02)
    ax.set_xlim(0, 1)
    ax.set_title(title + "  (blue box: marker; green: targets; grey: after the marker)", fontsize=8)
    return _save(fig, path)


def fmt_pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def fmt_num(x: Any, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def fmt_p(p: Any) -> str:
    if p is None:
        return "—"
    return f"{p:.1e}" if p < 1e-4 else f"{p:.4f}"
