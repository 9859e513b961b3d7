"""Plots of `plipy sae attention` (upstream style, matplotlib Agg): per-head bars, original-vs-steered scatter,
layer × head heatmap, known-vs-unknown boxes. All use the first measure of the run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from plipy.corpus.prompts import EntityPrompt
from plipy.report.base import Note, fmt_num, fmt_p, pyplot
from plipy.results.sae_attention import SaeAttentionResult, difference
from plipy.results.views import VIEWS

HEAD_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
MARKERS = ["o", "s", "D", "X", "^", "v", "P", "*"]
LABEL_COLORS = {"known": "#82B366", "unknown": "#990000"}


def _heads(result: Mapping[str, Any]) -> list[tuple[int, int]]:
    return [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in result["heads"]]


def bars(result: Mapping[str, Any], arrays: dict, measure: str) -> Any:
    """Mean difference ± std (ddof 0) per saved head, as upstream's `plot_head_differences`."""
    plt = pyplot()
    heads = _heads(result)
    d = difference(arrays, result["latent"], measure)
    vals = np.stack([d[:, la, h] for la, h in heads], axis=1)
    mean, std = vals.mean(0), vals.std(0)
    width = 6 if len(heads) <= 12 else min(50, 20 if len(heads) <= 300 else 50)
    fig, ax = plt.subplots(figsize=(width, 6))
    x = np.arange(len(heads))
    ax.bar(
        x,
        mean,
        yerr=std,
        capsize=5 if len(heads) <= 40 else 1.5,
        color="#1f77b4",
        alpha=0.8,
        error_kw={"lw": 1 if len(heads) <= 40 else 0.6},
    )
    every = 1 if len(heads) <= 40 else 5
    ax.set_xticks(x[::every], [f"L{la}H{h}" for la, h in heads][::every], rotation=45, fontsize=12)
    lim = float(np.max(np.abs(np.concatenate([mean + std, mean - std])))) + 0.02
    ax.set_ylim(-lim, lim)
    ax.set_xlim(-0.7, len(heads) - 0.3)
    ax.axhline(0, color="black", alpha=0.2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlabel("Head", fontsize=15)
    ax.set_ylabel(f"{measure} difference (steered − original)", fontsize=15)
    ax.set_title(f"latent {result['latent']} at layer {result['layer']}, n={d.shape[0]}", fontsize=13)
    return fig


def scatter_heads(result: Mapping[str, Any], measure: str, n: int = 2) -> list[tuple[int, int]]:
    """The `n` saved heads with the largest |mean difference| (upstream plotted two chosen heads)."""
    ph = sorted(result["measures"][measure]["per_head"], key=lambda h: -abs(h["mean_difference"]))
    return [(h["layer"], h["head_index"]) for h in ph[:n]]


def scatter(result: Mapping[str, Any], arrays: dict, prompts: Sequence[EntityPrompt], measure: str) -> Any:
    """Original (x) vs steered (y) per prompt: colour per head, marker per entity type, dashed diagonal."""
    plt = pyplot()
    orig, steered = arrays["original"][measure], arrays["steered"][result["latent"]][measure]
    types = list(dict.fromkeys(p.entity_type for p in prompts))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    hi = 0.0
    for ci, (la, h) in enumerate(scatter_heads(result, measure)):
        for ti, t in enumerate(types):
            rows = np.array([p.entity_type == t for p in prompts])
            xs, ys = orig[rows, la, h], steered[rows, la, h]
            hi = max(hi, float(xs.max(initial=0)), float(ys.max(initial=0)))
            ax.scatter(
                xs,
                ys,
                s=30,
                c=HEAD_COLORS[ci % len(HEAD_COLORS)],
                marker=MARKERS[ti % len(MARKERS)],
                edgecolors="black",
                linewidths=0.5,
                label=f"L{la}H{h} · {t or '—'}",
            )
    top = max(hi * 1.05, 1.0 if measure == "attn_weights" else hi * 1.05) or 1.0
    ax.plot([0, top], [0, top], ls="--", color="lightgrey", zorder=0)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel=f"Original {measure}", ylabel=f"Steered {measure}")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"latent {result['latent']}: original vs steered", fontsize=10)
    return fig


def heatmap(result: Mapping[str, Any], measure: str) -> Any:
    """Layer × head mean difference over all prompts (the steering layer is marked)."""
    plt = pyplot()
    diff = np.array(result["measures"][measure]["mean_difference_layer_head"])
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * diff.shape[1], 1.2 + 0.22 * diff.shape[0]))
    lim = float(np.abs(diff).max()) or 1.0
    im = ax.imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.axhline(result["layer"] - 0.5, color="black", lw=1)
    ax.set(xlabel="head", ylabel="layer", title=f"mean {measure} difference\n(line: steering layer {result['layer']})")
    fig.colorbar(im, ax=ax, fraction=0.05)
    return fig


def boxes(result: Mapping[str, Any], arrays: dict, prompts: Sequence[EntityPrompt], measure: str) -> Any | None:
    """Original values of known vs unknown prompts for the scatter heads (None if there are not two labels)."""
    labels = [lab for lab in dict.fromkeys(p.label for p in prompts) if lab is not None]
    if len(labels) < 2:
        return None
    plt = pyplot()
    orig = arrays["original"][measure]
    heads = scatter_heads(result, measure)
    fig, ax = plt.subplots(figsize=(2 + 2 * len(heads), 4))
    width = 0.8 / len(labels)
    for li, lab in enumerate(labels):
        rows = np.array([p.label == lab for p in prompts])
        data = [orig[rows, la, h] for la, h in heads]
        pos = [i + (li - (len(labels) - 1) / 2) * width for i in range(len(heads))]
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True)
        color = LABEL_COLORS.get(str(lab), HEAD_COLORS[li % len(HEAD_COLORS)])
        for b in bp["boxes"]:
            b.set(facecolor=color, alpha=0.6)
        ax.plot([], [], color=color, lw=8, alpha=0.6, label=str(lab))
    ax.set_xticks(range(len(heads)), [f"L{la}H{h}" for la, h in heads])
    ax.set(ylabel=f"original {measure}", title="known vs unknown (original)")
    ax.legend(fontsize=8)
    return fig


def figures(
    result: Mapping[str, Any], arrays: dict, prompts: Sequence[EntityPrompt], measure: str | None = None
) -> dict[str, Any]:
    """The plots of one measure (default: the run's first) by kind: bars, scatter, heatmap, boxes (two labels)."""
    m = measure or next(iter(result["measures"]))
    figs = {
        "bars": bars(result, arrays, m),
        "scatter": scatter(result, arrays, prompts, m),
        "heatmap": heatmap(result, m),
    }
    box = boxes(result, arrays, prompts, m)
    if box is not None:
        figs["boxes"] = box
    return figs


@VIEWS.summary(SaeAttentionResult)
def summary(result: Mapping[str, Any]) -> list[Any]:
    """The console report: per measure the heads that moved most and the random-latent test per label."""
    from rich.table import Table

    out: list[Any] = [sae_note(result["sae"])] if "sae" in result else []
    for m, r in result["measures"].items():
        top = sorted(r["per_head"], key=lambda h: -abs(h["mean_difference"]))[:8]
        t = Table(
            title=f"{m}: latent {result['latent']} at the input of layer {result['layer']} "
            "(largest mean differences, steered − original)",
            header_style="bold",
        )
        for col in ("head", "original", "steered", "difference", "std"):
            t.add_column(col, justify="right")
        for h in top:
            t.add_row(
                h["head"],
                fmt_num(h["mean_original"], ".4f"),
                fmt_num(h["mean_steered"], ".4f"),
                fmt_num(h["mean_difference"], "+.4f"),
                fmt_num(h["std_difference"], ".4f"),
            )
        out.append(t)
        for lab, g in r["by_label"].items():
            ps = ", ".join(f"{x['latent']}: p={fmt_p(x['p'])}, g={fmt_num(x['hedges_g'])}" for x in g["random"])
            out.append(
                f"  label {lab} (n={g['n_prompts']}, expected {g['expected']}): mean difference "
                f"{fmt_num(g['mean_difference'], '+.4f')}; {g['summary']}" + (f"\n    {ps}" if ps else "")
            )
    return out


def sae_note(sae: Mapping[str, Any]) -> Note:
    """One line on the SAE that steered (`SAE.describe()`): its shape, hook and decoder row norms."""
    norms = sae.get("decoder_norms") or {}
    return Note(
        f"SAE {sae.get('source')}: {sae.get('architecture')}, d_in {sae.get('d_in')}, d_sae {sae.get('d_sae')}, hook "
        f"{sae.get('hook_name')}; decoder row norms min {norms.get('min', float('nan')):.4g} / mean "
        f"{norms.get('mean', float('nan')):.4g} / max {norms.get('max', float('nan')):.4g}"
        + ("" if norms.get("unit_norm") else " (not unit norm: steering scales with them)")
    )


def training_summary(result: Mapping[str, Any], model_name: str, layer: int, width: int) -> list[Any]:
    """The console report of `plipy sae train`: reconstruction and next-token-loss metrics."""
    from rich.table import Table

    m, tr = result["metrics"], result["training"]
    t = Table(
        title=f"SAE on {result['hook_name']} of {model_name} (steers at the input of layer {layer + 1})",
        header_style="bold",
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("explained variance (held out)", f"{m['explained_variance']:.4f}"),
        ("MSE per element", f"{m['mse']:.4g}"),
        ("L0", f"{m['l0']:.1f}"),
        ("dead latents (whole last epoch)", f"{tr['dead_latents']} of {width}"),
        ("next-token loss clean", f"{m['ce_clean']:.4f}"),
        ("… with the SAE spliced in", f"{m['ce_spliced']:.4f}"),
        ("loss increase (nats)", f"{m['ce_increase']:+.4f}"),
        ("… mean-ablated", f"{m.get('ce_mean_ablated', float('nan')):.4f}"),
        ("loss recovered", "—" if m.get("ce_loss_recovered") is None else f"{m['ce_loss_recovered']:.3f}"),
        (
            "seconds (collect / train / eval)",
            " / ".join(f"{result['timings_s'][x]:.0f}" for x in ("collect", "train", "eval")),
        ),
    ]
    for r in rows:
        t.add_row(*r)
    return [t]


def latents_summary(doc: Mapping[str, Any], split: str) -> list[Any]:
    """The console report of `plipy sae latents`: the top latents per label with their activation frequencies."""
    from rich.table import Table

    t = Table(
        title=f"Top latents at the input of layer {doc['layer']} ({doc['n_entities']} entities, split {split})",
        header_style="bold",
    )
    for col in ("label", "latent", "min score", "f known", "f unknown", "f general"):
        t.add_column(col, justify="right")
    for lab in ("known", "unknown"):
        by_idx = {e["latent_idx"]: e for e in doc[lab].values()}
        for i in doc["top"][lab][:5]:
            e = by_idx[i]
            t.add_row(
                lab,
                str(i),
                f"{e['score']:+.3f}",
                f"{e['freq_acts_known']:.3f}",
                f"{e['freq_acts_unknown']:.3f}",
                "—" if e.get("freq_general") is None else f"{e['freq_general']:.4f}",
            )
    out: list[Any] = [t]
    if doc["skipped_types"]:
        out.append(f"types without both labels (left out): {', '.join(doc['skipped_types'])}")
    return out


def _first_measure(result: SaeAttentionResult, measure: str | None) -> str:
    return measure or next(iter(result["measures"]))


@VIEWS.figure(SaeAttentionResult, "bars")
def bars_figure(result: SaeAttentionResult, measure: str | None = None, **_options: Any) -> Any:
    """Per-head bars of one measure (default: the run's first)."""
    return bars(result, result.arrays, _first_measure(result, measure))


@VIEWS.figure(SaeAttentionResult, "scatter")
def scatter_figure(result: SaeAttentionResult, measure: str | None = None, **_options: Any) -> Any:
    """Original vs steered for the heads that moved most."""
    return scatter(result, result.arrays, result.prompts(), _first_measure(result, measure))


@VIEWS.figure(SaeAttentionResult, "heatmap")
def heatmap_figure(result: SaeAttentionResult, measure: str | None = None, **_options: Any) -> Any:
    """The layer × head heatmap of the mean difference."""
    return heatmap(result, _first_measure(result, measure))


@VIEWS.figure(SaeAttentionResult, "boxes", unavailable=SaeAttentionResult.boxes_unavailable)
def boxes_figure(result: SaeAttentionResult, measure: str | None = None, **_options: Any) -> Any:
    """Known vs unknown original values (prompts of two labels)."""
    return boxes(result, result.arrays, result.prompts(), _first_measure(result, measure))
