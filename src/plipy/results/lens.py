"""The logit lens' result: per position and layer, the top-k tokens and the tracked tokens' ranks."""

from __future__ import annotations

from typing import Any

from plipy.results.base import Result


class LensResult(Result):
    """`plipy.lens`: per position and layer, the top-k tokens of the logit lens and the tracked tokens' ranks."""

    kind, path_pattern = "lens", "lens-{model}.json"

    def rows(self) -> list[dict[str, Any]]:
        return lens_rows(self._data)

    def _describe(self) -> str:
        return f"positions={[p['position'] for p in self._data['positions']]} top_k={self._data['top_k']}"


def lens_rows(result: dict) -> list[dict[str, Any]]:
    """One row per (position, layer, token): every top-k token and every tracked token (a tracked token in the
    top-k is one row)."""
    rows = []
    for pos in result["positions"]:
        tracked = {t["id"]: t for t in pos["tracked"]}
        for li, lay in enumerate(pos["layers"]):
            seen = set()
            for r, t in enumerate(lay["top"], 1):
                tr = tracked.get(t["id"])
                rows.append(
                    {
                        "position": pos["position"],
                        "position_token": pos["token"],
                        "layer": lay["layer"],
                        "token_id": t["id"],
                        "token": t["token"],
                        "prob": t["prob"],
                        "rank": r,
                        "in_top_k": True,
                        "tracked": ",".join(tr["source"]) if tr else None,
                    }
                )
                seen.add(t["id"])
            for tid, tr in tracked.items():
                if tid not in seen:
                    rows.append(
                        {
                            "position": pos["position"],
                            "position_token": pos["token"],
                            "layer": lay["layer"],
                            "token_id": tid,
                            "token": tr["token"],
                            "prob": tr["probs"][li],
                            "rank": tr["ranks"][li],
                            "in_top_k": tr["ranks"][li] <= result["top_k"],
                            "tracked": ",".join(tr["source"]),
                        }
                    )
    return rows
