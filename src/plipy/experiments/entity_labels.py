"""Known / unknown entity labels earned by the model itself: it answers every attribute query of the chosen
entities (greedy + K samples at T=1), the answers are graded with upstream's rules and the entities labelled and
split (`plipy.entities.label`).

A unit is one query's answers; the queries run type by type in batches of `batch_size` (default 32), each batch one
`generate` call. Two caches sit around the run (`LabelCache`, under `cache_dir`): a finished labels document is
returned as it is by the same call later, and every query's answers are kept for any later run on the same model
and generation settings (another limit, other types, another batch size), which then asks only the new queries.
An interrupted run resumes from the runtime's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plipy.entities.build import ENTITY_TYPES, load_entities, shipped_dir
from plipy.entities.correctness import grade, known_threshold
from plipy.entities.label import FORMAT, MIN_KNOWN_ATTRIBUTES, assign_labels, label_notes
from plipy.entities.queries import make_queries
from plipy.models import LoadedModel
from plipy.results.entity_labels import EntityLabelsResult
from plipy.runtime.driver import RunOptions, batch_size_for, execute
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, chunks

SAMPLING = "per-row seeded inverse-CDF (plipy.entities.generate)"


def data_sha256() -> str:
    """The hash of the shipped entity lists (a rebuilt list is another run)."""
    h = hashlib.sha256()
    for t in ENTITY_TYPES:
        h.update((shipped_dir() / f"{t}.json.gz").read_bytes())
    return h.hexdigest()


@dataclass
class LabelPlan:
    """The chosen entities and the queries still to ask (`todo`, type by type: `spans[t]` = its slice of `todo`)."""

    entities: dict[str, list[dict[str, Any]]]
    todo: list[str]
    spans: list[tuple[int, int]]


@dataclass
class EntityLabels(Experiment[LabelPlan, EntityLabelsResult]):
    """Ask, grade, label. `answers` holds queries answered earlier (the answer cache): they are not asked again;
    `cache_path` is where the labels document is cached (recorded in its `cache` block)."""

    kind = "entity-labels"
    label = "generate"
    default_batch_size = 32

    types: tuple[str, ...]
    limit: int | None = None
    k: int = 10
    seed: int = 42
    max_new_tokens: int = 32
    answers: dict[str, Any] = field(default_factory=dict)
    cache_path: str | None = None

    def generation_config(self) -> dict[str, Any]:
        """What shapes one query's answers (the answer cache's key)."""
        return {
            "k": self.k,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "temperature": 1.0,
            "top_k": None,
            "top_p": None,
            "sampling": SAMPLING,
        }

    def config(self, batch_size: int) -> dict[str, Any]:
        """The document's `config` (the labels cache's key with the model)."""
        return {
            "types": list(self.types),
            "limit": self.limit,
            **self.generation_config(),
            "batch_size": batch_size,
            "known_threshold": known_threshold(self.k),
            "min_known_attributes": MIN_KNOWN_ATTRIBUTES,
            "split_seed": 42,
            "data_sha256": data_sha256(),
            "format": FORMAT,
        }

    def queries(self, entities: dict[str, list[dict[str, Any]]] | None = None) -> list[list[str]]:
        """Per chosen type, its entities' query prompts in order (each once)."""
        ents = load_entities(self.types, self.limit) if entities is None else entities
        return [list(dict.fromkeys(q.prompt for e in ents[t] for q in make_queries(e))) for t in self.types]

    def plan(self, lm: LoadedModel) -> LabelPlan:
        ents = load_entities(self.types, self.limit)
        seen = set(self.answers)
        todo: list[str] = []
        spans = []
        for prompts in self.queries(ents):
            new = [p for p in prompts if p not in seen]
            seen.update(new)
            spans.append((len(todo), len(todo) + len(new)))
            todo += new
        return LabelPlan(ents, todo, spans)

    def settings(self, lm: LoadedModel, plan: LabelPlan, batch_size: int) -> Settings:
        queries = hashlib.sha256(json.dumps(plan.todo).encode()).hexdigest()
        return Settings(self.config(batch_size), seed=self.seed, key={"queries": queries})

    def work(self, plan: LabelPlan, batch_size: int) -> Work:
        # batches never mix types: the shards a run made before its answers were cached
        return Work([b for a, z in plan.spans for b in chunks(list(range(a, z)), batch_size)])

    def compute(self, lm: LoadedModel, plan: LabelPlan, batch: list[int]) -> list[Unit]:
        from plipy.entities.generate import generate

        prompts = [plan.todo[i] for i in batch]
        out = generate(
            lm, prompts, k=self.k, seed=self.seed, max_new_tokens=self.max_new_tokens, batch_size=len(prompts)
        )
        return [(g, {}) for g in out]

    def assemble(
        self, lm: LoadedModel, plan: LabelPlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> EntityLabelsResult:
        new = {plan.todo[i]: value for i, (value, _) in units.items()}
        gens = {**self.answers, **new}
        threshold = known_threshold(self.k)
        records = [entity_record(e, t, gens, threshold) for t in self.types for e in plan.entities[t]]
        summary, balanced = assign_labels(records, seed=42)
        doc = {
            "format": FORMAT,
            "provenance": provenance,
            "config": dict(provenance["config"]),
            "summary": summary,
            "notes": label_notes(summary, self.k, threshold),
            "entities": records,
            "test_balanced": balanced,
            "cache": {
                "hit": False,
                "path": self.cache_path,
                "generated_queries": len(plan.todo),
                "generation_seconds": round(provenance["timing"]["seconds"], 1),
            },
        }
        return EntityLabelsResult(doc, extras={"answers": new})


def entity_record(e: dict[str, Any], etype: str, gens: dict[str, Any], threshold: int) -> dict[str, Any]:
    """One entity's graded answers, attribute by attribute (label and split are set by `assign_labels`)."""
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
    return {
        "entity": e["entity"],
        "entity_type": etype,
        "label": None,
        "split": None,
        "known_attributes": [a for a, v in attrs.items() if v["known"]],
        "attributes": attrs,
    }


# ---------------------------------------------------------------------------------------------- the caches


def default_cache_dir() -> Path:
    """$PLIPY_CACHE/entities (default ~/.cache/plipy/entities)."""
    from plipy.models import cache_dir

    return cache_dir() / "entities"


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class LabelCache:
    """The two caches of one model under `folder`: finished labels documents (keyed by model + config) and every
    query's answers (keyed by model + generation settings)."""

    folder: Path
    model: dict[str, Any]
    config: dict[str, Any]
    generation: dict[str, Any]

    @classmethod
    def of(cls, folder: str | Path | None, lm: LoadedModel, experiment: EntityLabels, batch_size: int) -> LabelCache:
        """The caches of `experiment` on `lm` (folder None: `default_cache_dir()`)."""
        prov = getattr(lm, "provenance", {}) or {}
        model = {
            "weights_sha256": prov.get("weights_sha256"),
            "spec": prov.get("spec") or getattr(lm, "spec", None),
            "dtype": prov.get("dtype") or str(getattr(lm.model, "dtype", "")),
        }
        where = Path(folder) if folder is not None else default_cache_dir()
        return cls(where, model, experiment.config(batch_size), experiment.generation_config())

    @property
    def labels_path(self) -> Path:
        return self.folder / f"labels-{_key([self.model, self.config])}.json"

    @property
    def answers_path(self) -> Path:
        return self.folder / f"generations-{_key([self.model, self.generation])}.json"

    def labels(self) -> dict[str, Any] | None:
        """The cached labels document of this very run (its `cache.hit` set), else None."""
        cached = _read_json(self.labels_path)
        if isinstance(cached, dict) and cached.get("config") == self.config:
            cached.setdefault("cache", {})["hit"] = True
            return cached
        return None

    def answers(self) -> dict[str, Any]:
        """Every cached query's answers on this model (empty when none, or another model's)."""
        store = _read_json(self.answers_path) or {}
        return store.get("generations", {}) if store.get("model") == self.model else {}

    def store(self, result: EntityLabelsResult) -> None:
        """Keep the run's new answers beside the earlier ones, then its labels document."""
        from plipy.io import write_json

        gens = self.answers()
        gens.update(result.extras.get("answers", {}))
        write_json(self.answers_path, {"model": self.model, "config": self.generation, "generations": gens})
        write_json(self.labels_path, result.to_dict())


def label_entities(
    lm: LoadedModel,
    experiment: EntityLabels,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    options: RunOptions | None = None,
) -> EntityLabelsResult:
    """Run `experiment` through its caches: a cached document of the same run comes back at once; otherwise only
    the queries without cached answers are asked, and the caches keep the result (`use_cache=False`: neither read
    nor written)."""
    opts = options or RunOptions()
    cache = LabelCache.of(cache_dir, lm, experiment, batch_size_for(experiment, lm, opts.batch_size))
    experiment.cache_path = str(cache.labels_path)
    if use_cache and (hit := cache.labels()) is not None:
        return EntityLabelsResult(hit)
    if use_cache:
        known = cache.answers()
        experiment.answers = {p: known[p] for ps in experiment.queries() for p in ps if p in known}
    result = execute(experiment, lm, opts)
    if use_cache:
        cache.store(result)
    return result
