"""The entity labels: which entities the model knows (known / unknown / dropped), from its own answers to attribute
queries, with upstream's 50/10/40 split and balanced test lists; its long table has one row per entity and
queried attribute."""

from __future__ import annotations

from typing import Any

from plipy.results.base import Result

ROW_KEYS = ("value", "greedy", "greedy_label", "correct_samples", "known")


class EntityLabelsResult(Result):
    """`plipy.label_entities`: the labels document (`plipy.entities.read_labels` reads it back, validated)."""

    kind, path_pattern = "entity-labels", "entities-labels-{model}.json"

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "entity": e["entity"],
                "entity_type": e["entity_type"],
                "label": e["label"],
                "split": e["split"],
                "attribute": name,
                **{k: a.get(k) for k in ROW_KEYS},
            }
            for e in self._data["entities"]
            for name, a in e["attributes"].items()
        ]

    def _describe(self) -> str:
        return f"entities={len(self._data['entities'])}"
