"""The knockout's result: next-token KL (and more) when attention edges are removed, per condition and sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plipy.results.base import Result


class KnockoutResult(Result):
    """`plipy.knockout`: next-token KL (and more) when attention edges are removed, per condition and sample."""

    kind, path_pattern = "knockout", "knockout-{model}-{mode}-{edges}.json"

    def rows(self) -> list[dict[str, Any]]:
        return sample_rows(self._data)

    def default_path(self) -> Path:
        """`knockout-<model>-<mode>-<edges>.json`; a mean or resample ablation adds `-mean` / `-resample`."""
        path = super().default_path()
        ablation = self._data.get("ablation")
        return path.with_name(f"{path.stem}-{ablation['kind']}{path.suffix}") if ablation else path


def sample_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per (condition, sample) for pandas (the Parquet file)."""
    rows = []
    for i, run in enumerate(result["runs"]):
        for r in run["samples"]:
            rows.append(
                {
                    "condition": i,
                    "label": run["label"],
                    "layers": run["layers"],
                    "edges": run["edges"],
                    "id": r["id"],
                    "group": r["group"],
                    "status": r["status"],
                    "kl": r.get("kl"),
                    "kl_plip": r.get("kl_plip"),
                    "entropy_base": r.get("entropy_base"),
                    "entropy_intervened": r.get("entropy_intervened"),
                    "entropy_change": r.get("entropy_change"),
                    "top1_changed": r.get("top1_changed"),
                    "top1_base_token": r.get("top1_base_token"),
                    "top1_intervened_token": r.get("top1_intervened_token"),
                }
            )
    return rows
