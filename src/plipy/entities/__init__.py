"""Entities of sae_entities (players, movies, cities, songs) with WikiData attributes, and known/unknown labels that
the model itself earns by answering attribute queries.

    from plipy import entities
    lists = entities.load_entities(limit=5)
    doc = entities.read_labels("results/entities-labels-smollm2-135m.json")

Labelling itself runs a model: `plipy.label_entities` (`plipy.experiments.entity_labels`).
"""

from __future__ import annotations

from plipy.entities.build import ENTITY_TYPES, UPSTREAM_COUNTS, build_entities, check_types, load_entities
from plipy.entities.correctness import RULES, grade, is_correct, is_refusal, known_threshold
from plipy.entities.label import (
    PROFILES,
    assign_labels,
    balanced_test,
    entity_label,
    label_notes,
    read_labels,
    split_indices,
    three_way_split,
    validate_labels,
)
from plipy.entities.queries import QUERIED_ATTRIBUTES, QUERY_TEMPLATES, RELATIONS, make_queries, relation_prompts

__all__ = [
    "ENTITY_TYPES",
    "UPSTREAM_COUNTS",
    "PROFILES",
    "QUERIED_ATTRIBUTES",
    "QUERY_TEMPLATES",
    "RELATIONS",
    "RULES",
    "load_entities",
    "label_notes",
    "read_labels",
    "validate_labels",
    "build_entities",
    "check_types",
    "make_queries",
    "relation_prompts",
    "grade",
    "is_correct",
    "is_refusal",
    "known_threshold",
    "entity_label",
    "split_indices",
    "three_way_split",
    "balanced_test",
    "assign_labels",
]
