"""Counterfactual twins for patching: a corrupted copy of each sample whose tokens stay aligned with the original's.

Two sources, named in every result:
- the `marker-neutral` rule: the marker's characters (`>>>`, `#[test]`) replaced by a neutral string — a run of one
  punctuation character, the marker's length first — chosen as the first candidate whose tokenization has exactly
  the sample's token count and leaves every token outside the marker's tokens unchanged (checked by re-tokenizing);
  a sample for which no candidate does is refused, named;
- given pairs: a file (JSON object sample id → corrupted code, or `{"pairs": {…}}`), a dict, or each sample's
  `counterfactual` field in the corpus file (`pairs="corpus"`). A pair whose token count differs from its
  sample's is refused, named.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plipy.corpus import Corpus, SamplePositions, decode_corpus, encode_text, read_corpus_bytes
from plipy.errors import ParameterError, PlipyError

RULE = "marker-neutral"
RULE_TEXT = (
    "the marker's characters replaced by the first neutral string (a run of one of the characters "
    "'~-=*_+|;x', the marker's length first, then other lengths) whose tokenization has the sample's token count "
    "and leaves every token outside the marker's unchanged"
)
PAIRS_TEXT = "a corrupted twin given for each sample (same token count, checked)"
NEUTRAL = "~-=*_+|;x"
CORPUS_FIELD = "counterfactual"


@dataclass(frozen=True)
class Twin:
    """A sample's counterfactual: its token ids (as many as the sample's), the first position where they differ
    from the sample's, its code, and the neutral string the rule chose (None for a given pair)."""

    ids: tuple[int, ...]
    first_diff: int
    code: str
    replacement: str | None = None


def tokens(code: str, tokenizer: Any, bos: bool) -> list[int]:
    """The token ids of a code as every plipy experiment tokenizes it (no special tokens, BOS if asked)."""
    ids, _ = encode_text(tokenizer, code)
    return [int(tokenizer.bos_token_id), *ids] if bos else ids


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def marker_twin(sp: SamplePositions, tokenizer: Any) -> Twin:
    """The `marker-neutral` twin of a sample, or a PlipyError naming the sample when no candidate keeps the tokens
    aligned."""
    s = sp.sample
    c0, c1 = s.marker_char_pos, s.marker_char_pos + len(s.marker_pattern)
    span = {i for i, (a, b) in enumerate(sp.offsets) if a < c1 and b > c0 and b > a}
    ids = list(sp.input_ids)
    n = len(s.marker_pattern)
    lengths = [n, *sorted(set(range(1, 2 * n + 1)) - {n}, key=lambda k: (abs(k - n), k))]
    for length in lengths:
        for ch in NEUTRAL:
            cand = ch * length
            if cand == s.marker_pattern:
                continue
            code = s.code[:c0] + cand + s.code[c1:]
            new = tokens(code, tokenizer, sp.bos)
            if len(new) != len(ids) or any(new[i] != ids[i] for i in range(len(ids)) if i not in span):
                continue
            diff = _first_diff(ids, new)
            if diff is not None:
                return Twin(tuple(new), diff, code, cand)
    raise PlipyError(
        f"sample {s.id!r}: no neutral replacement of its marker {s.marker_pattern!r} keeps the token count and the "
        f"other tokens ({RULE} rule); give its counterfactual in a pairs file, or leave the sample out"
    )


def paired_twin(sp: SamplePositions, code: str, tokenizer: Any) -> Twin:
    """The twin of a sample from its given corrupted code; a PlipyError naming the sample when the token counts
    differ or the two are the same tokens."""
    ids, new = list(sp.input_ids), tokens(code, tokenizer, sp.bos)
    if len(new) != len(ids):
        raise PlipyError(
            f"sample {sp.sample.id!r}: its counterfactual has {len(new)} tokens, the sample {len(ids)}: patching "
            "needs aligned positions (the same token count)"
        )
    diff = _first_diff(ids, new)
    if diff is None:
        raise PlipyError(f"sample {sp.sample.id!r}: its counterfactual has the same tokens as the sample")
    return Twin(tuple(new), diff, code)


def load_pairs(pairs: Any, corpus: Corpus) -> dict[str, str] | None:
    """The given corrupted codes by sample id: None (the marker rule), a dict, "corpus" (each sample's
    `counterfactual` field in the corpus file) or a JSON file; checked before any model loads."""
    if pairs is None:
        return None
    if isinstance(pairs, Mapping):
        found = dict(pairs)
    elif isinstance(pairs, str) and pairs == "corpus":
        _, raw = read_corpus_bytes(corpus.path)
        data = decode_corpus(raw, corpus.path)
        found = {
            str(item["id"]): item[CORPUS_FIELD]
            for key, group in data.items()
            if not key.startswith("_") and isinstance(group, list)
            for item in group
            if isinstance(item, dict) and CORPUS_FIELD in item and "id" in item
        }
    elif isinstance(pairs, (str, Path)):
        found = _pairs_file(Path(pairs))
    else:
        raise ParameterError("pairs", f"expected None, 'corpus', a JSON file or a dict, got {type(pairs).__name__}")
    bad = [k for k, v in found.items() if not isinstance(v, str)]
    if bad:
        raise ParameterError("pairs", f"the counterfactual of {bad[0]!r} is not a string of code")
    return found


def _pairs_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParameterError("pairs", f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParameterError("pairs", f"{path}: not a JSON file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("pairs"), dict):
        data = data["pairs"]
    if not isinstance(data, dict):
        raise ParameterError("pairs", f"{path}: expected a JSON object sample id → corrupted code")
    return dict(data)
