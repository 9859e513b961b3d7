"""One experiment over several models: a result per model and the comparison table PLIP-rs' documents were written
from (per model: the layer of the largest effect, the group means there, their ratio beside the null ratio).

This module compares finished results; the facade (`plipy.api.sweep`, `plipy sweep`) runs the models one after
another, each on its own Ray actor pool when `--ray` is given (a pool holds one model)."""

from __future__ import annotations

from typing import Any

from plipy.errors import PlipyError
from plipy.results import SweepResult
from plipy.runtime import provenance

EXPERIMENTS = ("scan", "knockout")


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def n_layers(doc: dict[str, Any]) -> int | None:
    """The model's decoder layer count, from the config in the result's provenance."""
    cfg = doc["provenance"].get("model", {}).get("config") or {}
    return cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")


def _depth(layer: int, n: int | None) -> float | None:
    return None if not n else layer / max(1, n - 1)


def scan_row(d: dict[str, Any]) -> dict[str, Any]:
    """A scan's comparison row: the layer of the largest |Hedges' g| between the compared groups (the attention
    difference), the group means there, their ratio, and the null ratio (uniform attention over each marker's
    prefix: what the ratio is when the marker attends to nothing in particular)."""
    ga, gb = d["groups_compared"]
    rows = [r for r in d["layers"] if r.get("hedges_g") is not None]
    best = max(rows, key=lambda r: abs(r["hedges_g"])) if rows else d["layers"][0]
    ma, mb = best["groups"][ga]["mean"], best["groups"][gb]["mean"]
    return {
        "effect": "attention",
        "max_effect_layer": best["layer"],
        "depth": _depth(best["layer"], n_layers(d)),
        "mean_a": ma,
        "mean_b": mb,
        "ratio": _ratio(ma, mb),
        "null_ratio": d.get("null_ratio"),
        "hedges_g": best.get("hedges_g"),
        "p_holm": best.get("p_holm"),
        "best_holm_layer": d["best"]["holm"]["layer"],
    }


def knockout_row(d: dict[str, Any]) -> dict[str, Any]:
    """A knockout's comparison row: the condition of the largest mean KL over the compared groups, the group means
    there, their ratio, and the null ratio: the same ratio on the `_baseline` groups (the marker without its
    construct) when the run included them, else None."""
    ga, gb = d["groups_compared"]

    def mean(run: dict[str, Any], g: str) -> float | None:
        return (run["groups"].get(g) or {}).get("mean")

    runs = [r for r in d["runs"] if mean(r, ga) is not None and mean(r, gb) is not None]
    if not runs:
        raise PlipyError("knockout result: no condition has KLs for both compared groups")

    def total(run: dict[str, Any]) -> float:
        a, b = mean(run, ga), mean(run, gb)
        assert a is not None and b is not None  # `runs` holds the runs with both
        return a + b

    best = max(runs, key=total)
    ma, mb = mean(best, ga), mean(best, gb)
    null = _ratio(mean(best, f"{ga}_baseline"), mean(best, f"{gb}_baseline"))
    layers = best["layers"]
    return {
        "effect": "KL (nats)",
        "max_effect_layer": best["label"],
        "depth": _depth(layers[0], n_layers(doc=d)) if len(layers) == 1 else None,
        "mean_a": ma,
        "mean_b": mb,
        "ratio": _ratio(ma, mb),
        "null_ratio": null,
        "hedges_g": best.get("hedges_g"),
        "p_holm": best.get("p_holm"),
        "best_holm_layer": None,
    }


def comparison_row(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    """The comparison row of one model's result document."""
    model = doc["provenance"]["model"]
    row = scan_row(doc) if kind == "scan" else knockout_row(doc)
    return {
        "model": model.get("spec") or model.get("name"),
        "n_layers": n_layers(doc),
        "compared": "/".join(doc["groups_compared"]),
        **row,
    }


def file_names(specs: list[str]) -> list[str]:
    """A file-safe name per model spec, unique within the sweep (`a/b/model` → `model`, a repeat gets `-2`)."""
    import re

    out: list[str] = []
    for spec in specs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")) or "model"
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


def build(kind: str, models: list[dict[str, Any]], docs: list[dict[str, Any]], config: dict[str, Any]) -> SweepResult:
    """The SweepResult of per-model result documents (`models`: spec and file of each)."""
    return SweepResult(
        {
            "provenance": provenance.build(
                config={"experiment": kind, "models": [m["spec"] for m in models], **config}
            ),
            "experiment": kind,
            "models": models,
            "comparison": [comparison_row(d, kind) for d in docs],
        }
    )
