"""The steered generation's result: baseline vs steered generations by the same decoding call, and Fisher's test."""

from __future__ import annotations

from typing import Any

from plipy.results.base import Result


class GenerateResult(Result):
    """`plipy.steer.generate`: baseline vs steered generations by the same decoding call, and Fisher's test."""

    kind, path_pattern = "generate", "generate-{model}-L{layers_label}.json"

    def rows(self) -> list[dict[str, Any]]:
        return generate_rows(self._data)


def generate_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per prompt of a steered generation."""
    keys = (
        "id",
        "category",
        "baseline",
        "steered",
        "baseline_tokens",
        "steered_tokens",
        "identical",
        "baseline_has_test",
        "steered_has_test",
        "change",
    )
    return [{k: s.get(k) for k in keys} for s in result["samples"]]
