"""Entity lists from the raw WikiData dumps of sae_entities, by the rule that reproduces upstream's counts exactly.

Rule (docs/entities.md): within one entity type, keep the raw rows whose label occurs exactly once in that type's raw
file(s) and that have every attribute field. Order: raw order; movies by sorted file name; cities high then low
population. Result: 7,487 players, 10,895 movies, 7,904 cities, 8,448 songs.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plipy.errors import ParameterError, PlipyError
from plipy.io import atomic_write_bytes

ENTITY_TYPES: tuple[str, ...] = ("player", "movie", "city", "song")

# Raw field → attribute name, so that f"{type}_{attribute}" equals upstream's prompt_type names.
RAW_FIELDS: dict[str, tuple[str, dict[str, str]]] = {
    "player": (
        "humanLabel",
        {
            "placebirthLabel": "place_birth",
            "datebirthyearLabel": "date_birth",
            "teamslist": "teams_list",
            "recent_mass": "weight",
            "recent_height": "height",
        },
    ),
    "movie": (
        "filmLabel",
        {
            "directors": "directors",
            "cast_list": "cast",
            "screenwriters": "screenwriters",
            "genres": "genres",
            "release_year": "release_year",
            "durations": "durations",
        },
    ),
    "city": (
        "cityLabel",
        {
            "countryLabel": "country",
            "loc": "location",
            "recent_population": "population",
            "above_sea_meters": "elevation",
        },
    ),
    "song": (
        "songLabel",
        {"albumLabel": "album", "publicationYear": "publication_year", "genres": "genres", "performers": "performers"},
    ),
}

UPSTREAM_COUNTS = {"player": 7487, "movie": 10895, "city": 7904, "song": 8448}


def raw_files(raw_dir: str | os.PathLike, entity_type: str) -> list[Path]:
    """The raw dump files of one type in upstream order (player.json; movie/*.json sorted; cities high then low)."""
    d = Path(raw_dir)
    if entity_type == "movie":
        files = sorted((d / "movie").glob("movies_*.json"))
    elif entity_type == "city":
        files = [d / "city" / "cities_high_population.json", d / "city" / "cities_low_population.json"]
    else:
        files = [d / f"{entity_type}.json"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise PlipyError(f"raw WikiData dump for {entity_type} not found in {d}: {', '.join(missing) or 'no files'}")
    return files


def build_type(raw_dir: str | os.PathLike, entity_type: str) -> list[dict[str, Any]]:
    """Entities of one type: label unique within the type's raw rows, every attribute field present."""
    if entity_type not in RAW_FIELDS:
        raise PlipyError(f"unknown entity type {entity_type!r}; known: {', '.join(ENTITY_TYPES)}")
    label_key, fields = RAW_FIELDS[entity_type]
    rows: list[dict[str, Any]] = []
    for f in raw_files(raw_dir, entity_type):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PlipyError(f"cannot read {f}: {e}") from e
        if not isinstance(data, list):
            raise PlipyError(f"{f}: expected a JSON list of rows")
        rows.extend(data)
    counts = Counter(r.get(label_key) for r in rows)
    out = []
    for r in rows:
        label = r.get(label_key)
        if label is None or counts[label] != 1 or any(k not in r for k in fields):
            continue
        out.append(
            {"entity": label, "entity_type": entity_type, "attributes": {name: r[k] for k, name in fields.items()}}
        )
    return out


def build_entities(raw_dir: str | os.PathLike, types: Sequence[str] = ENTITY_TYPES) -> dict[str, list[dict]]:
    """All entity lists from a raw dump folder (the `raw/wikidata` folder of sae_entities)."""
    return {t: build_type(raw_dir, t) for t in types}


def encode(entities: list[dict[str, Any]]) -> bytes:
    """Deterministic gzip of one list (mtime 0), so a rebuild is byte-identical to the shipped file."""
    text = json.dumps(entities, ensure_ascii=False, separators=(",", ":")) + "\n"
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def write_entities(lists: dict[str, list[dict]], out_dir: str | os.PathLike) -> list[Path]:
    """Write `{type}.json.gz` per type (atomically, with the umask's mode) into `out_dir`."""
    return [atomic_write_bytes(Path(out_dir) / f"{t}.json.gz", encode(ents)) for t, ents in lists.items()]


def shipped_dir() -> Path:
    """The package-data folder holding the shipped lists."""
    return Path(__file__).resolve().parent.parent / "data" / "entities"


def built_dir() -> Path:
    """Where `plipy entities build` writes by default: `$PLIPY_CACHE/entity-lists`, never the package's own data
    (in an editable install that is the source tree)."""
    from plipy.models import cache_dir

    return cache_dir() / "entity-lists"


def read_list(path: str | os.PathLike) -> list[dict[str, Any]]:
    """One `{type}.json.gz` list."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PlipyError(f"cannot read entity list {path}: {e}") from e


def load_entities(types: Sequence[str] | None = None, limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """The shipped entity lists: `{type: [{"entity", "entity_type", "attributes": {name: value}}]}`, first `limit`
    per type in the fixed shipped order (None or 0: all)."""
    chosen = check_types(types)
    if limit is not None and limit < 0:
        raise ParameterError("limit", f"must be >= 0, got {limit}")
    out = {}
    for t in chosen:
        path = shipped_dir() / f"{t}.json.gz"
        if not path.is_file():
            raise PlipyError(
                f"shipped entity list {path} is missing: reinstall plipy, or rebuild it with "
                f"`plipy entities build --raw DIR --out {path.parent}`"
            )
        ents = read_list(path)
        out[t] = ents[:limit] if limit else ents
    return out


def check_types(types: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validated entity types in the given order (None: all four); a comma string is accepted."""
    if types is None:
        return ENTITY_TYPES
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    bad = [t for t in types if t not in ENTITY_TYPES]
    if bad:
        raise ParameterError("types", f"unknown entity type(s) {', '.join(bad)}; known: {', '.join(ENTITY_TYPES)}")
    if not types:
        raise ParameterError("types", "no entity types given")
    return tuple(dict.fromkeys(types))
