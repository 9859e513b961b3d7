"""Patching reports: the layer × head (+ attention block, MLP) heatmap of the normalised metric per condition with
its CIs, the top sites with their CIs, the console tables (top sites, identity null, attribution check)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from rich import box
from rich.table import Table

from plipy.report.base import Note, fmt_num, fmt_p, pyplot, run_seconds
from plipy.results.patching import PatchResult, condition_label, condition_sites, site_grid
from plipy.results.views import VIEWS

SHOWN = 8  # top sites per condition on the console
MAX_PANELS = 12  # conditions drawn in one figure


def ranked(result: Mapping[str, Any], i: int) -> list[tuple[int, int]]:
    """(position in the condition, site index) of condition i's sites, largest |mean| first (no value: last)."""
    c = result["conditions"][i]
    idx = condition_sites(result, c)
    order = sorted(range(len(idx)), key=lambda j: (c["mean"][j] is None, -abs(c["mean"][j] or 0.0), j))
    return [(j, idx[j]) for j in order]


def fmt_ci(ci: Any) -> str:
    """`[lo, hi]`, or a dash."""
    return "—" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _head(result: Mapping[str, Any]) -> str:
    m, cf = result["metric"], result["counterfactual"]
    what = {"activation": "Activation patching", "attribution": "Attribution patching", "path": "Path patching"}
    line = f"{what.get(result['method'], result['method'])}: {m['description']}; counterfactual: {cf['rule']}"
    if result["method"] == "path":
        line += "; receivers " + ", ".join(r["label"] for r in result["receivers"])
    return line + "\n0 = no effect, 1 = the whole clean − corrupt difference (restored when denoising)"


def condition_table(result: Mapping[str, Any], i: int) -> Table:
    """Condition i's top sites: mean normalised value, its bootstrap CI, the raw metric's mean."""
    c = result["conditions"][i]
    t = Table(
        title=f"{condition_label(c)} (n = {c['n']})",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    for col in ("site", "mean", "95% CI", f"{result['metric']['name']} mean"):
        t.add_column(col, justify="right")
    for j, s in ranked(result, i)[:SHOWN]:
        ci = None if c["ci"] is None else c["ci"][j]
        t.add_row(
            result["sites"][s]["label"], fmt_num(c["mean"][j], ".3f"), fmt_ci(ci), fmt_num(c["metric_mean"][j], ".4g")
        )
    return t


@VIEWS.summary(PatchResult)
def summary(result: Mapping[str, Any]) -> list[Any]:
    """The console report: the top sites of each condition, the identity null, the attribution check, the run."""
    out: list[Any] = [_head(result)]
    out += [condition_table(result, i) for i in range(len(result["conditions"]))]
    for n in result.get("identity", []):
        state = "unchanged exactly" if n["exact"] else f"changed by up to {n['max_abs_metric_change']:.3g}"
        out.append(
            f"identity null ({n['direction']}): the target run patched with its own values at every site — "
            f"metric {state} on {n['n']} samples"
        )
    if "attribution" in result:
        out.append(attribution_table(result))
    cfg = result["provenance"]["config"].get("runner", {})
    how = (
        "fast path: unpatched runs once per sample, suffix-only reruns from their cache, layers below the patched "
        "one not recomputed"
        if cfg.get("path") == "fast"
        else "naive path: " + "; ".join(cfg.get("fallback_reasons", []))
    )
    out.append(f"{how} — {cfg.get('forward_calls', 0)} forwards — {run_seconds(result):.1f} s")
    for e in result["excluded"]:
        out.append(Note(f"excluded {e['id']} ({e['group']}): {e['status']} — {e.get('note') or ''}"))
    return out


def attribution_table(result: Mapping[str, Any]) -> Table:
    """Per condition: how well the attribution ranking agrees with exact patching of its top heads."""
    a = result["attribution"]
    t = Table(
        title=f"Attribution against exact patching of its top {a['top']} heads",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    for col in ("condition", "heads", "Spearman ρ", "p", "top head: estimate → exact"):
        t.add_column(col, justify="right")
    for ch in a["checks"]:
        first = (
            f"{ch['sites'][0]}: {fmt_num(ch['attribution'][0], '.3f')} → {fmt_num(ch['exact'][0], '.3f')}"
            if ch["sites"]
            else "—"
        )
        t.add_row(
            f"{ch['direction']} @ {ch['position']}",
            str(len(ch["sites"])),
            fmt_num(ch["spearman"], ".3f"),
            fmt_p(ch["p"]),
            first,
        )
    return t


def _grid_array(result: Mapping[str, Any], i: int, what: str = "mean") -> tuple[np.ndarray, list[str], list[int]]:
    grid, columns, layers = site_grid(result, i, what)  # type: ignore[arg-type]
    return np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float), columns, layers


@VIEWS.figure(PatchResult, "heatmap")
def heatmap_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """One layer × (heads, attn, mlp) heatmap of the mean normalised metric per condition; a dot marks a cell
    whose 95% bootstrap CI excludes 0."""
    plt = pyplot()
    shown = list(range(min(len(result["conditions"]), MAX_PANELS)))
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    grids = [_grid_array(result, i) for i in shown]
    vmax = max((float(np.nanmax(np.abs(g))) for g, _, _ in grids if np.isfinite(g).any()), default=1.0) or 1.0
    n_cols, n_layers = len(grids[0][1]), len(grids[0][2])
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(1 + ncols * (1.2 + 0.3 * n_cols), nrows * (1.4 + 0.2 * n_layers)),
        squeeze=False,
        layout="constrained",
    )
    for ax, i, (g, columns, layers) in zip(axes.flat, shown, grids, strict=False):
        im = ax.imshow(g, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        lo, hi = _grid_array(result, i, "lo")[0], _grid_array(result, i, "hi")[0]
        ys, xs = np.nonzero((lo > 0) | (hi < 0))
        ax.scatter(xs, ys, s=4, c="black", marker="o", linewidths=0)
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=6)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
        ax.set_title(condition_label(result["conditions"][i]), fontsize=8)
        ax.set_ylabel("layer", fontsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, fraction=0.02, label="normalised metric (0 = no effect, 1 = full)")
    fig.suptitle(f"{result['method']} patching, {result['metric']['name']}; dot: 95% CI excludes 0", fontsize=9)
    return fig


@VIEWS.figure(PatchResult, "top")
def top_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Per condition, the sites with the largest |mean| and their 95% bootstrap CIs."""
    plt = pyplot()
    shown = list(range(min(len(result["conditions"]), MAX_PANELS)))
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False, layout="constrained")
    for ax, i in zip(axes.flat, shown, strict=False):
        c = result["conditions"][i]
        top = [(j, s) for j, s in ranked(result, i) if c["mean"][j] is not None][:10]
        means = [c["mean"][j] for j, _ in top]
        cis = [None if c["ci"] is None else c["ci"][j] for j, _ in top]
        err = np.array([[m - (ci[0] if ci else m), (ci[1] if ci else m) - m] for m, ci in zip(means, cis, strict=True)])
        y = np.arange(len(top))
        ax.barh(y, means, xerr=err.T if len(err) else None, color="#1f77b4", capsize=2)
        ax.set_yticks(y, [result["sites"][s]["label"] for _, s in top], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(f"{condition_label(c)} (n = {c['n']})", fontsize=8)
        ax.set_xlabel("normalised metric (95% CI)", fontsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    return fig
