"""Views of the QK attribution: the console report (scores, exactness, top pairs, each side's top components, the
group contrast, the intervention's change) and its figures (component × component heatmaps, top pairs, side
components, per-input stability of the top pairs)."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table

from plipy.report.base import COLORS, Note, fmt_p, pyplot
from plipy.results.qk import QkResult
from plipy.results.views import VIEWS


def head_label(key: str) -> str:
    """`H3` → `head 3`; `mean` → `mean over heads`."""
    return "mean over heads" if key == "mean" else f"head {key[1:]}"


def fmt(x: Any, spec: str = ".3g") -> str:
    """A number, or a dash for None."""
    return "—" if x is None else format(x, spec)


def fmt_share(x: Any) -> str:
    """A fraction as a percentage (None: a dash)."""
    return "—" if x is None else f"{100 * x:.0f}%"


def panels(result: QkResult, head: str) -> list[tuple[str, dict[str, Any]]]:
    """The statistics blocks of one head key, titled: each group, the contrast, each group's intervention change."""
    entry = result["decomposition"][head]
    out = [(f"{g}", b) for g, b in entry["groups"].items()]
    if entry["contrast"] is not None:
        a, b = result["compared"]
        out.append((f"{a} − {b}", entry["contrast"]))
    for g, b in (entry["intervention"] or {}).items():
        out.append((f"{g}: intervened − original", b))
    return out


def _header(result: QkResult) -> list[Any]:
    c, lin = result["check"], result["linearisation"]
    basis = "SAE latents" if result["basis"] == "sae" else "residual components"
    if result["per_head_components"]:
        basis += " (attention per head)"
    measured = [s for s in result["samples"] if "score" in s]
    left = len(result["samples"]) - len(measured)
    lines: list[Any] = [
        f"QK attribution at layer {result['layer']}: {result['query']} → {result['keys']}, split into {basis}; "
        f"{len(measured)} inputs" + (f" ({left} not measurable)" if left else ""),
        f"exact: the terms sum to the observed score within {c['max_abs_error']:.2g} (largest |score| "
        f"{c['max_abs_score']:.3g})"
        + (
            ""
            if c.get("rounding_ratio_max") is None
            else f"; the model's rounding ≤ {c['rounding_ratio_max']:.1g} of the residual (component `rounding`)"
        ),
        f"linearisation: {lin['norm'] or 'no'} norm before attention"
        + (f", {lin['qk_norm']} q/k norm" if lin["qk_norm"] else "")
        + " with scales frozen at their observed values; RoPE at the real positions" * bool(lin["rope"])
        + (f"; softcap {lin['softcap']:g}: the terms sum to the pre-softcap score" if lin["softcap"] else ""),
    ]
    if result["intervention"] is not None:
        iv = result["intervention"]
        what = (
            f"steering with latent {iv['latent']} × {iv['coeff']:g} at the input of layer {iv['layer']} "
            f"({iv['positions']})"
            if iv["kind"] == "steer"
            else f"knockout of query → key edges in layers {iv['layers']}"
        )
        lines.append(f"intervention: {what}")
    masked = [s["id"] for s in measured if s.get("masked_keys")]
    if masked:
        lines.append(Note(f"keys outside the sliding window were left out for {len(masked)} input(s)"))
    return lines


def _scores_table(result: QkResult) -> Table:
    groups = list(result["decomposition"][result.head_keys()[0]]["groups"])
    t = Table(title="Mean score (what the terms sum to) per head and group", header_style="bold")
    t.add_column("head")
    for g in groups:
        t.add_column(g, justify="right")
    compared = result["compared"]
    if compared:
        t.add_column(f"{compared[0]} − {compared[1]}", justify="right")
    for key, entry in result["decomposition"].items():
        row = [fmt(entry["groups"][g]["score"]["mean"]) for g in groups]
        if compared:
            row.append(fmt(entry["contrast"]["score"]["diff"]) if entry["contrast"] else "—")
        t.add_row(head_label(key), *row)
    return t


def _pairs_table(title: str, b: dict[str, Any]) -> Table:
    t = Table(title=title, header_style="bold")
    contrast = "diff" in (b["pairs"] or [{}])[0]
    cols = (
        ["query", "key", "mean A", "mean B", "A − B", "share", "p (BH)"]
        if contrast
        else ["query", "key", "mean", "sd", "share", "same sign", "in top"]
    )
    for c in cols:
        t.add_column(c, justify="left" if c in ("query", "key") else "right")
    for p in b["pairs"]:
        if contrast:
            vals = [fmt(p["mean_a"]), fmt(p["mean_b"]), fmt(p["diff"]), fmt_share(p["share"]), fmt_p(p["p_bh"])]
        else:
            vals = [
                fmt(p["mean"]),
                fmt(p["sd"]),
                fmt_share(p["share"]),
                fmt_share(p["same_sign"]),
                fmt_share(p["in_top"]),
            ]
        t.add_row(p["query"], p["key"], *vals)
    return t


def _sides_table(title: str, b: dict[str, Any]) -> Table:
    t = Table(title=title, header_style="bold")
    contrast = "diff" in (b["query_side"] or [{}])[0]
    for c in ("query side", "value", "share", "key side", "value ", "share "):
        t.add_column(c, justify="left" if "side" in c else "right")
    key = "diff" if contrast else "mean"
    for q, k in zip(b["query_side"], b["key_side"], strict=False):
        t.add_row(
            q["component"], fmt(q[key]), fmt_share(q["share"]), k["component"], fmt(k[key]), fmt_share(k["share"])
        )
    return t


@VIEWS.summary(QkResult)
def summary(result: QkResult, head: str | None = None) -> list[Any]:
    """Scores and exactness, then for the headline head (the mean over heads when there are several) each group's
    top pairs and side components, the group contrast and the intervention's change."""
    key = result.headline(head)
    out = [*_header(result), _scores_table(result)]
    for title, b in panels(result, key):
        score = b["score"]
        total = score.get("mean", score.get("diff"))
        out.append(f"{title} ({head_label(key)}): score {fmt(total)}" + (f", n = {b['n']}" if "n" in b else ""))
        out.append(_pairs_table(f"Top component pairs — {title}", b))
        out.append(_sides_table(f"Each side with the whole other side — {title}", b))
    out.append(
        "share: of the mean score (of the difference for A − B and interventions); same sign: inputs whose value has "
        "the mean's sign; in top: inputs where the pair is among their own top by |value|"
    )
    return out


# -- figures ---------------------------------------------------------------------------------------------------------


def _heat(ax: Any, m: dict[str, Any], title: str) -> Any:
    v = np.array(m["values"], dtype=float)
    lim = float(np.abs(v).max()) if v.size else 1.0
    im = ax.imshow(v, cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1, aspect="auto")
    fs = 7 if max(v.shape, default=0) <= 24 else 5
    ax.set_yticks(range(len(m["query"])), m["query"], fontsize=fs)
    ax.set_xticks(range(len(m["key"])), m["key"], fontsize=fs, rotation=90)
    ax.set(ylabel="query side", xlabel="key side")
    cov = "" if m.get("covered") is None else f" (shown: {100 * m['covered']:.0f}% of |terms|)"
    ax.set_title(title + cov, fontsize=9)
    return im


@VIEWS.figure(QkResult, "heatmap")
def heatmap_figure(result: QkResult, head: str | None = None, **_options: Any) -> Any:
    """Query component × key component mean contributions, one panel per group, contrast and intervention change."""
    plt = pyplot()
    key = result.headline(head)
    ps = panels(result, key)
    cols = min(3, len(ps))
    rows = (len(ps) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 5.0 * rows), squeeze=False)
    for ax, (title, b) in zip(axes.flat, ps, strict=False):
        im = _heat(ax, b["matrix"], title)
        fig.colorbar(im, ax=ax, fraction=0.04)
    for ax in list(axes.flat)[len(ps) :]:
        ax.axis("off")
    fig.suptitle(f"layer {result['layer']}, {head_label(key)}: contributions to the score", fontsize=11)
    fig.tight_layout()
    return fig


def _bars(ax: Any, items: list[dict[str, Any]], label: Any, title: str) -> None:
    key = "diff" if items and "diff" in items[0] else "mean"
    names = [label(p) for p in items][::-1]
    vals = [p[key] or 0.0 for p in items][::-1]
    err = None if key == "diff" else [p["sd"] or 0.0 for p in items][::-1]
    ax.barh(range(len(vals)), vals, xerr=err, color=[COLORS[0] if v >= 0 else COLORS[1] for v in vals], alpha=0.8)
    ax.set_yticks(range(len(vals)), names, fontsize=7)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_title(title, fontsize=9)


@VIEWS.figure(QkResult, "pairs")
def pairs_figure(result: QkResult, head: str | None = None, **_options: Any) -> Any:
    """The top pairs of each panel as bars (mean ± sd over inputs; differences for the contrast)."""
    plt = pyplot()
    key = result.headline(head)
    ps = panels(result, key)
    fig, axes = plt.subplots(1, len(ps), figsize=(5.0 * len(ps), 0.8 + 0.32 * result["top"]), squeeze=False)
    for ax, (title, b) in zip(axes[0], ps, strict=True):
        _bars(ax, b["pairs"], lambda p: f"{p['query']} · {p['key']}", title)
    fig.suptitle(f"layer {result['layer']}, {head_label(key)}: top query · key pairs", fontsize=11)
    fig.tight_layout()
    return fig


@VIEWS.figure(QkResult, "sides")
def sides_figure(result: QkResult, head: str | None = None, **_options: Any) -> Any:
    """Each side's top components (a component with the whole other side), per panel."""
    plt = pyplot()
    key = result.headline(head)
    ps = panels(result, key)
    fig, axes = plt.subplots(2, len(ps), figsize=(4.6 * len(ps), 1.6 + 0.6 * result["top"]), squeeze=False)
    for j, (title, b) in enumerate(ps):
        _bars(axes[0, j], b["query_side"], lambda p: p["component"], f"query side — {title}")
        _bars(axes[1, j], b["key_side"], lambda p: p["component"], f"key side — {title}")
    fig.tight_layout()
    return fig


def stability_points(result: QkResult, head: str, n: int = 6) -> list[tuple[str, dict[str, list[float]]]]:
    """The `n` top pairs of the first group's panel (or of the contrast) with every input's value per group
    (inputs without the pair count 0: an inactive latent contributes nothing)."""
    entry = result["decomposition"][head]
    top = (entry["contrast"] or next(iter(entry["groups"].values())))["pairs"][:n]
    measured = [s for s in result["samples"] if "score" in s]
    out = []
    for p in top:
        vals = result.per_sample(p["query"], p["key"], head)
        by_group: dict[str, list[float]] = {}
        for s in measured:
            by_group.setdefault(s["group"], []).append(vals.get(s["id"], 0.0))
        out.append((f"{p['query']} · {p['key']}", by_group))
    return out


@VIEWS.figure(QkResult, "stability")
def stability_figure(result: QkResult, head: str | None = None, **_options: Any) -> Any:
    """Every input's contribution of the top pairs, by group: how stable the largest contributors are."""
    plt = pyplot()
    key = result.headline(head)
    pts = stability_points(result, key)
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.5 * len(pts)))
    groups = list(result["decomposition"][key]["groups"])
    rng = np.random.default_rng(0)  # jitter only
    for i, (_, by_group) in enumerate(pts):
        for gi, g in enumerate(groups):
            v = by_group.get(g, [])
            y = i + (gi - (len(groups) - 1) / 2) * 0.25 + rng.uniform(-0.06, 0.06, len(v))
            ax.scatter(v, y, s=14, color=COLORS[gi % len(COLORS)], alpha=0.75, label=g if i == 0 else None)
    ax.set_yticks(range(len(pts)), [name for name, _ in pts], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.set(xlabel="contribution to the score", title=f"layer {result['layer']}, {head_label(key)}: per input")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
