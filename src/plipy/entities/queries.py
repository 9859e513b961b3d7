"""Attribute queries for base models (sae_entities' `WIKIDATA_QUERIES_BASE`) and relation prompts with fixed relations.

A base-model query is upstream's user question + " " + assistant prefix, e.g. `What is the place of birth for the
player '{entity}'? The city of birth for the player '{entity}' is`; the model's continuation is graded against the
attribute value. Only the attributes upstream queried are used (player weight/height are kept in the data, unqueried).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plipy.errors import PlipyError

# (question, answer prefix) per prompt type, verbatim from create_wikidata_entity_queries.py WIKIDATA_QUERIES_BASE.
QUERY_TEMPLATES: dict[str, tuple[str, str]] = {
    "player_place_birth": (
        "What is the place of birth for the player '{entity}'?",
        "The city of birth for the player '{entity}' is",
    ),
    "player_date_birth": (
        "What is the year of birth for the player '{entity}'?",
        "The year of birth for the player '{entity}' is",
    ),
    "player_teams_list": (
        "What team (name at least one) signed the player '{entity}'?",
        "The team that signed the player '{entity}' is",
    ),
    "movie_directors": ("Who is the director of the movie '{entity}'?", "The director of the movie '{entity}' is"),
    "movie_cast": (
        "What is the name of an actor starring in the movie '{entity}'?",
        "The actor starring in the movie '{entity}' is",
    ),
    "movie_screenwriters": (
        "Who is the screenwriter of the movie '{entity}'?",
        "The screenwriter of the movie '{entity}' is",
    ),
    "movie_genres": (
        "What genre label best describes the movie '{entity}'?",
        "The genre label that best describes the movie '{entity}' is",
    ),
    "movie_release_year": (
        "What was the release year for the movie '{entity}'?",
        "The release year for the movie '{entity}' is",
    ),
    "movie_durations": (
        "What is the duration, in minutes, of the movie '{entity}'?",
        "The duration of the movie '{entity}' is",
    ),
    "city_country": (
        "What country contains the city of '{entity}'?",
        "The country that contains the city '{entity}' is",
    ),
    "city_location": (
        "What geographic coordinates correspond to the city of '{entity}'?",
        "The geographic coordinates that correspond to the city '{entity}' are",
    ),
    "city_population": (
        "How large, in number, is the population of the city '{entity}'?",
        "The population of the city '{entity}' is",
    ),
    "city_elevation": (
        "What is the altitude, in meters, of the city '{entity}'?",
        "The altitude of the city '{entity}' is",
    ),
    "song_album": ("What is the album of the song '{entity}'?", "The album of the song '{entity}' is"),
    "song_publication_year": (
        "What is the publication year of the song '{entity}'?",
        "The publication year for the song '{entity}' is",
    ),
    "song_genres": (
        "What is the genre of the song '{entity}'?",
        "The genre label that best describes the song '{entity}' is",
    ),
    "song_performers": ("Who is the performer of the song '{entity}'?", "The performer of the song '{entity}' is"),
}

# Queried attributes per type, in upstream's `prompt_types_to_include` order.
QUERIED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "player": ("place_birth", "date_birth", "teams_list"),
    "movie": ("directors", "cast", "screenwriters", "genres", "release_year", "durations"),
    "city": ("country", "location", "population", "elevation"),
    "song": ("album", "publication_year", "genres", "performers"),
}

# Base relations for `The {entity_type} {entity} {relation}` prompts (upstream entity_type_to_base_relations).
# FIXED: upstream maps player_date_birth → 'was born in the city of' and player_place_birth → 'was born in the year'
# (swapped), so the expected answer of those two prompts is the other attribute; here each relation names its own
# attribute. city_location has no base relation upstream (3 city relation prompts).
RELATIONS: dict[str, str] = {
    "city_country": "is located in",
    "city_elevation": "is at an elevation of",
    "city_population": "has a population of",
    "movie_cast": "has starring",
    "movie_directors": "is directed by",
    "movie_durations": "has a duration of",
    "movie_genres": "has the genre",
    "movie_release_year": "was released in",
    "movie_screenwriters": "is written by",
    "player_date_birth": "was born in the year",
    "player_place_birth": "was born in the city of",
    "player_teams_list": "has played for",
    "song_album": "appears in the album",
    "song_genres": "has the genre",
    "song_performers": "is sung by",
    "song_publication_year": "was released in",
}
UPSTREAM_SWAPPED_RELATIONS = {
    "player_date_birth": "was born in the city of",
    "player_place_birth": "was born in the year",
}


@dataclass(frozen=True)
class Query:
    """One attribute query of one entity: the prompt to complete and the value a correct answer must match."""

    entity: str
    entity_type: str
    attribute: str
    prompt: str
    answer: str

    @property
    def prompt_type(self) -> str:
        """Upstream's name for the query kind, e.g. `player_place_birth`."""
        return f"{self.entity_type}_{self.attribute}"


def query_prompt(entity: str, entity_type: str, attribute: str) -> str:
    """The base-model query text: question + ' ' + answer prefix (upstream format_prompt for base models)."""
    key = f"{entity_type}_{attribute}"
    if key not in QUERY_TEMPLATES:
        raise PlipyError(f"no query template for {key!r}")
    question, prefix = QUERY_TEMPLATES[key]
    # str.replace, not str.format: entity names may contain braces.
    return question.replace("{entity}", entity) + " " + prefix.replace("{entity}", entity)


def make_queries(entity: dict[str, Any]) -> list[Query]:
    """All queries of one entity, in QUERIED_ATTRIBUTES order."""
    etype = entity["entity_type"]
    if etype not in QUERIED_ATTRIBUTES:
        raise PlipyError(f"unknown entity type {etype!r}")
    out = []
    for attr in QUERIED_ATTRIBUTES[etype]:
        if attr not in entity["attributes"]:
            raise PlipyError(f"{etype} {entity['entity']!r} lacks attribute {attr!r}")
        out.append(
            Query(
                entity["entity"],
                etype,
                attr,
                query_prompt(entity["entity"], etype, attr),
                str(entity["attributes"][attr]),
            )
        )
    return out


def relation_prompts(entity: dict[str, Any]) -> list[dict[str, str]]:
    """`The {type} {entity} {relation}` prompts with their expected answer (last listed value, as upstream's
    create_prompts_and_answers), using the fixed relations."""
    etype, name = entity["entity_type"], entity["entity"]
    out = []
    for attr in QUERIED_ATTRIBUTES[etype]:
        rel = RELATIONS.get(f"{etype}_{attr}")
        if rel is None:
            continue
        answer = " " + str(entity["attributes"][attr]).split(",")[-1].strip()
        out.append(
            {
                "prompt": f"The {etype} {name} {rel}",
                "entity": name,
                "entity_type": etype,
                "attribute": attr,
                "relation": rel,
                "answer": answer,
            }
        )
    return out
