"""Corpora of code samples (a marker position and target positions per sample) and their token positions.

A corpus is a JSON object. Every top-level key whose value is a list is a group of samples (PLIP's groups
are python_doctest, rust_test, python_baseline, rust_baseline; any names work); keys starting with `_` are
metadata (`_format_version`, `_description`). A sample is
``{"id", "code", "marker_char_pos", "marker_pattern", "target_char_positions"}``: the position of the first
character of the marker (``>>>``, ``#[test]``) and of each target (``def``/``fn``, the function name, ...).
Positions are character (code point) indices; ``offsets="bytes"`` reads files that use UTF-8 byte offsets, as
PLIP-rs did (identical for ASCII code).

Char -> token conversion reproduces PLIP-rs (``src/positioning.rs``): no special tokens, first token whose
offset span contains the character, else the token with the nearest integer midpoint (flagged as a fallback).

The bundled default corpus (``plipy/data/attention_samples_universal.json``) is the PLIP universal corpus v2.0
from PLIP-rs (https://github.com/PCfVW/plip-rs), copyright its authors, used under the Apache License 2.0; the
licence text ships beside it as ``plipy/data/LICENSE-plip-rs-Apache-2.0.txt``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from plipy.errors import PlipyError

DEFAULT_CORPUS = "attention_samples_universal.json"
OFFSET_KINDS = ("chars", "bytes")
SAMPLE_FIELDS = ("id", "code", "marker_char_pos", "marker_pattern", "target_char_positions")
STATUSES = ("perfect", "ok", "fallback", "causal-violation", "target-on-marker", "failed")
_SHOWN_PROBLEMS = 20  # the message lists this many; `.problems` keeps them all


class CorpusError(PlipyError):
    """A corpus that cannot be used as given; `.problems` lists all problems found, each naming its sample."""

    def __init__(self, problems: Iterable[str], path: str | Path | None = None) -> None:
        self.problems = list(problems)
        self.path = str(path) if path is not None else None
        super().__init__(self._message())

    def _message(self) -> str:
        where = self.path or "the corpus"
        if len(self.problems) == 1:
            return f"{self.path}: {self.problems[0]}" if self.path else self.problems[0]
        shown = "; ".join(self.problems[:_SHOWN_PROBLEMS])
        more = len(self.problems) - _SHOWN_PROBLEMS
        tail = f"; ... and {more} more" if more > 0 else ""
        return f"{len(self.problems)} problems in {where}: {shown}{tail}"


@dataclass(frozen=True)
class Sample:
    """One code sample. Positions are character indices into `code` (converted at load time if needed)."""

    id: str
    group: str
    code: str
    marker_char_pos: int
    marker_pattern: str
    target_char_positions: tuple[int, ...]


@dataclass
class Corpus:
    """A loaded, validated corpus: groups of samples in file order, plus provenance (path, sha256)."""

    path: Path
    sha256: str
    format_version: str | None
    description: str | None
    groups: dict[str, list[Sample]]
    offsets: str = "chars"

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    def samples(self, groups: Iterable[str] | str | None = None) -> list[Sample]:
        """Samples of the given groups (in the order given), or of all groups in file order."""
        if groups is None:
            names = self.group_names
        else:
            names = [groups] if isinstance(groups, str) else list(groups)
        unknown = [g for g in names if g not in self.groups]
        if unknown:
            raise CorpusError(
                [f"unknown group {g!r} (groups: {', '.join(self.group_names)})" for g in unknown], self.path
            )
        return [s for g in names for s in self.groups[g]]

    def sample(self, sample_id: str) -> Sample:
        """The sample with this id."""
        for s in self.samples():
            if s.id == sample_id:
                return s
        raise CorpusError([f"no sample with id {sample_id!r}"], self.path)


def default_corpus_path() -> Path:
    """Where the bundled PLIP universal corpus lives."""
    return Path(str(resources.files("plipy") / "data" / DEFAULT_CORPUS))


def load_corpus(path: str | Path | None = None, offsets: str = "chars") -> Corpus:
    """Read and validate a corpus file (`None`: the bundled PLIP universal corpus).

    `offsets` says how the file counts positions: "chars" (code points) or "bytes" (UTF-8, as PLIP-rs).
    Raises CorpusError listing every problem found.
    """
    if offsets not in OFFSET_KINDS:
        raise CorpusError([f"offsets must be 'chars' or 'bytes', not {offsets!r}"])
    path, raw = read_corpus_bytes(path)
    sha = hashlib.sha256(raw).hexdigest()
    data = decode_corpus(raw, path)
    groups, problems = read_groups(data, offsets)
    if problems:
        raise CorpusError(problems, path)

    version = data.get("_format_version")
    description = data.get("_description")
    return Corpus(
        path=path,
        sha256=sha,
        format_version=None if version is None else str(version),
        description=None if description is None else str(description),
        groups=groups,
        offsets=offsets,
    )


def read_corpus_bytes(path: str | Path | None) -> tuple[Path, bytes]:
    """The corpus file's path and raw bytes (`None`: the bundled corpus); CorpusError if it cannot be read."""
    if path is None:
        resource = resources.files("plipy") / "data" / DEFAULT_CORPUS
        return Path(str(resource)), resource.read_bytes()
    path = Path(path)
    if not path.exists():
        raise CorpusError(["corpus file not found"], path)
    if not path.is_file():
        raise CorpusError(["not a file"], path)
    return path, path.read_bytes()


def decode_corpus(raw: bytes, path: Path) -> dict[str, Any]:
    """The corpus's top-level JSON object; CorpusError for non-UTF-8 text, invalid JSON or a non-object."""
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise CorpusError([f"not UTF-8 text ({e.reason} at byte {e.start})"], path) from None
    except json.JSONDecodeError as e:
        raise CorpusError([f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"], path) from None
    except RecursionError:
        raise CorpusError(["JSON nested too deeply to be a corpus"], path) from None
    if not isinstance(data, dict):
        raise CorpusError([f"the top level is a JSON {_json_type(data)}, not an object"], path)
    return data


def read_groups(data: dict[str, Any], offsets: str) -> tuple[dict[str, list[Sample]], list[str]]:
    """Every group's usable samples in file order, and every problem found (collected, not raised)."""
    problems: list[str] = []
    groups: dict[str, list[Sample]] = {}
    seen: dict[str, str] = {}  # id -> group, for duplicate detection across groups
    for key, value in data.items():
        if key.startswith("_"):
            continue
        if not isinstance(value, list):
            # A typo such as an object instead of a list would otherwise silently drop a whole group.
            what = "neither a group (a list of samples) nor metadata (a key starting with '_')"
            problems.append(f"top-level key {key!r} is {what}")
            continue
        groups[key] = []
        for i, item in enumerate(value):
            sample = _parse_sample(item, key, i, offsets, problems)
            if sample is None:
                continue
            if sample.id in seen:
                problems.append(f"sample {sample.id!r}: duplicate id (also in group {seen[sample.id]!r})")
                continue
            seen[sample.id] = key
            groups[key].append(sample)
    if not groups and not problems:
        problems.append("no groups: no top-level key holds a list of samples")
    elif not problems and not any(groups.values()):
        problems.append("no samples: every group is empty")
    return groups, problems


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if v is None:
        return "null"
    names: dict[type, str] = {dict: "object", list: "array", str: "string"}
    return names.get(type(v), type(v).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def byte_to_char(code: str, b: int) -> int | None:
    """Character index of UTF-8 byte offset `b` in `code`; None if out of range or inside a character."""
    data = code.encode()
    if not 0 <= b <= len(data):
        return None
    try:
        return len(data[:b].decode())
    except UnicodeDecodeError:
        return None


_EXPECTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "code": (lambda v: isinstance(v, str), "a string"),
    "marker_char_pos": (_is_int, "an integer"),
    "marker_pattern": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "target_char_positions": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers"),
}


def _parse_sample(item: Any, group: str, index: int, offsets: str, problems: list[str]) -> Sample | None:
    """Validate one sample; append its problems (each naming the sample) and return it if it is usable."""
    ref = f"{group}[{index}]"
    if not isinstance(item, dict):
        problems.append(f"{ref}: a sample must be an object, got a {_json_type(item)}")
        return None
    sid = item.get("id")
    if isinstance(sid, str) and sid:
        ref = f"sample {sid!r}"
    bad = _field_problems(item)
    if not bad:
        marker, chars, bad = _positions(item, offsets)
    if bad:
        problems.extend(f"{ref}: {b}" for b in bad)
        return None
    return Sample(
        id=str(sid),
        group=group,
        code=item["code"],
        marker_char_pos=marker,
        marker_pattern=item["marker_pattern"],
        target_char_positions=tuple(chars),
    )


def _field_problems(item: dict[str, Any]) -> list[str]:
    """Missing fields and fields of the wrong type."""
    bad: list[str] = []
    missing = [f for f in SAMPLE_FIELDS if f not in item]
    if missing:
        bad.append(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for name, (ok, what) in _EXPECTED.items():
        if name in item and not ok(item[name]):
            bad.append(f"{name} must be {what}, got {json.dumps(item[name])[:40]}")
    return bad


def _positions(item: dict[str, Any], offsets: str) -> tuple[int, list[int], list[str]]:
    """(marker char, target chars, problems) of a well-typed sample: positions inside the code, the marker pattern
    where it is said to be, and at least one target that is not the marker itself."""
    code, pattern = item["code"], item["marker_pattern"]
    targets = item["target_char_positions"]
    found: list[str] = []
    if not targets:
        found.append("no targets (target_char_positions is empty)")
    marker, err = _to_char(code, item["marker_char_pos"], offsets, "marker_char_pos")
    if marker is not None and code[marker : marker + len(pattern)] != pattern:
        err = (
            f"marker_pattern {pattern!r} is not at marker_char_pos {item['marker_char_pos']} "
            f"(found {code[marker : marker + len(pattern)]!r})"
        )
    if err is not None:
        found.append(err + _offsets_hint(code, item["marker_char_pos"], pattern, offsets))
    chars: list[int] = []
    for k, t in enumerate(targets):
        c, err = _to_char(code, t, offsets, f"target_char_positions[{k}]")
        if c is None:
            found.append(str(err))
        elif c == marker:
            # the marker's attention to itself is not attention to a target (it would be averaged in as one)
            found.append(f"target_char_positions[{k}] {t} is the marker's own position")
        else:
            chars.append(c)
    return (marker if marker is not None else -1), chars, found


def _to_char(code: str, pos: int, offsets: str, name: str) -> tuple[int, None] | tuple[None, str]:
    """A position of the file (chars or bytes) as a character index, or the problem with it."""
    n = len(code) if offsets == "chars" else len(code.encode())
    unit = "characters" if offsets == "chars" else "UTF-8 bytes"
    if not 0 <= pos < n:
        return None, f"{name} {pos} is outside the code ({n} {unit})"
    if offsets == "chars":
        return pos, None
    c = byte_to_char(code, pos)
    if c is None:
        return None, f"{name} {pos} falls inside a multi-byte UTF-8 character"
    return c, None


def _offsets_hint(code: str, pos: int, pattern: str, offsets: str) -> str:
    """If the other offset convention would have put the marker in place, say so."""
    if offsets == "chars":
        c = byte_to_char(code, pos)
        if c is not None and code[c : c + len(pattern)] == pattern:
            return " (the file looks like it uses UTF-8 byte offsets: pass --offsets bytes)"
    elif 0 <= pos < len(code) and code[pos : pos + len(pattern)] == pattern:
        return " (the file looks like it uses character offsets: pass --offsets chars)"
    return ""


# ------------------------------------------------------------------------------------------------------------
# Char -> token conversion


@dataclass
class SamplePositions:
    """Token positions of one sample's marker and targets, and how they were found.

    Token indices count the BOS token when `bos` is true. `marker_match`/`target_matches` are "exact",
    "fallback" (nearest token midpoint) or "failed". `after_marker[i]`: target i lies after the marker, so the
    marker cannot attend to it (causal mask). `on_marker[i]`: target i converts to the marker's own token, so its
    "attention" would be the marker's self-attention: it is not measured, knocked out or steered either.
    `conversion` ignores both (perfect/ok/fallback/failed); `status` adds "causal-violation", then
    "target-on-marker".
    """

    sample: Sample
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    marker_token: int | None
    marker_match: str
    target_tokens: list[int | None]
    target_matches: list[str]
    after_marker: list[bool]
    marker_text: str | None
    target_texts: list[str | None]
    conversion: str
    status: str
    bos: bool = False
    on_marker: list[bool] = field(default_factory=list)

    @property
    def unusable(self) -> list[bool]:
        """Per target: after the marker or on the marker's own token (no marker → target edge to measure)."""
        on = self.on_marker or [False] * len(self.target_tokens)
        return [a or o for a, o in zip(self.after_marker, on, strict=True)]

    @property
    def seq_len(self) -> int:
        return len(self.input_ids)


def char_to_token(offsets: Sequence[tuple[int, int]], c: int) -> tuple[int | None, str]:
    """PLIP-rs rule: first token with start <= c < end ("exact"), else the token whose integer midpoint is
    nearest to c, first on ties ("fallback"); ("failed") only when there are no tokens."""
    for i, (start, end) in enumerate(offsets):
        if start <= c < end:  # zero-width tokens can never satisfy this
            return i, "exact"
    if not offsets:
        return None, "failed"
    best = min(range(len(offsets)), key=lambda i: abs(c - (offsets[i][0] + offsets[i][1]) // 2))
    return best, "fallback"


def _marker_text_ok(text: str, pattern: str) -> bool:
    """PLIP's check that the marker token is the marker: its text contains the pattern, or the pattern
    starts with it. Leading whitespace is ignored: BPE tokenizers glue it to the next token (" #" before
    an indented `#[test]`), and it is not part of the marker."""
    text = text.lstrip()
    return pattern in text or (text != "" and pattern.startswith(text))


def encode_text(tokenizer: Any, code: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise PlipyError(
            f"tokenizer {type(tokenizer).__name__} gives no character offsets (not a fast tokenizer): "
            "char -> token conversion needs a fast (tokenizers-backed) tokenizer"
        )
    try:
        enc = tokenizer(code, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise PlipyError(f"tokenizer {type(tokenizer).__name__} gives no character offsets: {e}") from None
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def token_positions(
    sample: Sample, tokenizer: Any, bos: bool = False, max_length: int | None = None
) -> SamplePositions:
    """Convert a sample's marker and target characters to token indices with PLIP-rs's rule.

    `bos=True` prepends the tokenizer's BOS token (offsets (0, 0)) and shifts every position by one.
    `max_length`: the model's context; a longer sequence raises CorpusError.
    """
    ids, offs = encode_text(tokenizer, sample.code)
    shift = 0
    if bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise PlipyError(f"--bos: tokenizer {type(tokenizer).__name__} has no BOS token")
        ids, offs, shift = [int(bos_id), *ids], [(0, 0), *offs], 1
    if max_length is not None and len(ids) > max_length:
        raise CorpusError(
            [f"sample {sample.id!r} has {len(ids)} tokens, longer than the model's context ({max_length})"]
        )

    raw_offs = offs[shift:]  # convert on the real tokens only, so BOS is never a fallback match

    def convert(c: int) -> tuple[int | None, str]:
        i, how = char_to_token(raw_offs, c)
        return (None if i is None else i + shift), how

    def text(i: int | None) -> str | None:
        return None if i is None else tokenizer.decode([ids[i]], skip_special_tokens=False)

    marker, marker_match = convert(sample.marker_char_pos)
    converted = [convert(c) for c in sample.target_char_positions]
    targets = [t for t, _ in converted]
    matches = [how for _, how in converted]
    after = [marker is not None and t is not None and t > marker for t in targets]
    on = [marker is not None and t == marker for t in targets]
    marker_text = text(marker)

    if marker is None or any(t is None for t in targets):
        conversion = "failed"
    elif marker_match != "exact" or any(m != "exact" for m in matches):
        conversion = "fallback"
    elif marker_text is not None and _marker_text_ok(marker_text, sample.marker_pattern):
        conversion = "perfect"
    else:
        conversion = "ok"
    status = conversion
    if conversion != "failed" and any(after):
        status = "causal-violation"
    elif conversion != "failed" and any(on):
        status = "target-on-marker"

    return SamplePositions(
        sample=sample,
        input_ids=ids,
        offsets=offs,
        marker_token=marker,
        marker_match=marker_match,
        target_tokens=targets,
        target_matches=matches,
        after_marker=after,
        marker_text=marker_text,
        target_texts=[text(t) for t in targets],
        conversion=conversion,
        status=status,
        bos=bos,
        on_marker=on,
    )


def corpus_positions(
    corpus: Corpus,
    tokenizer: Any,
    groups: Iterable[str] | str | None = None,
    bos: bool = False,
    max_length: int | None = None,
) -> list[SamplePositions]:
    """`token_positions` for every sample of the chosen groups; over-long samples are reported together."""
    out: list[SamplePositions] = []
    too_long: list[str] = []
    for s in corpus.samples(groups):
        try:
            out.append(token_positions(s, tokenizer, bos=bos, max_length=max_length))
        except CorpusError as e:
            too_long.extend(e.problems)
    if too_long:
        raise CorpusError(too_long, corpus.path)
    return out


def valid_targets(sp: SamplePositions, exact_only: bool = False) -> list[int]:
    """Target tokens the marker can attend to: converted, not after the marker and not the marker's own token
    (duplicates kept, in order).

    `exact_only=True` also drops fallback matches (what PLIP's knockout/steering tools do). Empty when the
    marker has no token.
    """
    if sp.marker_token is None:
        return []
    return [
        t
        for t, bad, how in zip(sp.target_tokens, sp.unusable, sp.target_matches, strict=True)
        if t is not None and not bad and (how == "exact" or not exact_only)
    ]
