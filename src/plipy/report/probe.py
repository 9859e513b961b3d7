"""Probe reports: accuracy by layer beside the shuffled-label control and the majority baseline, and the table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from rich.table import Table

from plipy.report.base import COLORS, Note, fmt_p, pyplot
from plipy.results.probe import ProbeResult
from plipy.results.views import VIEWS


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


@VIEWS.summary(ProbeResult)
def summary(result: Mapping[str, Any]) -> list[Any]:
    """Per layer: CV accuracy ± sd, the shuffled control, permutation p (Holm), training accuracy."""
    counts = ", ".join(f"{c} {n}" for c, n in result["counts"].items())
    t = Table(
        title=f"Linear probe on the {result['feature']} token's residual ({result['n_samples']} samples: "
        f"{counts}; {result['folds']}-fold stratified CV)",
        header_style="bold",
    )
    perms = result["provenance"]["config"].get("permutations", 0)
    cols = ["layer", "accuracy", "± sd", "shuffled", "shuffled 95%", "p perm", "p Holm", "train acc."]
    for col in cols if perms else [c for c in cols if not c.startswith(("shuffled", "p "))]:
        t.add_column(col, justify="right")
    for r in result["layers"]:
        cells = [str(r["layer"]), _pct(r["accuracy"]), _pct(r["accuracy_std"])]
        if perms:
            cells += [_pct(r["shuffled_mean"]), _pct(r["shuffled_p95"]), fmt_p(r["p_perm"]), fmt_p(r.get("p_holm"))]
        t.add_row(*cells, _pct(r["train_accuracy"]))
    out: list[Any] = [
        t,
        f"majority-class baseline {_pct(result['majority_baseline'])}, chance "
        f"{_pct(result['chance'])}; {result['n_features']} features per sample",
    ]
    if perms:
        out.append(
            f"shuffled: the same probe and folds on {perms} label permutations; the smallest possible p is "
            f"1/{perms + 1} = {1 / (perms + 1):.3f}"
        )
        out += _resolution_note(perms, len(result["layers"]))
    if result["n_features"] >= result["n_samples"]:
        out.append(
            f"{result['n_samples']} samples in {result['n_features']} dimensions: any labelling of a training "
            "set is separable (train accuracy says nothing); only held-out accuracy above the control does"
        )
    out += [Note(f"excluded {e['id']} ({e['label']}): {e['note']}") for e in result["excluded"]]
    out += [
        Note(f"layer {r['layer']}: the logistic regression did not converge")
        for r in result["layers"]
        if not r["converged"]
    ]
    return out


def _resolution_note(perms: int, n_layers: int, alpha: float = 0.05) -> list[Any]:
    """A warning when the permutation test cannot reach `alpha` after Holm over the layers: the smallest p is
    1/(n+1), so the smallest Holm-corrected p is min(1, L/(n+1)) — whatever the probe's accuracy."""
    best = min(1.0, n_layers / (perms + 1))
    if best < alpha:
        return []
    needed = int(n_layers / alpha)  # L/(n+1) < alpha  ⇔  n ≥ L/alpha
    return [
        Note(
            f"with {perms} permutations no layer can be significant after Holm over {n_layers} layers (the smallest "
            f"possible p_holm is {best:.3g}), however well the probe does: use --permutations {needed} or more, or "
            "fewer layers"
        )
    ]


@VIEWS.figure(ProbeResult, "accuracy")
def accuracy_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Cross-validated accuracy by layer (per-fold points, mean ± sd), the shuffled-label control and baselines."""
    plt = pyplot()
    rows = result["layers"]
    layers = [r["layer"] for r in rows]
    acc = np.array([r["accuracy"] for r in rows])
    sd = np.array([r["accuracy_std"] for r in rows])
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for r in rows:
        ax.plot([r["layer"]] * len(r["fold_accuracies"]), r["fold_accuracies"], ".", color=COLORS[0], alpha=0.25, ms=4)
    ax.plot(layers, acc, "-o", ms=3, color=COLORS[0], label="probe (CV accuracy, mean ± sd)")
    ax.fill_between(layers, acc - sd, np.minimum(acc + sd, 1), color=COLORS[0], alpha=0.15)
    if "shuffled_mean" in rows[0]:
        ax.plot(layers, [r["shuffled_mean"] for r in rows], "-", color=COLORS[1], label="shuffled labels (mean)")
        ax.plot(layers, [r["shuffled_p95"] for r in rows], ":", color=COLORS[1], label="shuffled labels (95%)")
    ax.axhline(result["majority_baseline"], color="grey", ls="--", lw=1, label="majority class")
    ax.set(
        xlabel="layer (residual after decoder layer L)",
        ylabel="accuracy",
        ylim=(0, 1.05),
        title=f"linear probe: {' vs '.join(result['classes'])} ({result['feature']} token, n={result['n_samples']})",
    )
    ax.legend(fontsize=7, loc="lower right")
    return fig
