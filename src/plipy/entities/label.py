"""Known / unknown entity labels by the model itself, the 50/10/40 split and balanced test lists (sae_entities rules).

An attribute query is known when ≥ threshold of its K samples at T=1 are correct (upstream: 3 of 10; here
ceil(0.3·K), at least 1). An entity is known with ≥ 2 known attributes, unknown with none, dropped otherwise.
Per type, known and unknown entities are each split like upstream's two sklearn `train_test_split` calls with
random_state 42 (reimplemented exactly, no sklearn): test_size 0.5 → (train, rest), then rest with test_size 0.8 →
(validation, test). The balanced test list truncates known-test and unknown-test to the shorter length.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from plipy.entities.build import ENTITY_TYPES, check_types, load_entities, shipped_dir
from plipy.entities.correctness import grade, known_threshold
from plipy.entities.queries import QUERIED_ATTRIBUTES, make_queries
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


# ---------------------------------------------------------------------------------------------- labelling


def _data_sha() -> str:
    h = hashlib.sha256()
    for t in ENTITY_TYPES:
        h.update((shipped_dir() / f"{t}.json.gz").read_bytes())
    return h.hexdigest()


def _model_key(lm: Any) -> dict[str, Any]:
    prov = getattr(lm, "provenance", {}) or {}
    return {
        "weights_sha256": prov.get("weights_sha256"),
        "spec": prov.get("spec") or getattr(lm, "spec", None),
        "dtype": prov.get("dtype") or str(getattr(lm.model, "dtype", "")),
    }


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    """$PLIPY_CACHE/entities (default ~/.cache/plipy/entities)."""
    from plipy.models import cache_dir

    return cache_dir() / "entities"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def label_entities(
    lm: Any,
    types: Sequence[str] | None = None,
    limit: int | None = None,
    k: int = 10,
    seed: int = 42,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    use_cache: bool = True,
    cluster: Any = None,
    load: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate greedy + K samples per attribute query, grade them and label the entities; returns the labels
    document and caches it (and every query's generations) under `cache_dir`, keyed by model weights + config.
    With a `cluster` (`plipy.cluster.Cluster`) the shards (`batch_size` queries) run on Ray workers."""
    from plipy.cluster import pool as cp
    from plipy.io import write_json
    from plipy.runtime import provenance

    chosen = check_types(types)
    if k < 1 or max_new_tokens < 1 or batch_size < 1:
        raise PlipyError("k, max_new_tokens and batch_size must be at least 1")
    ents = load_entities(chosen, limit)
    threshold = known_threshold(k)
    gen_cfg = {
        "k": k,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0,
        "top_k": None,
        "top_p": None,
        "sampling": "per-row seeded inverse-CDF (plipy.entities.generate)",
    }
    config = {
        "types": list(chosen),
        "limit": limit,
        **gen_cfg,
        "batch_size": batch_size,
        "known_threshold": threshold,
        "min_known_attributes": MIN_KNOWN_ATTRIBUTES,
        "split_seed": 42,
        "data_sha256": _data_sha(),
        "format": FORMAT,
    }
    mkey = _model_key(lm)
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    doc_path = cdir / f"labels-{_key([mkey, config])}.json"
    gen_path = cdir / f"generations-{_key([mkey, gen_cfg])}.json"
    if use_cache:
        cached = _read_json(doc_path)
        if isinstance(cached, dict) and cached.get("config") == config:
            cached.setdefault("cache", {})["hit"] = True
            return cached
    store = (_read_json(gen_path) or {}) if use_cache else {}
    gens: dict[str, Any] = store.get("generations", {}) if store.get("model") == mkey else {}
    t0 = time.time()
    shards = _shards(chosen, ents, gens, batch_size)
    n_generated = sum(map(len, shards))
    step = progress("generate", n_generated) if progress and shards else (lambda: None)
    gen_args = (k, seed, max_new_tokens, batch_size)
    with cp.executor(
        cluster,
        lm,
        load,
        f"{__name__}:shard_units",
        (shards, *gen_args),
        lambda: _shard_compute(lm, shards, *gen_args, step),
    ) as ex:
        done = (
            ex.map([[i] for i in range(len(shards))])
            if ex.pool is not None
            else ((i, ex.compute([i])) for i in range(len(shards)))
        )
        for i, out in done:
            gens.update(zip(shards[i], out[0][0], strict=True))
            if ex.pool is not None:
                for _ in shards[i]:
                    step()
            if use_cache:  # a killed run keeps every finished shard
                write_json(gen_path, {"model": mkey, "config": gen_cfg, "generations": gens})
        where = ex.describe()
    records: list[dict[str, Any]] = []
    for t in chosen:
        for e in ents[t]:
            attrs = {}
            for q in make_queries(e):
                g = gens[q.prompt]
                labels = [grade(q.prompt_type, s, q.answer) for s in g["samples"]]
                n_ok = labels.count("correct")
                attrs[q.attribute] = {
                    "value": q.answer,
                    "greedy": g["greedy"],
                    "greedy_label": grade(q.prompt_type, g["greedy"], q.answer),
                    "correct_samples": n_ok,
                    "known": n_ok >= threshold,
                    "samples": g["samples"],
                    "sample_labels": labels,
                }
            records.append(
                {
                    "entity": e["entity"],
                    "entity_type": t,
                    "label": None,
                    "split": None,
                    "known_attributes": [a for a, v in attrs.items() if v["known"]],
                    "attributes": attrs,
                }
            )
    summary, balanced = assign_labels(records, seed=42)
    doc = {
        "format": FORMAT,
        "provenance": cp.stamp(provenance.build(model=lm, config=config, seed=seed), where),
        "config": config,
        "summary": summary,
        "notes": _notes(summary, k, threshold),
        "entities": records,
        "test_balanced": balanced,
        "cache": {
            "hit": False,
            "path": str(doc_path),
            "generated_queries": n_generated,
            "generation_seconds": round(time.time() - t0, 1),
        },
    }
    if use_cache:
        write_json(doc_path, doc)
    return doc


def _shards(chosen: Sequence[str], ents: dict[str, list], gens: dict[str, Any], batch_size: int) -> list[list[str]]:
    """The queries still to generate, type by type, in `batch_size` shards: the batches a single run makes."""
    seen = set(gens)
    shards = []
    for t in chosen:
        todo = [q.prompt for e in ents[t] for q in make_queries(e)]
        todo = [p for p in dict.fromkeys(todo) if p not in seen]
        seen.update(todo)
        shards += [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    return shards


def _shard_compute(
    lm: Any,
    shards: list[list[str]],
    k: int,
    seed: int,
    max_new_tokens: int,
    batch_size: int,
    step: Callable[[], None] | None = None,
) -> Callable[[list[int]], list]:
    from plipy.entities.generate import generate

    cb = (lambda n: [step() for _ in range(n)]) if step else None
    return lambda b: [
        (
            generate(
                lm, shards[b[0]], k=k, seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=cb
            ),
            None,
        )
    ]


def shard_units(
    lm: Any, shards: list[list[str]], k: int, seed: int, max_new_tokens: int, batch_size: int
) -> Callable[[list[int]], list]:
    """A Ray worker's `compute([shard])` (`plipy.cluster`): the local path's own generation on its model."""
    return _shard_compute(lm, shards, k, seed, max_new_tokens, batch_size)


def _notes(summary: dict[str, Any], k: int, threshold: int) -> list[str]:
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
    if not isinstance(doc, dict):
        raise PlipyError(f"{where}: not a JSON object")
    missing = [key for key in ("provenance", "config", "summary", "entities", "test_balanced") if key not in doc]
    if missing:
        raise PlipyError(f"{where}: not a plipy entity labels file (missing {', '.join(missing)})")
    names: dict[str, dict[str, dict]] = {}
    for i, e in enumerate(doc["entities"]):
        for key in ("entity", "entity_type", "label", "split", "known_attributes", "attributes"):
            if key not in e:
                raise PlipyError(f"{where}: entity {i} lacks {key!r}")
        if e["label"] not in LABELS:
            raise PlipyError(f"{where}: entity {e['entity']!r} has label {e['label']!r}")
        if (e["split"] is None) != (e["label"] == "dropped") or (e["split"] is not None and e["split"] not in SPLITS):
            raise PlipyError(f"{where}: entity {e['entity']!r} ({e['label']}) has split {e['split']!r}")
        names.setdefault(e["entity_type"], {})[e["entity"]] = e
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
