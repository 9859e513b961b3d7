"""The knockout's view: condition × sample heatmap of log10 KL, group means with CIs per condition, statuses, and
the tokens whose probability changed most (click a cell or a point)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from plipy.report.base import fmt_kl, mean_ci
from plipy.report.html.common import color, go, layout
from plipy.report.html.page import Section, esc, table_html
from plipy.results.knockout import KnockoutResult
from plipy.results.views import VIEWS


@VIEWS.html(KnockoutResult)
def view(result: Any, sec: Section) -> None:
    """Heatmap and means (both open the detail of a sample under a condition), statuses, the detail panel."""
    order = samples_order(result)
    panel = sec.id("changed")
    sec.figure(
        "heatmap",
        heatmap(result, order),
        click={"target": panel, "fields": ["key"]},
        title="log10 KL(base ‖ knockout) per condition and sample",
        note="Samples grouped (white lines between groups); KL = 0 drawn at the colour floor; blank: not "
        "measured (hover for the status). Click a cell for the tokens that changed most.",
    )
    sec.figure(
        "means",
        means(result),
        click={"target": panel, "fields": ["key"]},
        title="Group mean KL per condition (95% CI)",
        note="Mean ± t-based 95% CI of the mean; faint points: each sample (click for its changed tokens).",
    )
    statuses(result, sec)
    panels = {key(ci, s["id"]): sample_panel(r, s) for ci, r in enumerate(result["runs"]) for s in r["samples"]}
    sec.detail(
        "changed",
        panels,
        initial=largest(result),
        title="Top changed tokens",
        note="The next-token probabilities that moved most (|p_base − p_knockout|), for the clicked sample "
        "and condition (first shown: the largest KL).",
    )


def key(ci: int, sid: str) -> str:
    """The detail-panel key of a sample under a condition (also the customdata of its cell and point)."""
    return f"{ci}|{sid}"


def samples_order(result: Any) -> list[tuple[str, str]]:
    """(id, group) of every sample that was measured in some condition, grouped as the config lists the groups."""
    groups = result.provenance["config"]["groups"]
    seen = {s["id"] for r in result["runs"] for s in r["samples"]}
    return [(s["id"], s["group"]) for g in groups for s in result["samples"] if s["group"] == g and s["id"] in seen]


def _cell(s: dict | None) -> tuple[float | None, str]:
    if s is None:
        return None, "not run"
    if s.get("status") != "ok" or s.get("kl") is None:
        return None, f"{s.get('status')}: {s.get('note') or ''}"
    flip = (
        f"top-1 '{s.get('top1_base_token')}' → '{s.get('top1_intervened_token')}'"
        if s.get("top1_changed")
        else f"top-1 unchanged ('{s.get('top1_base_token')}')"
    )
    return float(s["kl"]), flip


def heatmap(result: Any, order: list[tuple[str, str]]) -> Any:
    """log10 KL, conditions as rows and samples as columns; customdata [key, KL text, note]."""
    g = go()
    runs = result["runs"]
    by = {(ci, s["id"]): s for ci, r in enumerate(runs) for s in r["samples"]}
    cells = [[_cell(by.get((ci, sid))) for sid, _ in order] for ci in range(len(runs))]
    kl = np.array([[np.nan if v is None else v for v, _ in row] for row in cells], dtype=float)
    positive = kl[np.isfinite(kl) & (kl > 0)]
    floor = float(positive.min()) if positive.size else 1e-12
    z = np.log10(np.where(np.isfinite(kl), np.maximum(kl, floor), np.nan))
    cd = [
        [[key(ci, sid), fmt_kl(v), note] for (sid, _), (v, note) in zip(order, row, strict=True)]
        for ci, row in enumerate(cells)
    ]
    fig = g.Figure(
        g.Heatmap(
            z=[[None if not np.isfinite(v) else float(v) for v in row] for row in z],
            x=[sid for sid, _ in order],
            y=[r["label"] for r in runs],
            customdata=cd,
            colorscale="Viridis",
            colorbar={"title": {"text": "log10 KL", "side": "right"}, "thickness": 12},
            hoverongaps=True,
            hovertemplate="%{x}, layers %{y}<br>KL %{customdata[1]} nats<br>%{customdata[2]}<extra></extra>",
        )
    )
    prev = None
    for j, (_, grp) in enumerate(order):
        if prev is not None and grp != prev:
            fig.add_vline(x=j - 0.5, line={"color": "white", "width": 2})
        prev = grp
    fig.update_layout(
        **layout(
            height=max(280, 160 + 22 * len(runs)),
            margin={"l": 70, "r": 20, "t": 20, "b": 130},
            xaxis={"type": "category", "tickangle": -60, "tickfont": {"size": 9}},
            yaxis={"type": "category", "title": {"text": "layers knocked out"}, "autorange": "reversed"},
        )
    )
    return fig


def means(result: Any) -> Any:
    """Per group: mean KL ± 95% CI per condition, and each sample as a faint point (customdata: its key)."""
    g = go()
    runs = result["runs"]
    labels = [r["label"] for r in runs]
    groups = result.provenance["config"]["groups"]
    fig = g.Figure()
    for gi, grp in enumerate(groups):
        vals = [
            [s["kl"] for s in r["samples"] if s["group"] == grp and s["status"] == "ok" and s["kl"] is not None]
            for r in runs
        ]
        if not any(vals):
            continue
        m = [mean_ci(v) if v else (None, None, None) for v in vals]
        col = color(gi)
        fig.add_trace(
            g.Scatter(
                x=labels,
                y=[r[0] for r in m],
                mode="lines+markers",
                name=grp,
                line={"color": col},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [None if r[0] is None else r[2] - r[0] for r in m],
                    "arrayminus": [None if r[0] is None else r[0] - r[1] for r in m],
                    "width": 3,
                },
                customdata=[[None, len(v)] for v in vals],
                hovertemplate=f"{grp}, layers %{{x}}<br>mean KL %{{y:.3e}} nats "
                f"(n = %{{customdata[1]}})<extra></extra>",
            )
        )
        pts = [
            (r["label"], s["kl"], key(ci, s["id"]), s["id"])
            for ci, r in enumerate(runs)
            for s in r["samples"]
            if s["group"] == grp and s["status"] == "ok" and s["kl"] is not None
        ]
        fig.add_trace(
            g.Scatter(
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                customdata=[[p[2]] for p in pts],
                text=[p[3] for p in pts],
                mode="markers",
                marker={"color": col, "size": 5, "opacity": 0.3},
                showlegend=False,
                legendgroup=grp,
                hovertemplate=f"%{{text}} ({grp}), layers %{{x}}<br>KL %{{y:.3e}}<extra></extra>",
            )
        )
    fig.update_layout(
        **layout(
            height=400,
            xaxis={"type": "category", "title": {"text": "layers knocked out"}},
            yaxis={"title": {"text": "KL (nats)"}, "exponentformat": "e"},
        )
    )
    return fig


def statuses(result: Any, sec: Section) -> None:
    """Counts of each status in the conditions where some sample was not measured, and who was left out, why."""
    counts = [(r["label"], Counter(s["status"] for s in r["samples"])) for r in result["runs"]]
    names = sorted({k for _, c in counts for k in c}, key=lambda k: (k != "ok", k))
    rows = [[label, *[c.get(n, 0) for n in names]] for label, c in counts if set(c) - {"ok"}]
    excl = result["excluded"]
    n = len(result["samples"])
    if not rows and not excl:
        sec.text(
            "statuses",
            f"All {n} samples measured (status ok) in each of the {len(counts)} conditions.",
            title="Statuses",
        )
        return
    note = (
        f"{len(excl)} exclusion(s): "
        + "; ".join(
            f"{e['id']} ({e['group']}"
            + (f", condition {e['condition']}" if e.get("condition") else "")
            + f"): {e['status']} — {e.get('note') or ''}"
            for e in excl[:20]
        )
        + (" …" if len(excl) > 20 else "")
    )
    sec.table(
        "statuses", ["layers", *names], rows, title="Statuses (conditions where a sample was not measured)", note=note
    )


def largest(result: Any) -> str | None:
    """The key of the sample and condition with the largest KL (the detail shown first)."""
    best = max(
        (
            (s["kl"], key(ci, s["id"]))
            for ci, r in enumerate(result["runs"])
            for s in r["samples"]
            if s.get("kl") is not None
        ),
        default=None,
    )
    return best[1] if best else None


def changed_table(top: list[dict[str, Any]], after: str = "p after") -> str:
    """The top changed tokens as an HTML table."""
    rows = [
        [
            f"'{t.get('token')}'",
            t.get("token_id"),
            f"{t['p_base']:.4g}",
            f"{t['p_intervened']:.4g}",
            f"{t['diff']:+.3e}",
        ]
        for t in top
    ]
    return table_html(["token", "id", "p base", after, "difference"], rows)


def sample_panel(run: dict, s: dict, after: str = "p knockout", what: str = "layers") -> str:
    """One sample under one condition: its KL, entropy and top-1 change, and the tokens that changed most."""
    head = f"<p><b>{esc(s['id'])}</b> ({esc(s['group'])}) — {what} {esc(run.get('label', ''))}</p>"
    if s.get("status") != "ok":
        return head + f"<p>status <b>{esc(s.get('status'))}</b>: {esc(s.get('note') or '')}</p>"
    flip = "changed" if s.get("top1_changed") else "unchanged"
    facts = (
        f"<p>KL {esc(fmt_kl(s.get('kl')))} nats (PLIP's truncated: {esc(fmt_kl(s.get('kl_plip')))}); entropy "
        f"{s['entropy_base']:.4f} → {s['entropy_intervened']:.4f} nats; top-1 '{esc(s['top1_base_token'])}'"
        f" → '{esc(s['top1_intervened_token'])}' ({flip})</p>"
    )
    return head + facts + changed_table(s.get("top_changed") or [], after)
