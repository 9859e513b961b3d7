"""The dose-response result: KL and attention achieved per dose α and sample (and per target attention)."""

from __future__ import annotations

from typing import Any

from plipy.results.base import Result


class DoseResult(Result):
    """`plipy.steer.dose`: KL and attention achieved per dose α and sample (and per target attention)."""

    kind, path_pattern = "dose", "steer-{model}-{groups_label}-L{layers_label}.json"

    def rows(self) -> list[dict[str, Any]]:
        return sample_rows(self._data)


def sample_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per (dose, sample) for pandas."""
    rows = []
    runs = [(str(r["scale"]), r) for r in result["doses"]]
    if "target" in result:
        runs.append(("target", result["target"]))
    for label, run in runs:
        for r in run["samples"]:
            rows.append(
                {
                    "dose": label,
                    "scale": r.get("scale", run.get("scale")),
                    "id": r["id"],
                    "group": r["group"],
                    "status": r["status"],
                    "kl": r.get("kl"),
                    "attention_achieved": r.get("attention_achieved"),
                    "top1_changed": r.get("top1_changed"),
                }
            )
    return rows
