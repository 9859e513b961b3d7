"""Entity prompts: the inputs of the SAE attention experiment (`plipy.sae.inputs` reads and tokenizes them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EntityPrompt:
    """One prompt with the entity string it names; `label` is e.g. known/unknown (None if not given)."""

    prompt: str
    entity: str
    entity_type: str = ""
    label: str | None = None
    relation: str | None = None
