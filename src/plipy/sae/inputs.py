"""Inputs of the SAE analyses: entity prompts (JSONL or entity lists + the upstream template), their entity token
positions from the tokenizer's offsets, steered position types, and latent files (mean activations, candidates)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from plipy.corpus.prompts import EntityPrompt
from plipy.errors import PlipyError

POS_TYPES = ("entity_last", "entity", "entity_to_end", "entity_last_to_end", "all")
TEMPLATE = "The {entity_type} {entity} {relation}"
# Upstream `entity_type_to_base_relations` (mech_interp_utils.py:44-61), in its order. The two player relations are
# swapped upstream (date_birth ↔ place_birth); the sentences are what matter for attention, so they are kept.
BASE_RELATIONS: dict[str, list[str]] = {
    "city": ["is located in", "is at an elevation of", "has a population of"],
    "movie": [
        "has starring",
        "is directed by",
        "has a duration of",
        "has the genre",
        "was released in",
        "is written by",
    ],
    "player": ["was born in the city of", "was born in the year", "has played for"],
    "song": ["appears in the album", "has the genre", "is sung by", "was released in"],
}

# ---------------------------------------------------------------------------------------------- prompts


def template_prompts(
    entities: Sequence[dict[str, Any]], template: str = TEMPLATE, relations: dict[str, list[str]] | None = None
) -> list[EntityPrompt]:
    """`The {entity_type} {entity} {relation}` for every entity × every base relation of its type."""
    rels = BASE_RELATIONS if relations is None else relations
    out = []
    for i, e in enumerate(entities):
        etype = str(e.get("entity_type") or "")
        if "entity" not in e:
            raise PlipyError(f"entity row {i}: no 'entity' field")
        if etype not in rels:
            raise PlipyError(
                f"entity row {i} ({e['entity']!r}): no relations for entity type {etype!r} "
                f"(known: {', '.join(rels)}); give full prompts instead"
            )
        for r in rels[etype]:
            text = template.format(entity_type=etype, entity=e["entity"], relation=r)
            out.append(EntityPrompt(text, str(e["entity"]), etype, e.get("label"), r))
    return out


def load_prompts(path: str | Path, template: str = TEMPLATE) -> list[EntityPrompt]:
    """JSONL or JSON list of `{prompt, entity, entity_type, label}`; rows without `prompt` are expanded with the
    template and the upstream base relations of their entity type."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PlipyError(f"cannot read prompts {p}: {e}") from e
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except ValueError as e:
        raise PlipyError(f"{p}: not JSON or JSONL: {e}") from e
    if not isinstance(rows, list):
        raise PlipyError(f"{p}: expected a JSON list or JSONL rows")
    return prompts_from_rows(rows, template, where=str(p))


def prompts_from_rows(rows: list[Any], template: str = TEMPLATE, where: str = "prompts") -> list[EntityPrompt]:
    """Rows `{prompt, entity, entity_type, label}` as prompts; rows without `prompt` use the template."""
    out: list[EntityPrompt] = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "entity" not in r:
            raise PlipyError(f"{where} row {i}: needs at least an 'entity' field")
        if "prompt" in r:
            out.append(
                EntityPrompt(
                    str(r["prompt"]),
                    str(r["entity"]),
                    str(r.get("entity_type") or ""),
                    r.get("label"),
                    r.get("relation"),
                )
            )
        else:
            out.extend(template_prompts([r], template))
    return out


def load_entity_list(path: str | Path, entity_type: str, label: str | None) -> list[dict[str, Any]]:
    """A plain entity list (one per line, or a JSON list of strings) as entity rows of one type and label."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PlipyError(f"cannot read entities {p}: {e}") from e
    names = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines()]
    return [{"entity": str(n), "entity_type": entity_type, "label": label} for n in names if str(n).strip()]


def select_prompts(
    items: Sequence[EntityPrompt], labels: Sequence[str] | None = None, limit: int | None = None
) -> list[EntityPrompt]:
    """The prompts whose label is one of `labels` (None: all), then the first `limit` per (entity type, label)
    (upstream analysed the first 100)."""
    kept = [p for p in items if not labels or str(p.label) in labels]
    if limit is None:
        return kept
    seen: dict[tuple[str, Any], int] = {}
    out = []
    for p in kept:
        key = (p.entity_type, p.label)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= limit:
            out.append(p)
    return out


@dataclass
class Tokenized:
    """Token ids of one prompt (unpadded) and the token positions of its entity string."""

    input_ids: list[int]
    entity_tokens: list[int]


def tokenize_prompt(p: EntityPrompt, tokenizer: Any, bos: bool = True, index: int | None = None) -> Tokenized:
    """Tokenise without special tokens (+ BOS, as TransformerLens does) and find the entity's tokens by offsets."""
    start = p.prompt.find(p.entity)
    name = f"prompt {index}" if index is not None else "prompt"
    if not p.entity or start < 0:
        raise PlipyError(f"{name}: entity {p.entity!r} not found in its prompt {p.prompt!r}")
    end = start + len(p.entity)
    enc = tokenizer(p.prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    shift = 0
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
        shift = 1
    toks = [i + shift for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    if not toks:
        raise PlipyError(f"{name}: entity {p.entity!r} covers no token of {p.prompt!r}")
    return Tokenized(ids, toks)


def positions_for(entity_tokens: Sequence[int], seq_len: int, pos_type: str) -> list[int]:
    """Steered positions (unpadded coordinates) of one prompt for a position type (upstream `get_batch_pos`)."""
    ent, last = list(entity_tokens), entity_tokens[-1]
    if pos_type == "entity_last":
        return [last]
    if pos_type == "entity":
        return ent
    if pos_type == "entity_to_end":
        return ent + list(range(last + 1, seq_len))
    if pos_type == "entity_last_to_end":
        return list(range(last, seq_len))
    if pos_type == "all":
        return list(range(seq_len))
    raise PlipyError(f"unknown position type {pos_type!r} (one of {', '.join(POS_TYPES)})")


# ---------------------------------------------------------------------------------------------- latent files


def read_latent_means(path: str | Path, layer: int | None = None, section: str = "unknown") -> dict[int, float]:
    """Mean activations per latent from a latent file: upstream layer files (`{"known": {"0": {"layer",
    "latent_idx", "mean_features_acts", …}}, "unknown": {…}}`, read from `section` as upstream reads 'unknown'),
    a `{"<latent>": mean}` dict, or a list of `{latent_idx, mean_act}` rows."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PlipyError(f"cannot read latent file {path}: {e}") from e
    if isinstance(data, dict) and section in data and isinstance(data[section], (dict, list)):
        data = data[section]
    out: dict[int, float] = {}
    entries = data.values() if isinstance(data, dict) else data
    if isinstance(data, dict) and all(_is_number(v) for v in data.values()):
        return {int(float(k)): float(v) for k, v in data.items()}
    for entry in entries:
        if not isinstance(entry, dict) or "latent_idx" not in entry:
            continue
        if layer is not None and entry.get("layer") is not None and int(entry["layer"]) != layer:
            continue
        mean = next((entry[k] for k in ("mean_features_acts", "mean_act", "mean_activation") if k in entry), None)
        if isinstance(mean, dict):
            mean = mean.get(section)
        if _is_number(mean):
            out[int(float(entry["latent_idx"]))] = float(mean)
    if not out:
        raise PlipyError(f"latent file {path}: no mean activations found" + (f" for layer {layer}" if layer else ""))
    return out


def read_candidates(path: str | Path, layer: int | None = None) -> list[int]:
    """Random-latent candidates: a JSON list of indices, an upstream `{"L{layer}F{idx}": score}` dict (latents of
    `layer` whose score is exactly 0, as upstream), or a text file with one index per line."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PlipyError(f"cannot read candidate file {path}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError:
        data = [ln.strip() for ln in text.splitlines() if ln.strip()]
    try:
        if isinstance(data, dict):
            out = []
            for key, score in data.items():
                la, idx = key.lstrip("L").split("F")
                if (layer is None or int(la) == layer) and _is_number(score) and float(score) == 0.0:
                    out.append(int(float(idx)))
            return out
        return [int(float(x)) for x in data]
    except (ValueError, AttributeError) as e:
        raise PlipyError(f"candidate file {path}: cannot read latent indices ({e})") from e


def _is_number(x: Any) -> TypeGuard[int | float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
