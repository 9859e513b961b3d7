"""The patching result: which heads (and attention blocks, MLPs) carry an effect, per site, sample and condition.

One kind for the three methods (`method`): activation patching and ablations (`plipy.patch.heads`), its gradient
approximation checked against exact patching (`method="attribution"`), and path patching (`plipy.patch.paths`). A
condition is one (position class, direction or ablation[, receiver input]) with its values per site; `sites` names
the sites (heads, attention blocks, MLPs; path patching: the sender heads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from plipy.results.base import Result


class PatchResult(Result):
    """`plipy.patch.heads` / `plipy.patch.paths`: the normalised metric per site (0 = no effect, 1 = the whole
    clean − corrupt difference) per sample and averaged with bootstrap CIs, beside the identity null."""

    kind, path_pattern = "patch", "patch-{model}-{method}.json"

    def rows(self) -> list[dict[str, Any]]:
        return sample_rows(self._data)

    def _describe(self) -> str:
        return f"method={self._data.get('method')} samples={len(self._data.get('samples') or [])}"

    def site_labels(self) -> list[str]:
        """The label of every site (`L5.H2`, `L5.attn`, `L5.mlp`), in the document's order."""
        return [s["label"] for s in self._data["sites"]]

    def condition_label(self, i: int) -> str:
        """A condition's name: `denoising @ all`, `mean ablation @ marker`, `noising q @ last`, `attribution …`."""
        return condition_label(self._data["conditions"][i])

    def grid(self, i: int, what: str = "mean") -> tuple[list[list[float | None]], list[str], list[int]]:
        """Condition i's `what` ("mean", or "lo"/"hi" of the CI) as a layer × column matrix: columns are the heads,
        then `attn` and `mlp` when the result has those sites; returns (rows, column labels, layers)."""
        return site_grid(self._data, i, what)


def condition_label(c: dict[str, Any]) -> str:
    """`denoising @ all`, `zero ablation @ marker`, `noising q @ last`; an attribution estimate says so."""
    what = f"{c['ablation']} ablation" if c.get("ablation") else str(c["direction"])
    if c.get("input"):
        what += f" {c['input']}"
    if c.get("estimate") == "attribution":
        what = f"attribution, {what}"
    return f"{what} @ {c['position']}"


def condition_sites(data: Mapping[str, Any], c: Mapping[str, Any]) -> list[int]:
    """The indices (into `sites`) of the sites a condition has values for (every site unless it names some)."""
    idx = c.get("site_index")
    return list(range(len(data["sites"]))) if idx is None else list(idx)


def site_grid(
    data: dict[str, Any], i: int, what: str = "mean"
) -> tuple[list[list[float | None]], list[str], list[int]]:
    """A condition's per-site values as a layer × (heads, attn, mlp) matrix (None where it has no value)."""
    c = data["conditions"][i]
    sites = data["sites"]
    kinds = [k for k in ("head", "attn", "mlp") if any(s["kind"] == k for s in sites)]
    n_heads = max((s["head"] for s in sites if s["kind"] == "head"), default=-1) + 1
    columns = [f"H{h}" for h in range(n_heads)] if "head" in kinds else []
    columns += [k for k in ("attn", "mlp") if k in kinds]
    layers = sorted({s["layer"] for s in sites})
    row_of = {layer: r for r, layer in enumerate(layers)}
    grid: list[list[float | None]] = [[None] * len(columns) for _ in layers]
    for j, site_i in enumerate(condition_sites(data, c)):
        s = sites[site_i]
        col = s["head"] if s["kind"] == "head" else columns.index(s["kind"])
        if what == "mean":
            v = c["mean"][j]
        else:
            ci = c["ci"][j]
            v = None if ci is None else ci[0 if what == "lo" else 1]
        grid[row_of[s["layer"]]][col] = v
    return grid, columns, layers


def sample_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (condition, sample, site): the raw metric and its normalised value."""
    rows = []
    sites = data["sites"]
    for ci, c in enumerate(data["conditions"]):
        idx = condition_sites(data, c)
        per = c["samples"]
        group = {s["id"]: s["group"] for s in data["samples"]}
        for sid, metric, norm in zip(per["ids"], per["metric"], per["normalised"], strict=True):
            for j, site_i in enumerate(idx):
                s = sites[site_i]
                rows.append(
                    {
                        "condition": ci,
                        "position": c["position"],
                        "direction": c["direction"],
                        "ablation": c.get("ablation"),
                        "input": c.get("input"),
                        "estimate": c.get("estimate", "exact"),
                        "id": sid,
                        "group": group.get(sid),
                        "site": s["label"],
                        "kind": s["kind"],
                        "layer": s["layer"],
                        "head": s["head"],
                        "metric": metric[j],
                        "normalised": norm[j],
                    }
                )
    return rows
