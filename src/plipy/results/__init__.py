"""Typed results: one module per kind, each owning its JSON document, its table rows and its file codecs.

    r = plipy.scan("smollm2-135m", layers="0-2")
    r.to_pandas()          # the long per-sample table (what the .parquet file holds)
    r.summary()            # the console report as text
    r.plot("layers")       # a matplotlib figure
    r.save("results/scan.json", plots=True)      # JSON + table (+ PNGs, + HTML), each written atomically
    r.to_html("results/scan.html")               # one self-contained interactive report (docs/report.md)
    plipy.load_result("results/scan.json") == r  # True

`r.to_dict()` is exactly the JSON the CLI writes (schemas: docs/results.md); `r["samples"]` reads it. Views
(console, plots, HTML) are registered against each kind by `plipy.report` (`plipy.results.views`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plipy.errors import PlipyError
from plipy.results.base import TABLE_FORMATS, Result
from plipy.results.calibrate import CalibrateResult
from plipy.results.dose import DoseResult
from plipy.results.emergence import EmergenceResult
from plipy.results.entity_labels import EntityLabelsResult
from plipy.results.generate import GenerateResult
from plipy.results.knockout import KnockoutResult
from plipy.results.lens import LensResult
from plipy.results.patching import PatchResult
from plipy.results.probe import ProbeResult
from plipy.results.qk import QkResult
from plipy.results.sae_attention import SaeAttentionResult
from plipy.results.scan import ROWS_SUFFIX, ScanResult
from plipy.results.sweep import SweepResult

KINDS: dict[str, type[Result]] = {
    c.kind: c
    for c in (
        ScanResult,
        KnockoutResult,
        CalibrateResult,
        DoseResult,
        GenerateResult,
        SaeAttentionResult,
        LensResult,
        EmergenceResult,
        ProbeResult,
        SweepResult,
        EntityLabelsResult,
        QkResult,
        PatchResult,
    )
}
# Files written before provenance named their kind are recognised by their shape.
_SHAPES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("scan", lambda d: "layers_scanned" in d),
    ("knockout", lambda d: "runs" in d and "mode" in d),
    ("calibrate", lambda d: "dose_table" in d),
    ("dose", lambda d: "doses" in d and "monotonicity" in d),
    ("generate", lambda d: "summary" in d and "fisher_exact_p" in (d.get("summary") or {})),
    ("sae-attention", lambda d: "measures" in d and "latent" in d),
    ("lens", lambda d: "positions" in d and "top_k" in d),
    ("emergence", lambda d: "prompts" in d and "top_k" in d),
    ("probe", lambda d: "majority_baseline" in d),
    ("sweep", lambda d: "comparison" in d and "experiment" in d),
    ("entity-labels", lambda d: str(d.get("format", "")).startswith("plipy-entity-labels/")),
]


def kind_of(data: dict[str, Any]) -> str:
    """The result kind of a JSON document (its provenance says; older files are recognised by shape)."""
    kind = (data.get("provenance") or {}).get("kind")
    if kind in KINDS:
        return str(kind)
    for name, test in _SHAPES:
        if test(data):
            return name
    raise PlipyError("not a plipy result file (no known result kind)")


def load_result(path: str | Path) -> Result:
    """Read any saved result back into its class (`ScanResult`, `KnockoutResult`, …)."""
    p = Path(path)
    if not p.is_file():
        raise PlipyError(f"{p}: no such result file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlipyError(f"{p}: not a JSON result file ({e})") from None
    if not isinstance(data, dict):
        raise PlipyError(f"{p}: not a plipy result file")
    try:
        kind = kind_of(data)
    except PlipyError as e:
        raise PlipyError(f"{p}: {e}") from None
    return KINDS[kind].from_file(p, data)


__all__ = [
    "KINDS",
    "ROWS_SUFFIX",
    "TABLE_FORMATS",
    "CalibrateResult",
    "DoseResult",
    "EmergenceResult",
    "EntityLabelsResult",
    "GenerateResult",
    "KnockoutResult",
    "LensResult",
    "PatchResult",
    "ProbeResult",
    "QkResult",
    "Result",
    "SaeAttentionResult",
    "ScanResult",
    "SweepResult",
    "kind_of",
    "load_result",
]
