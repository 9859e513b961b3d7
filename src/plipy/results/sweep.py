"""The sweep's result: one experiment over several models, compared in one table (one row per model; the per-model
results are their own files)."""

from __future__ import annotations

from typing import Any

from plipy.results.base import Result


class SweepResult(Result):
    """`plipy.sweep`: one experiment over several models; the comparison table, one row per model (the per-model
    results are their own files)."""

    kind, path_pattern = "sweep", "sweep-{experiment}.json"

    def rows(self) -> list[dict[str, Any]]:
        return list(self._data["comparison"])

    def __repr__(self) -> str:
        return f"<SweepResult experiment={self._data['experiment']} models={[m['spec'] for m in self._data['models']]}>"
