"""The steering views: calibration (each sample and the scale that closes the gap), dose-response (KL and attention
achieved with CIs, the target-attention solutions, the changed tokens of any sample and dose) and generation
(baseline vs steered texts as a diff, Fisher's test)."""

from __future__ import annotations

import difflib
import re
from typing import Any

from plipy.report.base import fmt_kl, fmt_p, mean_ci
from plipy.report.html.common import ci_traces, color, go, layout
from plipy.report.html.knockout import sample_panel
from plipy.report.html.page import Section, esc
from plipy.results.calibrate import CalibrateResult
from plipy.results.dose import DoseResult
from plipy.results.generate import GenerateResult
from plipy.results.views import VIEWS


def _ok(samples: list[dict], group: str, field: str) -> list[float]:
    return [s[field] for s in samples if s["group"] == group and s.get("status") == "ok" and s.get(field) is not None]


# -- calibrate -----------------------------------------------------------------------------------------------------


@VIEWS.html(CalibrateResult)
def calibrate_view(result: Any, sec: Section) -> None:
    """Each sample's baseline attention per group with the means, and B's exact steered mean per α."""
    import numpy as np

    g = go()
    ga, gb = result["groups_compared"]
    fig = g.Figure()
    rng = np.random.default_rng(0)  # jitter only: the values are exact
    for gi, grp in enumerate((ga, gb)):
        rows = [s for s in result["samples"] if s["group"] == grp and s["status"] == "ok"]
        vals = [s["attention"] for s in rows]
        fig.add_trace(
            g.Scatter(
                x=(gi + rng.uniform(-0.12, 0.12, len(vals))).tolist(),
                y=vals,
                mode="markers",
                name=grp,
                marker={"color": color(gi), "size": 7, "opacity": 0.7},
                text=[s["id"] for s in rows],
                hovertemplate="%{text}<br>attention %{y:.5f}<extra></extra>",
            )
        )
        if vals:
            m, lo, hi = mean_ci(vals)
            fig.add_trace(
                g.Scatter(
                    x=[gi + 0.3],
                    y=[m],
                    mode="markers",
                    showlegend=False,
                    marker={"symbol": "diamond", "size": 11, "color": color(gi)},
                    error_y={"type": "data", "symmetric": False, "array": [hi - m], "arrayminus": [m - lo]},
                    hovertemplate=f"{grp}: mean %{{y:.5f}}, 95% CI [{lo:.5f}, {hi:.5f}], "
                    f"n = {len(vals)}<extra></extra>",
                )
            )
    fig.add_hline(
        y=result["recommended_target"],
        line={"dash": "dash", "color": "grey", "width": 1},
        annotation_text="target: mean of A",
        annotation_font_size=10,
    )
    fig.update_layout(
        **layout(
            height=380,
            showlegend=False,
            xaxis={"tickvals": [0, 1], "ticktext": [ga, gb], "range": [-0.5, 1.6]},
            yaxis={"title": {"text": "attention (head mean)"}, "rangemode": "tozero"},
        )
    )
    sec.figure(
        "groups",
        fig,
        title=f"Baseline attention at layer {result['layer']}",
        note="Each sample (points, jittered sideways), the group means with t-based 95% CIs (diamonds), "
        "A's mean (dashed).",
    )
    table = result["dose_table"] if "dose_table" in result else []
    if table:
        fig = g.Figure(
            [
                g.Scatter(
                    x=[r["scale"] for r in table],
                    y=[r["attention"] for r in table],
                    mode="lines+markers",
                    name=f"{gb}: exact steered mean",
                    line={"color": color(1)},
                ),
                g.Scatter(
                    x=[r["scale"] for r in table],
                    y=[r["plip_attention"] for r in table],
                    mode="lines+markers",
                    name="PLIP's rule: α × mean(B)",
                    line={"color": "grey", "dash": "dot"},
                ),
            ]
        )
        fig.add_hline(y=result["recommended_target"], line={"dash": "dash", "color": "grey", "width": 1})
        if result["scale_to_a"]:
            fig.add_vline(
                x=result["scale_to_a"],
                line={"color": color(0), "width": 1},
                annotation_text=f"α = {result['scale_to_a']:.3f}",
                annotation_font_size=10,
            )
        xs = [r["scale"] for r in table] + ([result["scale_to_a"]] if result["scale_to_a"] else [])
        span = [float(np.log10(min(xs) / 1.25)), float(np.log10(max(xs) * 1.25))]
        fig.update_layout(
            **layout(
                height=380,
                xaxis={
                    "title": {"text": "scale α"},
                    "type": "log",
                    "range": span,
                    "tickvals": xs,
                    "ticktext": [f"{v:.3g}" for v in xs],
                },
                yaxis={"title": {"text": "attention of B"}, "rangemode": "tozero"},
            )
        )
        sec.figure(
            "scales",
            fig,
            title="Attention of B per scale",
            note="B's steered mean in closed form (solid) against PLIP's linear rule (dotted); the vertical "
            "line is the α that brings B to A's mean.",
        )


# -- dose ----------------------------------------------------------------------------------------------------------


@VIEWS.html(DoseResult)
def dose_view(result: Any, sec: Section) -> None:
    """KL and attention achieved per α with CIs (click a point: the tokens that changed), target-α solutions."""
    panel = sec.id("changed")
    click = {"target": panel, "fields": ["key"]}
    runs = sorted(enumerate(result["doses"]), key=lambda x: x[1]["scale"])
    sec.figure(
        "kl",
        dose_curve(result, runs, "kl"),
        click=click,
        title="Next-token KL(base ‖ steered) per scale",
        note="Group means with t-based 95% CIs; faint points: each sample (click one for the tokens that "
        "changed most). α = 1 is the unsteered computation: KL exactly 0.",
    )
    sec.figure(
        "attention",
        dose_curve(result, runs, "attention_achieved"),
        click=click,
        title=f"Attention achieved, layers {result['layers']}",
        note="Dashed: mean baseline attention; dotted: the target attention v (when asked for).",
    )
    panels = {
        f"{di}|{s['id']}": sample_panel({"label": f"α = {r['scale']:g}"}, s, "p steered", "scale")
        for di, r in enumerate(result["doses"])
        for s in r["samples"]
    }
    if "target" in result:
        target_view(result, sec, panels)
    mono = result["monotonicity"]
    sec.text(
        "monotonicity",
        f"attention rises with α: {mono['attention_increasing']} (samples "
        f"{mono['samples_attention_increasing']}); KL rises with α above 1: {mono['kl_increasing_above_1']}, "
        f"as α falls below 1: {mono['kl_increasing_below_1']}",
        title="Monotonicity",
    )
    best = max(((s["kl"], k) for k, s in _keyed(result) if s.get("kl") is not None), default=None)
    sec.detail(
        "changed",
        panels,
        initial=best[1] if best else None,
        title="Top changed tokens",
        note="For the clicked sample and scale (first shown: the largest KL).",
    )


def _keyed(result: Any) -> list[tuple[str, dict]]:
    return [(f"{di}|{s['id']}", s) for di, r in enumerate(result["doses"]) for s in r["samples"]]


def dose_curve(result: Any, runs: list[tuple[int, dict]], field: str) -> Any:
    """One field per α: each group's mean with its CI band and each sample as a faint point (customdata: key)."""
    g = go()
    x = [r["scale"] for _, r in runs]
    fig = g.Figure()
    for gi, grp in enumerate(result["groups"] if runs else []):
        col = color(gi)
        vals = [_ok(r["samples"], grp, field) for _, r in runs]
        fig.add_traces(ci_traces(x, vals, name=f"{grp} (n={max(map(len, vals), default=0)})", col=col, legendgroup=grp))
        pts = [
            (r["scale"], s[field], f"{di}|{s['id']}", s["id"])
            for di, r in runs
            for s in r["samples"]
            if s["group"] == grp and s.get("status") == "ok" and s.get(field) is not None
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
                hovertemplate=f"%{{text}} ({grp})<br>α %{{x:g}}: {field} %{{y:.4g}}<extra></extra>",
            )
        )
    if field == "attention_achieved":
        base = [s["attention_baseline"] for s in result["samples"] if s.get("attention_baseline") is not None]
        if base:
            fig.add_hline(y=sum(base) / len(base), line={"color": "grey", "dash": "dash", "width": 1})
        if "target" in result:
            fig.add_hline(y=result["target"]["target_attention"], line={"color": "black", "dash": "dot", "width": 1})
    fig.add_vline(x=1.0, line={"color": "grey", "width": 1})
    ylab = "KL (nats)" if field == "kl" else "attention achieved"
    fig.update_layout(
        **layout(
            height=400,
            xaxis={"title": {"text": "scale α"}, "type": "log", "tickvals": x, "ticktext": [f"{v:g}" for v in x]},
            yaxis={"title": {"text": ylab}, "exponentformat": "e"},
        )
    )
    return fig


def target_view(result: Any, sec: Section, panels: dict[str, str]) -> None:
    """Per sample the α that reaches the target attention v, its attention and KL, and its status."""
    g = go()
    t = result["target"]
    rows = t["samples"]
    fig = g.Figure()
    for gi, grp in enumerate(result["groups"]):
        mine = [s for s in rows if s["group"] == grp and s.get("scale") is not None]
        fig.add_trace(
            g.Scatter(
                x=[s["id"] for s in mine],
                y=[s["scale"] for s in mine],
                mode="markers",
                name=grp,
                marker={"color": color(gi), "size": 8},
                customdata=[[f"target|{s['id']}"] for s in mine],
                text=[
                    f"attention {s.get('attention_achieved', float('nan')):.5f}, KL {fmt_kl(s.get('kl'))}, "
                    f"{s.get('status')}"
                    for s in mine
                ],
                hovertemplate="%{x}: α = %{y:.4g}<br>%{text}<extra></extra>",
            )
        )
    for s in rows:
        panels[f"target|{s['id']}"] = sample_panel(
            {"label": f"α = {s.get('scale') or 0:.4g} (v = {t['target_attention']:g})"}, s, "p steered", "scale"
        )
    fig.update_layout(
        **layout(
            height=340,
            xaxis={"type": "category", "tickangle": -45},
            yaxis={"title": {"text": "α reaching v"}, "type": "log"},
        )
    )
    sec.figure(
        "target",
        fig,
        click={"target": sec.id("changed"), "fields": ["key"]},
        title=f"Scales that reach the target attention v = {t['target_attention']:g}",
        note=f"Solved per sample in closed form, then run: mean α {t['mean_scale']:.4g}, mean KL "
        f"{fmt_kl(t['mean_kl'])} (n = {t['n']}). Statuses other than ok: "
        + (", ".join(f"{s['id']} {s['status']}" for s in rows if s.get("status") != "ok") or "none")
        + ".",
    )


# -- generate ------------------------------------------------------------------------------------------------------


@VIEWS.html(GenerateResult)
def generate_view(result: Any, sec: Section) -> None:
    """Generations with a test marker, baseline vs steered; each prompt's two texts as a word diff."""
    g = go()
    s = result["summary"]
    fig = g.Figure(
        g.Bar(
            x=["baseline", "steered"],
            y=[s["baseline_preserved"], s["steered_preserved"]],
            marker={"color": [color(0), color(1)]},
            hovertemplate="%{x}: %{y} of " + str(s["total"]) + " with a test marker<extra></extra>",
        )
    )
    fig.add_hline(
        y=s["total"],
        line={"dash": "dot", "color": "grey", "width": 1},
        annotation_text=f"prompts ({s['total']})",
        annotation_font_size=10,
    )
    fig.update_layout(**layout(height=320, yaxis={"title": {"text": "generations with a test marker"}}))
    sec.figure(
        "preserved",
        fig,
        title=f"Test markers preserved (one-sided Fisher p = {fmt_p(s['fisher_exact_p'])})",
        note=f"gained {s['gained']}, lost {s['lost']}, identical {s['identical']} of {s['total']}.",
    )
    items = []
    for r in result["samples"]:
        badge = f'<span class="badge {esc(r["change"])}">{esc(r["change"])}</span>'
        body = (
            '<div class="diff">(identical) ' + esc(r["baseline"]) + "</div>"
            if r["identical"]
            else f'<div class="diff">{word_diff(r["baseline"], r["steered"])}</div>'
        )
        head = f"<p><b>{esc(r['id'])}</b> {esc(r.get('category') or '')} {badge}</p>"
        items.append(f'<div class="gen">{head}{body}</div>')
    sec.markup(
        "diffs",
        "".join(items) or "<p>no prompts</p>",
        title="Generations: baseline → steered",
        note="Struck red: only in the baseline; green: only in the steered generation.",
    )


def word_diff(a: str, b: str) -> str:
    """`a` → `b` as HTML, word by word (whitespace kept): deletions in <del>, insertions in <ins>."""
    ta, tb = re.findall(r"\s+|\S+", a), re.findall(r"\s+|\S+", b)
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(esc("".join(ta[i1:i2])))
            continue
        if i2 > i1:
            out.append(f"<del>{esc(''.join(ta[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{esc(''.join(tb[j1:j2]))}</ins>")
    return "".join(out)
