"""Knockout reports: condition × sample heatmap of log KL, group means with CIs per condition, the console table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from rich import box
from rich.table import Table

from plipy.report.base import COLORS, Note, fmt_kl, fmt_num, fmt_p, mean_ci, pyplot, run_seconds
from plipy.results.knockout import KnockoutResult
from plipy.results.views import VIEWS


def heads_label(heads: list[int]) -> str:
    """`head 3`, `heads 0,3`, or `9 heads` when there are many (every head, usually)."""
    if len(heads) == 1:
        return f"head {heads[0]}"
    if 0 < len(heads) <= 4:
        return "heads " + ",".join(map(str, heads))
    return f"{len(heads)} heads"


def _short(result: Mapping[str, Any]) -> str:
    """What the intervened run is called in titles: `knockout`, or `mean` / `resample` for those ablations."""
    ablation = result.get("ablation")
    return ablation["kind"] if ablation else "knockout"


@VIEWS.summary(KnockoutResult)
def summary(result: Mapping[str, Any]) -> list[Any]:
    """The console report of a knockout: per-condition KL table, described groups, the runner, exclusions."""
    ga, gb = result["groups_compared"]
    ablation = result.get("ablation")
    what = "Knockout" if not ablation else f"{ablation['kind'].capitalize()} ablation of the edges"
    t = Table(
        title=f"{what} ({result['edges']}, {heads_label(result['heads'])}): mean KL(base ‖ {_short(result)}) in "
        f"nats\nA = {ga}, B = {gb}; flips = samples whose top-1 token changed",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    for col in ("layers", "n A", "KL A", "n B", "KL B", "A/B", "p", "", "p Holm", "flips"):
        t.add_column(col, justify="right")
    for r in result["runs"]:
        a, b = r["groups"][ga], r["groups"][gb]
        flips = {g: sum(1 for s in r["samples"] if s["group"] == g and s.get("top1_changed")) for g in (ga, gb)}
        t.add_row(
            r["label"],
            str(a["n"]),
            fmt_kl(a["mean"]),
            str(b["n"]),
            fmt_kl(b["mean"]),
            "—" if r.get("ratio") is None else fmt_num(r["ratio"]) + "×",
            fmt_p(r.get("p")),
            r.get("stars", ""),
            fmt_p(r.get("p_holm")),
            f"{flips[ga]}/{flips[gb]}",
        )
    out: list[Any] = [t]
    if ablation:
        out.append(f"{ablation['kind']} ablation: {ablation['description']}")
    others = [g for g in result["provenance"]["config"]["groups"] if g not in (ga, gb)]
    for g in others:
        means = ", ".join(f"{r['label']}: {fmt_kl(r['groups'][g]['mean'])}" for r in result["runs"][:8])
        more = " …" if len(result["runs"]) > 8 else ""
        out.append(f"{g} (described, not tested; n={result['runs'][0]['groups'][g]['n']}): {means}{more}")
    rn = result["provenance"]["config"]["runner"]
    how = (
        (
            "fast path: baseline once per sample, suffix-only reruns from its cache, layers below the first "
            "knocked-out layer not recomputed"
        )
        if rn["path"] == "fast"
        else "naive path: " + "; ".join(rn["fallback_reasons"])
    )
    out.append(f"{how} — {run_seconds(result):.1f} s")
    for e in result["excluded"]:
        where = f" (condition {e['condition']})" if e.get("condition") else ""
        out.append(Note(f"excluded {e['id']} ({e['group']}){where}: {e['status']} — {e.get('note') or ''}"))
    return out


def _samples_order(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    groups = result["provenance"]["config"]["groups"]
    ok = {s["id"] for s in result["samples"] if s["status"] == "ok"}
    return [(s["id"], s["group"]) for g in groups for s in result["samples"] if s["group"] == g and s["id"] in ok]


@VIEWS.figure(KnockoutResult, "heatmap")
def heatmap_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Condition × sample heatmap of log10 KL (samples grouped; KL = 0 drawn at the colour floor)."""
    plt = pyplot()
    order = _samples_order(result)
    runs = result["runs"]
    kl = {(i, s["id"]): s["kl"] for i, r in enumerate(runs) for s in r["samples"]}
    grid = np.array(
        [[np.nan if kl.get((i, sid)) is None else kl[(i, sid)] for sid, _ in order] for i in range(len(runs))],
        dtype=float,
    )
    positive = grid[np.isfinite(grid) & (grid > 0)]
    floor = float(positive.min()) if positive.size else 1e-12
    vals = np.log10(np.where(np.isfinite(grid), np.maximum(grid, floor), np.nan))
    fig, ax = plt.subplots(figsize=(2 + 0.28 * len(order), 1.5 + 0.25 * len(runs)))
    im = ax.imshow(vals, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(order)), [sid for sid, _ in order], rotation=90, fontsize=6)
    ax.set_yticks(range(len(runs)), [r["label"] for r in runs], fontsize=7)
    prev = None
    for j, (_, g) in enumerate(order):  # group boundaries
        if prev is not None and g != prev:
            ax.axvline(j - 0.5, color="white", lw=1.5)
        prev = g
    ax.set(xlabel="sample", ylabel="layers knocked out", title=f"log10 KL(base ‖ {_short(result)}), {result['edges']}")
    fig.colorbar(im, ax=ax, fraction=0.04, label="log10 KL (nats)")
    return fig


@VIEWS.figure(KnockoutResult, "means")
def means_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Group mean KL per condition with t-based 95% CI of the mean."""
    plt = pyplot()
    runs = result["runs"]
    groups = result["provenance"]["config"]["groups"]
    x = np.arange(len(runs))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(runs) + 3), 4.2))
    for gi, g in enumerate(groups):
        cis = []
        for r in runs:
            vals = [s["kl"] for s in r["samples"] if s["group"] == g and s["status"] == "ok"]
            cis.append(mean_ci(vals) if vals else (np.nan, np.nan, np.nan))
        m = np.array(cis, dtype=float)
        if np.isnan(m[:, 0]).all():
            continue
        off = (gi - (len(groups) - 1) / 2) * 0.12
        ax.errorbar(
            x + off,
            m[:, 0],
            yerr=[m[:, 0] - m[:, 1], m[:, 2] - m[:, 0]],
            fmt="-o",
            ms=3,
            capsize=2,
            color=COLORS[gi % len(COLORS)],
            label=g,
        )
    ax.set_xticks(x, [r["label"] for r in runs], rotation=90 if len(runs) > 12 else 0, fontsize=7)
    ax.set_xlim(-0.5, len(runs) - 0.5)
    ax.set(
        xlabel="layers knocked out",
        ylabel="mean KL (nats)",
        title=f"Mean KL per condition with 95% CI ({result['edges']})",
    )
    ax.legend(fontsize=7)
    return fig
