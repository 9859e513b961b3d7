"""Steering reports: the dose-response plot (KL and attention achieved with CIs) and the console tables of
calibrate, dose and generate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from rich import box
from rich.table import Table
from rich.text import Text

from plipy.report.base import COLORS, Note, fmt_num, fmt_p, mean_ci, pyplot, run_seconds
from plipy.results.calibrate import CalibrateResult
from plipy.results.dose import DoseResult
from plipy.results.generate import GenerateResult
from plipy.results.views import VIEWS


def excluded_lines(result: Mapping[str, Any]) -> list[str]:
    """One line per sample or prompt left out, with why."""
    return [
        Note(f"excluded {e['id']}: {e['status']} — {e.get('note') or ''}")
        for e in result.get("excluded", []) + result.get("skipped", [])
    ]


@VIEWS.summary(CalibrateResult)
def calibrate_summary(result: Mapping[str, Any]) -> list[Any]:
    """The console report of a calibration."""
    ga, gb = result["groups_compared"]
    t = Table(
        title=f"Calibration at layer {result['layer']}: attention marker → targets (head mean)",
        box=box.SIMPLE_HEAD,
        header_style="bold",
    )
    for col in ("group", "n", "mean", "std"):
        t.add_column(col, justify="right")
    for g in (ga, gb):
        d = result["groups"][g]
        t.add_row(g, str(d["n"]), f"{d['mean']:.5f}", fmt_num(d["std"], ".5f"))
    line = (
        f"ratio {ga}/{gb} = {fmt_num(result['ratio'], '.3f')}; scale that brings {gb}'s steered mean "
        f"to {ga}'s: α = {fmt_num(result['scale_to_a'], '.4f')} (PLIP's ratio rule: "
        f"{fmt_num(result['scale_plip'], '.4f')})"
    )
    return [t, line, *excluded_lines(result)]


@VIEWS.summary(GenerateResult)
def generate_summary(result: Mapping[str, Any]) -> list[Any]:
    """The console report of steered generation: side-by-side texts and the Fisher test."""
    cfg = result["provenance"]["config"]
    t = Table(
        title=f"Generation, layers {cfg['layers']}, α = {cfg['scale']:g}",
        box=box.SIMPLE_HEAD,
        header_style="bold",
        show_lines=True,
    )
    for col in ("id", "baseline", "steered", "change"):
        t.add_column(col, overflow="fold")
    for r in result["samples"]:
        # generated code is full of `[...]` (`#[test]`): Text, not rich markup
        t.add_row(
            Text(r["id"]), Text(r["baseline"]), Text("(identical)" if r["identical"] else r["steered"]), r["change"]
        )
    s = result["summary"]
    line = (
        f"tests preserved: baseline {s['baseline_preserved']}/{s['total']}, steered "
        f"{s['steered_preserved']}/{s['total']} (gained {s['gained']}, lost {s['lost']}, identical "
        f"{s['identical']}); one-sided Fisher p = {fmt_p(s['fisher_exact_p'])}"
    )
    return [t, line, *excluded_lines(result)]


@VIEWS.summary(DoseResult)
def dose_summary(result: Mapping[str, Any]) -> list[Any]:
    """The console report of a dose-response run."""
    t = Table(
        title=f"Steering layers {result['layers']} ({len(result['heads'])} heads), groups "
        f"{', '.join(result['groups'])}: KL(base ‖ steered) in nats, attention achieved (head mean)",
        box=box.SIMPLE_HEAD,
        header_style="bold",
    )
    for col in ("scale", "n", "mean KL", "std KL", "attention"):
        t.add_column(col, justify="right")
    for r in result["doses"]:
        t.add_row(
            f"{r['scale']:g}",
            str(r["n"]),
            fmt_e(r["mean_kl"]),
            fmt_e(r["std_kl"]),
            fmt_num(r["mean_attention_achieved"], ".5f"),
        )
    if "target" in result:
        r = result["target"]
        t.add_row(
            f"v={r['target_attention']:g} (α̅={fmt_num(r['mean_scale'], '.3g')})",
            str(r["n"]),
            fmt_e(r["mean_kl"]),
            fmt_e(r["std_kl"]),
            fmt_num(r["mean_attention_achieved"], ".5f"),
        )
    out: list[Any] = [t]
    mono = result["monotonicity"]
    out.append(
        f"monotonic: attention rises with α: {mono['attention_increasing']} "
        f"(samples {mono['samples_attention_increasing']}); KL rises with α above 1: "
        f"{mono['kl_increasing_above_1']}, as α falls below 1: {mono['kl_increasing_below_1']}"
    )
    rn = result["provenance"]["config"]["runner"]
    out.append(f"runner: {rn['path']} path ({rn['forward_calls']} forward calls) — {run_seconds(result):.1f} s")
    return out + excluded_lines(result)


def fmt_e(x: Any) -> str:
    """Three significant decimals in scientific notation; None as a dash."""
    return "—" if x is None else f"{x:.3e}"


@VIEWS.figure(DoseResult, "dose")
def dose_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Mean KL and mean attention achieved per dose with t-based 95% CIs, one line per group."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = sorted(result["doses"], key=lambda r: r["scale"])
    x = np.array([r["scale"] for r in runs])
    for gi, g in enumerate(result["groups"] if runs else []):  # --doses "" with a target: no curve
        col = COLORS[gi % len(COLORS)]
        for key, ax in (("kl", ax1), ("attention_achieved", ax2)):
            vals = [[s[key] for s in r["samples"] if s["group"] == g and s["status"] == "ok"] for r in runs]
            m = np.array([mean_ci(v) if v else (np.nan,) * 3 for v in vals], dtype=float)
            ax.plot(x, m[:, 0], "-o", ms=3, color=col, label=f"{g} (n={max(len(v) for v in vals)})")
            ax.fill_between(x, m[:, 1], m[:, 2], color=col, alpha=0.18)
    base = np.mean([s["attention_baseline"] for s in result["samples"]]) if result["samples"] else None
    if base is not None:
        ax2.axhline(base, color="grey", ls="--", lw=1, label="baseline")
    if "target" in result:
        ax2.axhline(result["target"]["target_attention"], color="black", ls=":", lw=1, label="target v")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
    ax1.set(xlabel="scale α", ylabel="KL(base ‖ steered), nats", title="Next-token KL (95% CI)")
    ax2.set(xlabel="scale α", ylabel="attention achieved", title=f"Attention achieved, layers {result['layers']}")
    return fig


@VIEWS.figure(CalibrateResult, "groups")
def calibrate_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Each sample's baseline attention per group (dots), the group means with 95% CIs, and the scale's target."""
    plt = pyplot()
    groups = result["groups_compared"]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    rng = np.random.default_rng(0)  # jitter only: the values are exact
    for gi, g in enumerate(groups):
        vals = [s["attention"] for s in result["samples"] if s["group"] == g and s["status"] == "ok"]
        col = COLORS[gi % len(COLORS)]
        ax.scatter(gi + rng.uniform(-0.12, 0.12, len(vals)), vals, s=18, color=col, alpha=0.7)
        m, lo, hi = mean_ci(vals)
        ax.errorbar(
            [gi + 0.25],
            [m],
            yerr=[[m - lo], [hi - m]],
            fmt="o",
            color=col,
            capsize=4,
            label=f"{g}: mean {m:.4f} (n={len(vals)})",
        )
    ax.axhline(result["recommended_target"], color="grey", ls="--", lw=1, label="target (mean of A)")
    ax.set_xticks(range(len(groups)), groups)
    scale = result["scale_to_a"]
    ax.set(
        ylabel="attention marker → targets (head mean)",
        title=f"Calibration at layer {result['layer']}" + (f": α = {scale:.3f} brings B to A" if scale else ""),
    )
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return fig


@VIEWS.figure(GenerateResult, "preserved")
def generate_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Prompts whose generation contains a test marker: baseline vs steered, with Fisher's one-sided p."""
    plt = pyplot()
    s = result["summary"]
    fig, ax = plt.subplots(figsize=(4.8, 4))
    ax.bar([0, 1], [s["baseline_preserved"], s["steered_preserved"]], color=[COLORS[0], COLORS[1]])
    ax.axhline(s["total"], color="grey", ls=":", lw=1, label=f"prompts ({s['total']})")
    ax.set_xticks([0, 1], ["baseline", "steered"])
    ax.set(ylabel="generations with a test marker", title=f"one-sided Fisher p = {fmt_p(s['fisher_exact_p'])}")
    ax.legend(fontsize=7)
    return fig
