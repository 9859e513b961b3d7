"""The sweep's views: the comparison table (one row per model) and the effect ratio beside its null, per model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.table import Table

from plipy.report.base import fmt_num, fmt_p, pyplot
from plipy.results.sweep import SweepResult
from plipy.results.views import VIEWS


@VIEWS.summary(SweepResult)
def summary(result: Mapping[str, Any]) -> list[Any]:
    """The console report: one row per model."""
    rows = result["comparison"]
    unit = rows[0]["effect"] if rows else ""
    t = Table(
        title=f"Sweep: {result['experiment']} over {len(rows)} models ({unit}; A/B beside the null A/B)",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    for col in (
        "model",
        "layers",
        "A/B groups",
        "max effect at",
        "depth",
        "mean A",
        "mean B",
        "A/B",
        "null A/B",
        "g",
        "p Holm",
    ):
        t.add_column(col, justify="left" if col in ("model", "A/B groups") else "right")
    for r in rows:
        t.add_row(
            str(r["model"]),
            str(r["n_layers"]),
            r["compared"],
            str(r["max_effect_layer"]),
            "—" if r["depth"] is None else f"{r['depth']:.2f}",
            fmt_num(r["mean_a"], ".4g"),
            fmt_num(r["mean_b"], ".4g"),
            fmt_num(r["ratio"]) + ("×" if r["ratio"] is not None else ""),
            fmt_num(r["null_ratio"]) + ("×" if r["null_ratio"] is not None else ""),
            fmt_num(r["hedges_g"]),
            fmt_p(r["p_holm"]),
        )
    out: list[Any] = [t]
    if result["experiment"] == "knockout" and any(r["null_ratio"] is None for r in rows):
        out.append(
            "null A/B —: no KLs on both _baseline groups (they need --include-baselines and baseline samples "
            "with an edge to knock out)"
        )
    out.append("files: " + ", ".join(m["file"] for m in result["models"] if m.get("file")))
    return out


@VIEWS.figure(SweepResult, "ratios")
def ratios_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Per model, the A/B ratio at its layer of largest effect beside the null ratio: is the effect beyond it?"""
    plt = pyplot()
    rows = result["comparison"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6))
    xs = range(len(rows))
    ax.bar(
        [x - 0.18 for x in xs],
        [r["ratio"] or float("nan") for r in rows],
        0.36,
        label="A/B at max effect",
        color="#3b6ea8",
    )
    ax.bar(
        [x + 0.18 for x in xs], [r["null_ratio"] or float("nan") for r in rows], 0.36, label="null A/B", color="#bbbbbb"
    )
    ax.axhline(1.0, color="#444444", lw=0.8, ls=":")
    for x, r in zip(xs, rows, strict=True):
        if r["null_ratio"] is None:
            ax.annotate("no null", (x + 0.18, 1.0), ha="center", va="bottom", fontsize=7, color="#777777")
    vals = [v for r in rows for v in (r["ratio"], r["null_ratio"]) if v is not None and v > 0]
    if vals and max(vals) / min(vals) > 20:
        ax.set_yscale("log")  # ratios of KLs span decades
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_xticks(list(xs), [f"{r['model']}\nlayer {r['max_effect_layer']}" for r in rows], fontsize=8)
    ax.set_ylabel("ratio of group means")
    ax.set_title(f"{result['experiment']}: effect ratio vs null, per model", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
