"""The emergence result: per prompt and expected string, the first layer where a matching token is in the top-k."""

from __future__ import annotations

from typing import Any

from plipy.results.base import Result


class EmergenceResult(Result):
    """`plipy.emergence`: per prompt and expected string, the first layer where a matching token is in the top-k."""

    kind, path_pattern = "emergence", "emergence-{model}.json"

    def rows(self) -> list[dict[str, Any]]:
        return emergence_rows(self._data)


def emergence_rows(result: dict) -> list[dict[str, Any]]:
    """One row per (prompt, expected string, layer)."""
    rows = []
    k = result["top_k"]
    for p in result["prompts"]:
        for e in p["expected"]:
            for i, layer in enumerate(result["layers_shown"] if e["ranks"] else []):
                rows.append(
                    {
                        "prompt": p["id"],
                        "language": p["language"],
                        "expected": e["string"],
                        "layer": layer,
                        "rank": e["ranks"][i],
                        "best_token": e["best_tokens"][i],
                        "prob": e["probs"][i],
                        "mass": e["masses"][i],
                        "in_top_k": e["ranks"][i] <= k,
                    }
                )
    return rows
