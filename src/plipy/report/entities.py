"""Entity-labelling reports: the known / unknown table of `plipy entities label`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from plipy.report.base import Note
from plipy.results.entity_labels import EntityLabelsResult
from plipy.results.views import VIEWS


@VIEWS.summary(EntityLabelsResult)
def summary(result: Mapping[str, Any]) -> list[Any]:
    """The console report of `plipy entities label`: the labels table, then where the answers came from."""
    cache = result.get("cache", {})
    if cache.get("hit"):
        where = f"from the labels cache ({cache.get('path')})"
    else:
        where = f"{cache.get('generated_queries', 0)} queries generated"
    return [*labels_summary(result), f"\n{where}"]


def labels_summary(doc: Mapping[str, Any]) -> list[Any]:
    """The console report of `plipy entities label`: known / unknown / dropped per type and the test split."""
    cfg = doc["config"]
    t = Table(
        title=f"Known / unknown entities (K={cfg['k']}, attribute known at ≥{cfg['known_threshold']} correct)",
        header_style="bold",
    )
    for col in ("type", "entities", "known", "unknown", "dropped", "test known", "test unknown", "balanced/label"):
        t.add_column(col, justify="right")
    for name, s in doc["summary"].items():
        t.add_row(
            name,
            str(s["n"]),
            str(s["known"]),
            str(s["unknown"]),
            str(s["dropped"]),
            str(s["test"]["known"]),
            str(s["test"]["unknown"]),
            str(s["test_balanced_per_label"]),
        )
    out: list[Any] = [t]
    for note in doc.get("notes", [])[1:]:
        if "too small" in note:
            out.append(Note(note))
    return out


def build_summary(lists: dict[str, list], paths: list[Any], upstream: dict[str, int]) -> list[Any]:
    """The console report of `plipy entities build`: entities per type beside upstream's counts."""
    t = Table(title="Entity lists", header_style="bold")
    for col in ("type", "entities", "upstream", "file"):
        t.add_column(col, justify="right")
    for (name, ents), p in zip(lists.items(), paths, strict=True):
        differs = "" if len(ents) == upstream[name] else " (differs)"
        t.add_row(name, f"{len(ents):,}", f"{upstream[name]:,}{differs}", str(p))
    return [t]
