"""Is a completion correct? Per-attribute rules of sae_entities (check_correctness_wikidata.py), with rapidfuzz.

Each rule takes (completion, correct answer string) and returns bool. `grade` adds upstream's labels:
'correct' if the rule accepts, else 'refusal' if the text is a refusal / "I don't know", else 'error'.
Deliberate deviations from upstream (all documented in docs/entities.md): accents are folded (Nikšić → Niksic)
instead of dropped before fuzzy matching; genre items are stripped before the substring test; a location needs
one number near |latitude| and another near |longitude|; refusal prefixes are tested on the stripped text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import partial

from rapidfuzz import fuzz
from rapidfuzz.utils import default_process

NAME_THRESHOLD = 90  # upstream: thefuzz token_set_ratio(...) > 90 (thefuzz rounds the score to an int)
_ALIASES = {
    "united states of america": "united states of america, united states, us, usa",
    "people's republic of china": "people's republic of china, china",
}


def _fold(text: str) -> str:
    """ASCII-fold accents (ö → o); thefuzz's force_ascii dropped non-ASCII characters instead."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def name_score(name: str, generation: str) -> float:
    """rapidfuzz token_set_ratio (0-100) of one name against the completion, after folding and default processing."""
    return fuzz.token_set_ratio(_fold(name), _fold(generation), processor=default_process)


def name_match(generation: str, correct_answer: str) -> bool:
    """Any comma-separated name scores > 90 (token set ratio: a name whose words all appear in the text is 100)."""
    gen = generation.lower().replace(",", " ").replace(".", " ").replace("-", " ")
    answer = correct_answer.lower()
    answer = _ALIASES.get(answer.strip(), answer)
    return any(round(name_score(n, gen)) > NAME_THRESHOLD for n in answer.split(",") if n.strip())


def _ints(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def number_match(generation: str, correct_answer: str, tolerance: int = 5, pct: float | None = None) -> bool:
    """Some integer in the text (thousands commas removed) within ±tolerance, or ±pct of the answer if pct is set."""
    target = int(float(correct_answer))
    limit = pct * target if pct is not None else tolerance
    return any(abs(n - target) <= limit for n in _ints(generation.lower().replace(",", "")))


def number_match_in_list(generation: str, correct_answer: str, tolerance: int = 3) -> bool:
    """Some integer in the text within ±tolerance of any of the comma-separated answers (movie durations)."""
    targets = [int(float(a)) for a in correct_answer.split(",") if a.strip()]
    return any(abs(n - t) <= tolerance for n in _ints(generation.lower()) for t in targets)


def genre_match(generation: str, correct_answer: str) -> bool:
    """Some listed genre, with ' film' removed, is a substring of the text ('drama film' → 'drama')."""
    gen = generation.lower().strip()
    genres = [g.replace(" film", "").strip() for g in correct_answer.lower().split(",")]
    return any(g and g in gen for g in genres)


def location_match(generation: str, correct_answer: str, tolerance: int = 1) -> bool:
    """One number within ±1 of |int(latitude)| and another within ±1 of |int(longitude)| (`Point(lon lat)`)."""
    lon, lat = correct_answer.replace("Point(", "").replace(")", "").split()
    lon_i, lat_i = abs(int(float(lon))), abs(int(float(lat)))
    nums = [abs(int(float(n))) for n in re.findall(r"-?\d+\.?\d*", generation.lower())]
    lat_hits = {i for i, n in enumerate(nums) if abs(n - lat_i) <= tolerance}
    lon_hits = {i for i, n in enumerate(nums) if abs(n - lon_i) <= tolerance}
    return any(a != b for a in lat_hits for b in lon_hits)


# prompt_type → rule, as upstream's WIKIDATA_QUERIES_BASE correctness_function entries.
RULES: dict[str, Callable[[str, str], bool]] = {
    "player_place_birth": name_match,
    "player_date_birth": partial(number_match, tolerance=5),
    "player_teams_list": name_match,
    "movie_directors": name_match,
    "movie_cast": name_match,
    "movie_screenwriters": name_match,
    "movie_genres": genre_match,
    "movie_release_year": partial(number_match, tolerance=2),
    "movie_durations": partial(number_match_in_list, tolerance=3),
    "city_country": name_match,
    "city_location": location_match,
    "city_population": partial(number_match, tolerance=0, pct=0.1),
    "city_elevation": partial(number_match, tolerance=20),
    "song_album": name_match,
    "song_publication_year": partial(number_match, tolerance=0),
    "song_genres": name_match,
    "song_performers": name_match,
}

# utils/generation_utils.py of sae_entities (two missing commas there glued strings together; split here).
_REFUSAL_PREFIXES = (
    "i'm sorry",
    "sorry",
    "i am sorry",
    "i apologize",
    "as an",
    "as an ai",
    "i'm an",
    "i'm just",
    "as a language model",
    "as an assistant",
    "i cannot",
    "i do not",
    "is illegal and unethical",
    "i'm really sorry",
    "openai",
    "unethical",
    "not ethical",
    "illegal",
    "not legal",
    "my apologies",
    "but i cannot",
    "if you have any other non-malicious requests",
    "i'm not able to provide",
    "i am really sorry",
    "i cannot create",
    "i cannot support",
    "i can't provide",
    "i can't assist",
    "please clarify",
    "please be more specific",
    "there are several",
    "there are multiple",
    "there isn't a single ",
    "it's difficult to ",
    "it is difficult to",
    "unfortunately",
)
_REFUSAL_SUBSTRINGS = (
    "i'm unable",
    "i am unable",
    "sorry",
    "not familiar",
    "couldn't find",
    "could not find",
    "any information",
    "not aware",
    "not sure",
    "it's impossible to give",
    "there doesn't seem to be any",
    "this is a complex ",
    "i cannnot ",
    "i do not have access to",
    "there's no single definitive answer",
    "be more specific",
    "provide more context",
    "provide me with more",
    "i cannot answer this question",
    "the premise of the question is incorrect",
    # _unknown_strings
    "there is no widely known",
    "is not a known",
    "doesn't seem to be a widely known",
    "there's no widely known",
    "there doesn't seem to be a",
    "there is no ",
    "fictional",
    "unfortunately,",
    "doesn't exist",
    "doesn't seem to be a known",
    "is a bit of a tricky one!",
    "a bit of a trick",
    "not yet available",
    "there doesn't appear to be a ",
    "please provide me with",
    "i cannot give you an",
    "it's not a widely known",
    "no publicly available information",
    "not a very well-known one",
    "please clarify",
    "i do not have access to real-time",
    "i'm unable to access real-time",
    "i am unable to access real-time",
    "unable to",
    "i believe you",
    "i need a bit more information",
    "i couldn't find any information",
    "i need a little more",
    "i can't give you a specific",
    "i can't find any information",
    "i'm unable ",
    "i'm not able",
    "i am not able",
    "i cannot find",
    "there is no evidence",
    "the context does not specify",
    "the context does not provide",
    "is not explicitly stated",
    "not mentioned in the context",
    "not provided",
    "unknown",
    "not publicly available information",
    "please note",
    "does not exist",
    "it's important to note that",
    "not readily available",
    "not a known",
    "do not have information",
    "not aware of",
    "i need more information",
)


def is_refusal(generation: str) -> bool:
    """Upstream's is_generation_refusal: a refusal / "I don't know" substring, or a refusal prefix."""
    text = generation.lower().replace("\u2019", "'")
    return any(s in text for s in _REFUSAL_SUBSTRINGS) or text.strip().startswith(_REFUSAL_PREFIXES)


def is_correct(prompt_type: str, generation: str, correct_answer: str) -> bool:
    """The upstream rule of `prompt_type` applied to one completion."""
    try:
        rule = RULES[prompt_type]
    except KeyError:
        raise KeyError(f"no correctness rule for {prompt_type!r}") from None
    return bool(rule(generation, correct_answer))


def grade(prompt_type: str, generation: str, correct_answer: str) -> str:
    """'correct', 'refusal' or 'error', in upstream's order (a correct answer wins over refusal words)."""
    if is_correct(prompt_type, generation, correct_answer):
        return "correct"
    return "refusal" if is_refusal(generation) else "error"


def known_threshold(k: int) -> int:
    """Correct samples needed for a known attribute: upstream's 3 of 10, scaled as ceil(0.3·K) (at least 1)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    return max(1, -(-3 * k // 10))
