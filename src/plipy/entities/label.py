"""Known / unknown entity labels by the model itself, the 50/10/40 split and balanced test lists (sae_entities rules).

An attribute query is known when ≥ threshold of its K samples at T=1 are correct (upstream: 3 of 10; here
ceil(0.3·K), at least 1). An entity is known with ≥ 2 known attributes, unknown with none, dropped otherwise.
Per type, known and unknown entities are each split like upstream's two sklearn `train_test_split` calls with
random_state 42 (reimplemented exactly, no sklearn): test_size 0.5 → (train, rest), then rest with test_size 0.8 →
(validation, test). The balanced test list truncates known-test and unknown-test to the shorter length.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from plipy.entities.queries import QUERIED_ATTRIBUTES
from plipy.errors import PlipyError

FORMAT = "plipy-entity-labels/1"
MIN_KNOWN_ATTRIBUTES = 2  # upstream: sum of known attributes > 1
LABELS = ("known", "unknown", "dropped")
SPLITS = ("train", "validation", "test")
# Profiles: `quick` for tests; `pipeline` sized so labelling takes ≤ ~20 min on 2 idle CPU cores with SmolLM2-135M
# (docs/entities.md has the measurement); `full` labels every shipped entity (days on a CPU).
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"limit": 2, "k": 2, "max_new_tokens": 8},
    "pipeline": {"limit": 36, "k": 10, "max_new_tokens": 32},
    "full": {"limit": None, "k": 10, "max_new_tokens": 32},
}

# ---------------------------------------------------------------------------------------------- split


def split_indices(n: int, test_size: float, seed: int = 42) -> tuple[list[int], list[int]]:
    """sklearn `train_test_split(range(n), test_size=test_size, random_state=seed)` as (train, test) indices.

    Same arithmetic as sklearn's ShuffleSplit: n_test = ceil(test_size·n), permutation from
    RandomState(seed); test = perm[:n_test], train = perm[n_test:]. Unlike sklearn an empty side is allowed
    (sklearn raises), so tiny label groups from quick runs still split."""
    if n <= 0:
        return [], []
    n_test = math.ceil(test_size * n)
    perm = np.random.RandomState(seed).permutation(n).tolist()
    return perm[n_test:], perm[:n_test]


def three_way_split(items: Sequence[Any], seed: int = 42) -> dict[str, list[Any]]:
    """Upstream's 50/10/40 split of one label group: (train, rest) at test 0.5, then (validation, test) at 0.8."""
    tr, rest = split_indices(len(items), 0.5, seed)
    rest_items = [items[i] for i in rest]
    va, te = split_indices(len(rest_items), 0.8, seed)
    return {
        "train": [items[i] for i in tr],
        "validation": [rest_items[i] for i in va],
        "test": [rest_items[i] for i in te],
    }


def balanced_test(known_test: Sequence[str], unknown_test: Sequence[str]) -> tuple[list[str], list[str]]:
    """Both test lists truncated to the shorter one's length (upstream get_valid_entities)."""
    n = min(len(known_test), len(unknown_test))
    return list(known_test[:n]), list(unknown_test[:n])


def entity_label(n_known_attributes: int) -> str:
    """known (≥ 2 known attributes), unknown (none) or dropped (exactly one)."""
    if n_known_attributes >= MIN_KNOWN_ATTRIBUTES:
        return "known"
    return "unknown" if n_known_attributes == 0 else "dropped"


def assign_labels(records: list[dict[str, Any]], seed: int = 42) -> tuple[dict, dict]:
    """Set label and split on entity records (in place); returns (summary, test_balanced) per type."""
    summary: dict[str, dict[str, Any]] = {}
    balanced: dict[str, list[str]] = {}
    types = list(dict.fromkeys(r["entity_type"] for r in records))
    for t in types:
        rows = [r for r in records if r["entity_type"] == t]
        groups: dict[str, list[dict]] = {lab: [] for lab in LABELS}
        for r in rows:
            r["label"] = entity_label(len(r["known_attributes"]))
            r["split"] = None
            groups[r["label"]].append(r)
        tests = {}
        for lab in ("known", "unknown"):
            parts = three_way_split(groups[lab], seed)
            for split, members in parts.items():
                for r in members:
                    r["split"] = split
            tests[lab] = [r["entity"] for r in parts["test"]]
        bk, bu = balanced_test(tests["known"], tests["unknown"])
        balanced[t] = bk + bu
        summary[t] = {
            "n": len(rows),
            **{lab: len(groups[lab]) for lab in LABELS},
            "test": {lab: len(tests[lab]) for lab in ("known", "unknown")},
            "test_balanced_per_label": len(bk),
            "attributes_known": {a: sum(a in r["known_attributes"] for r in rows) for a in QUERIED_ATTRIBUTES[t]},
        }
    return summary, balanced


# ---------------------------------------------------------------------------------------------- notes


def label_notes(summary: dict[str, Any], k: int, threshold: int) -> list[str]:
    """Plain statements for the reader: how many entities the model knows, and groups too small to test."""
    notes = [
        f"attribute known = at least {threshold} of {k} samples correct; entity known = at least "
        f"{MIN_KNOWN_ATTRIBUTES} known attributes, unknown = none, otherwise dropped"
    ]
    for t, s in summary.items():
        notes.append(
            f"{t}: the model knows {s['known']} of {s['n']} entities ({s['unknown']} unknown, "
            f"{s['dropped']} dropped); balanced test set: {s['test_balanced_per_label']} per label"
        )
        if s["test_balanced_per_label"] < 2:
            notes.append(
                f"{t}: balanced test group too small ({s['test_balanced_per_label']} per label) for a "
                "known-vs-unknown test; report counts, not p-values"
            )
    return notes


# ---------------------------------------------------------------------------------------------- reading


def read_labels(path: str | os.PathLike) -> dict[str, Any]:
    """Load a labels JSON (from `plipy entities label --out`) and check its structure."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlipyError(f"cannot read labels {p}: {e}") from e
    validate_labels(doc, str(p))
    return doc


def validate_labels(doc: Any, where: str = "labels") -> None:
    """Raise PlipyError unless `doc` has the labels document's keys and consistent labels, splits and counts."""
    if not isinstance(doc, Mapping):  # a document, or the `EntityLabelsResult` holding one
        raise PlipyError(f"{where}: not a JSON object")
    missing = [key for key in ("provenance", "config", "summary", "entities", "test_balanced") if key not in doc]
    if missing:
        raise PlipyError(f"{where}: not a plipy entity labels file (missing {', '.join(missing)})")
    names = _entities_by_type(doc["entities"], where)
    for t, s in doc["summary"].items():
        rows = names.get(t, {}).values()
        for lab in LABELS:
            if s.get(lab) != sum(r["label"] == lab for r in rows):
                raise PlipyError(f"{where}: summary count {t}/{lab} does not match the entities")
    for t, lst in doc["test_balanced"].items():
        for n in lst:
            e = names.get(t, {}).get(n)
            if e is None or e["split"] != "test" or e["label"] == "dropped":
                raise PlipyError(f"{where}: test_balanced {t} entry {n!r} is not a known/unknown test entity")


def _entities_by_type(entities: Any, where: str) -> dict[str, dict[str, dict]]:
    """The labels document's entities by type and name, each checked for its keys, its label and its split."""
    names: dict[str, dict[str, dict]] = {}
    for i, e in enumerate(entities):
        for key in ("entity", "entity_type", "label", "split", "known_attributes", "attributes"):
            if key not in e:
                raise PlipyError(f"{where}: entity {i} lacks {key!r}")
        if e["label"] not in LABELS:
            raise PlipyError(f"{where}: entity {e['entity']!r} has label {e['label']!r}")
        if (e["split"] is None) != (e["label"] == "dropped") or (e["split"] is not None and e["split"] not in SPLITS):
            raise PlipyError(f"{where}: entity {e['entity']!r} ({e['label']}) has split {e['split']!r}")
        names.setdefault(e["entity_type"], {})[e["entity"]] = e
    return names
