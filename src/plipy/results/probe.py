"""The probe's result: per layer, cross-validated probe accuracy beside its shuffled-label control."""

from __future__ import annotations

from typing import Any

from plipy.results.base import Result


class ProbeResult(Result):
    """`plipy.probe`: per layer, cross-validated linear-probe accuracy beside a shuffled-label control and the
    majority-class baseline."""

    kind, path_pattern = "probe", "probe-{model}-{feature}.json"

    def rows(self) -> list[dict[str, Any]]:
        return probe_rows(self._data)

    def _describe(self) -> str:
        return f"samples={len(self._data['samples'])} layers={len(self._data['layers'])}"


def probe_rows(result: dict) -> list[dict[str, Any]]:
    """One row per layer."""
    keys = (
        "layer",
        "accuracy",
        "accuracy_std",
        "shuffled_mean",
        "shuffled_p95",
        "p_perm",
        "p_holm",
        "train_accuracy",
        "converged",
    )
    return [{**{k: r.get(k) for k in keys}, "majority_baseline": result["majority_baseline"]} for r in result["layers"]]
