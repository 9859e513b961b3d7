"""Corpus tools: make a corpus from code (`plipy corpus convert`), repair positions that are a few characters off
(`plipy corpus verify --fix`), and list a sample's tokens (`plipy corpus show`).

Conversion follows PLIP-rs' `convert_corpus` by string search, one rule per kind of sample:

| rule | marker (first occurrence, tried in order) | targets |
|---|---|---|
| `python` | `>>>` | `def`, the function name, each parameter name (before `=` / `:`) |
| `rust` | `#[test]`, else `#[cfg(test)]` | `fn`, the name, each parameter name (before `:`) |
| `rust-universal` | `#[test]`, else `#[cfg(test)]` | `fn`, the name, the `(` or `<` after it (the bundled corpus) |
| `rust-baseline` | `#[` | `struct` and its name if any, `fn`, the fn name |
| `pytest` | `def test_` | the first function not named `test_*`: `def`, name, parameters |
| `go-test` | `func Test` | the first function not named `Test*`: `func`, name, parameter names |

Targets come from the first definition (PLIP-rs: the first `def`/`fn`); `skip` skips definitions by name. A
sample without a marker or a definition is reported and left out (PLIP-rs silently put the marker at 0). Every
field of a rule can be overridden, which covers other languages' test markers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from plipy.corpus import SAMPLE_FIELDS, SamplePositions, byte_to_char, read_groups
from plipy.errors import PlipyError

PARAM_STYLES = ("python", "rust", "go", "paren", "none")
CODE_SUFFIXES = {".py": "python", ".rs": "rust", ".go": "go-test"}
FIX_WINDOW = 8  # a position is repaired only when the right place is at most this many characters away


@dataclass(frozen=True)
class Rule:
    """How to find a sample's marker and targets by string search."""

    name: str
    markers: tuple[str, ...]
    keyword: str  # the definition keyword with its trailing space: "def ", "fn ", "func "
    params: str = "python"  # python | rust | go | paren (the ( or < after the name) | none
    skip: str | None = None  # regex: definitions whose name matches are not the target function
    struct: bool = False  # rust-baseline: `struct` and its name come first
    group: str = "samples"  # the corpus group converted samples go to by default


RULES: dict[str, Rule] = {
    "python": Rule("python", (">>>",), "def ", "python", group="python_doctest"),
    "rust": Rule("rust", ("#[test]", "#[cfg(test)]"), "fn ", "rust", group="rust_test"),
    "rust-universal": Rule("rust-universal", ("#[test]", "#[cfg(test)]"), "fn ", "paren", group="rust_test"),
    "rust-baseline": Rule("rust-baseline", ("#[",), "fn ", "none", struct=True, group="rust_baseline"),
    "pytest": Rule("pytest", ("def test_",), "def ", "python", skip=r"test_", group="python_pytest"),
    "go-test": Rule("go-test", ("func Test",), "func ", "go", skip=r"Test", group="go_test"),
}


def rule(name: str, **overrides: Any) -> Rule:
    """A built-in rule, with fields overridden (`markers`, `keyword`, `params`, `skip`, `struct`, `group`)."""
    if name not in RULES:
        raise PlipyError(f"unknown rule {name!r}; one of {', '.join(RULES)}")
    over = {k: v for k, v in overrides.items() if v is not None}
    if "markers" in over:
        over["markers"] = tuple(over["markers"])
        if not over["markers"] or not all(isinstance(m, str) and m for m in over["markers"]):
            raise PlipyError("a marker must be a non-empty string")
    if over.get("params", "python") not in PARAM_STYLES:
        raise PlipyError(f"params must be one of {', '.join(PARAM_STYLES)}, got {over['params']!r}")
    if "skip" in over:
        try:
            re.compile(over["skip"])
        except re.error as e:
            raise PlipyError(f"bad skip regex {over['skip']!r}: {e}") from None
    return replace(RULES[name], **over)


def rule_for_group(group: str) -> str:
    """PLIP-rs' rule of a corpus group: rust_baseline, rust_*, else python."""
    if group == "rust_baseline":
        return "rust-baseline"
    return "rust" if group.startswith("rust") else "python"


# -- finding markers and targets -----------------------------------------------------------------------------------


def find_marker(code: str, r: Rule) -> tuple[int, str] | None:
    """(position, pattern) of the first occurrence of the first marker pattern that occurs."""
    for m in r.markers:
        i = code.find(m)
        if i >= 0:
            return i, m
    return None


def _definition(code: str, r: Rule) -> int | None:
    """Where the target function's keyword starts: the first definition whose name the rule does not skip."""
    start = 0
    while (i := code.find(r.keyword, start)) >= 0:
        name = code[i + len(r.keyword) :]
        if r.skip is None or not re.match(r.skip, name):
            return i
        start = i + 1
    return None


def _param_name(param: str, style: str) -> str:
    t = param.strip()
    if style == "python":
        return t.split("=", 1)[0].split(":", 1)[0].strip()
    if style == "rust":
        return t.split(":", 1)[0].strip()
    return t.split()[0] if t.split() else ""  # go: `a, b int` → a, b


def _params(code: str, open_paren: int, style: str) -> list[int]:
    """Each parameter name's position, PLIP-rs' way: split the text between the parentheses on commas and find
    each name from the running offset."""
    close = code.find(")", open_paren)
    if close < 0:
        return []
    out, offset = [], open_paren + 1
    for param in code[open_paren + 1 : close].split(","):
        name = _param_name(param, style)
        if name:
            j = code.find(name, offset)
            if j >= 0:
                out.append(j)
        offset += len(param) + 1
    return out


def function_targets(code: str, r: Rule) -> list[int]:
    """The target positions of one sample under a rule (empty: no definition found)."""
    out: list[int] = []
    if r.struct and (s := code.find("struct ")) >= 0:
        out.append(s)
        rest = code[s + 7 :]
        end = next((k for k, ch in enumerate(rest) if ch in "{( \t\n\r"), None)
        if end:
            out.append(s + 7)
    d = _definition(code, r)
    if d is None:
        return out
    name_at = d + len(r.keyword)
    if r.params == "none":  # PLIP-rs' rust-baseline: keyword and name, no parameters
        return [*out, d, name_at]
    out.append(d)
    rest = code[name_at:]
    name_end = next((k for k, ch in enumerate(rest) if ch in "(<"), None)
    if name_end is None:
        return out
    if name_end > 0:
        out.append(name_at)
    if r.params == "paren":
        return [*out, name_at + name_end]
    paren = rest.find("(")
    return out + (_params(code, name_at + paren, r.params) if paren >= 0 else [])


def convert_sample(sid: str, code: str, r: Rule) -> tuple[dict[str, Any] | None, str | None]:
    """A universal-format sample, or (None, why it cannot be converted)."""
    found = find_marker(code, r)
    if found is None:
        return None, f"no marker ({' or '.join(repr(m) for m in r.markers)} not found)"
    targets = function_targets(code, r)
    if not targets:
        return None, f"no target ({r.keyword.strip()!r} definition not found)"
    pos, pattern = found
    return {
        "id": sid,
        "code": code,
        "marker_char_pos": pos,
        "marker_pattern": pattern,
        "target_char_positions": targets,
    }, None


# -- inputs ----------------------------------------------------------------------------------------------------------


@dataclass
class Snippet:
    id: str
    code: str
    group: str | None = None
    rule: str | None = None
    origin: str = ""


def _rows_of(path: Path) -> list[Snippet]:
    """Snippets of a JSON / JSON Lines file: a list or JSON Lines of {code, id?, group?, rule?}, or an object of
    groups {group: [{id, code, …}]} (a legacy or universal PLIP corpus)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        except json.JSONDecodeError as e:
            raise PlipyError(f"{path}: neither JSON nor JSON Lines (line {e.lineno}: {e.msg})") from None
    if isinstance(data, dict):
        if isinstance(data.get("samples"), list):
            data = data["samples"]
        else:
            data = [
                {**s, "group": g}
                for g, items in data.items()
                if not g.startswith("_") and isinstance(items, list)
                for s in items
            ]
    if not isinstance(data, list):
        raise PlipyError(f"{path}: expected a list of snippets or an object of groups")
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict) or not isinstance(row.get("code"), str) or not row["code"]:
            raise PlipyError(f'{path}: snippet {i} has no "code" string')
        out.append(
            Snippet(
                str(row.get("id", f"{path.stem}_{i}")), row["code"], row.get("group"), row.get("rule"), f"{path}:{i}"
            )
        )
    return out


def input_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files `read_inputs` reads: each file named, and the code files of each folder named."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in CODE_SUFFIXES)
            if not files:
                raise PlipyError(f"{p}: no code files ({', '.join(CODE_SUFFIXES)}) in this folder")
        elif p.is_file():
            files = [p]
        else:
            raise PlipyError(f"{p}: no such file or folder")
        out.extend(files)
    return out


def check_not_input(out: str | Path, files: Iterable[Path]) -> None:
    """Refuse an output that is one of the input files (the same file by any name: path, link or hard link)."""
    if not Path(out).exists():
        return
    for f in files:
        if os.path.samefile(out, f):
            raise PlipyError(f"--out {out} is the input {f}: writing the corpus there would destroy it")


def read_inputs(paths: Iterable[str | Path]) -> list[Snippet]:
    """Snippets from code files (one sample each, id = file name), folders of them, and JSON / JSONL files."""
    out: list[Snippet] = []
    for p in paths:
        for f in input_files([p]):
            try:
                if f.suffix in (".json", ".jsonl"):
                    out.extend(_rows_of(f))
                else:
                    out.append(
                        Snippet(f.stem, f.read_text(encoding="utf-8"), None, CODE_SUFFIXES.get(f.suffix), str(f))
                    )
            except UnicodeDecodeError as e:
                raise PlipyError(f"{f}: not UTF-8 text ({e.reason})") from None
    return out


def convert(
    snippets: Sequence[Snippet], rule_name: str | None = None, group: str | None = None, **overrides: Any
) -> tuple[dict[str, Any], list[dict[str, str | None]]]:
    """A universal corpus document from snippets, and the snippets left out (with why). The rule of a snippet:
    `rule_name`, else its own, else its group's (PLIP-rs' mapping), else `python`; overrides apply to every rule."""
    groups: dict[str, list[dict[str, Any]]] = {}
    skipped: list[dict[str, str | None]] = []
    seen: dict[str, int] = {}
    for sn in snippets:
        name = rule_name or sn.rule or (rule_for_group(sn.group) if sn.group else "python")
        r = rule(name, **overrides)
        sid = sn.id
        if sid in seen:  # two files with one name in different folders
            seen[sid] += 1
            sid = f"{sid}_{seen[sn.id]}"
        seen.setdefault(sid, 0)
        sample, why = convert_sample(sid, sn.code, r)
        if sample is None:
            skipped.append({"id": sid, "origin": sn.origin, "rule": r.name, "reason": why})
            continue
        groups.setdefault(group or sn.group or r.group, []).append(sample)
    if not groups:
        raise PlipyError("nothing converted: " + "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:5]))
    doc = {"_format_version": "2.0", "_description": "converted by plipy corpus convert", **groups}
    _, problems = read_groups(doc, "chars")
    if problems:  # cannot happen for found markers; a guard against writing a corpus that does not load
        raise PlipyError("the converted corpus does not validate: " + "; ".join(problems[:5]))
    return doc, skipped


def corpus_bytes(doc: dict[str, Any]) -> bytes:
    """A corpus document as the file plipy writes: indented UTF-8 JSON (code stays readable)."""
    from plipy.io import json_bytes

    return json_bytes(doc)


# -- repairing positions ---------------------------------------------------------------------------------------------


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def suspicious_target(code: str, t: int) -> bool:
    """A target on whitespace or inside an identifier (not at its first character) is a few characters off."""
    return code[t].isspace() or (t > 0 and _word(code[t]) and _word(code[t - 1]))


def _word_starts(code: str, lo: int, hi: int) -> list[int]:
    return [
        i
        for i in range(max(lo, 0), min(hi, len(code) - 1) + 1)
        if _word(code[i]) and (i == 0 or not _word(code[i - 1]))
    ]


def fix_target(code: str, t: int, window: int = FIX_WINDOW) -> int | None:
    """Where an off target belongs: inside an identifier → that identifier's start; on whitespace → the nearest
    identifier start (the following one on a tie); None if none is within `window` characters."""
    if _word(code[t]):
        i = t
        while i > 0 and _word(code[i - 1]):
            i -= 1
        return i if t - i <= window else None
    starts = _word_starts(code, t - window, t + window)
    if not starts:
        return None
    return min(starts, key=lambda i: (abs(i - t), i < t))


def fix_marker(code: str, pos: int, pattern: str, window: int = FIX_WINDOW) -> int | None:
    """The occurrence of `pattern` nearest to `pos` within `window` characters (the earlier on a tie), or None."""
    near = [m.start() for m in re.finditer(re.escape(pattern), code) if abs(m.start() - pos) <= window]
    return min(near, key=lambda i: (abs(i - pos), i)) if near else None


def _show(code: str, i: int) -> str:
    return repr(code[max(0, i - 6) : i] + "⟨" + code[i : i + 8] + "⟩")


def _fix_sample(
    s: dict[str, Any], ref: str, offsets: str, window: int, changes: list[str], unfixable: list[str]
) -> dict[str, Any]:
    """One sample with its marker and targets repaired (every change and every failure appended as a line)."""
    code = s["code"]

    def to_char(p: int) -> int | None:
        return p if offsets == "chars" else byte_to_char(code, p)

    def from_char(c: int) -> int:
        return c if offsets == "chars" else len(code[:c].encode())

    out = dict(s)
    pattern, pos = s["marker_pattern"], to_char(s["marker_char_pos"])
    if pos is None or code[pos : pos + len(pattern)] != pattern:
        new = fix_marker(code, pos if pos is not None and 0 <= pos <= len(code) else len(code), pattern, window)
        if new is None:
            unfixable.append(
                f"{ref}: marker_pattern {pattern!r} is not within {window} characters of "
                f"marker_char_pos {s['marker_char_pos']}"
            )
        else:
            out["marker_char_pos"] = from_char(new)
            changes.append(
                f"{ref}: marker_char_pos {s['marker_char_pos']} → {out['marker_char_pos']} ({_show(code, new)})"
            )
    targets = list(s["target_char_positions"])
    for k, t in enumerate(targets):
        c = to_char(t)
        if c is None or not 0 <= c < len(code):
            unfixable.append(f"{ref}: target_char_positions[{k}] {t} is outside the code")
            continue
        if not suspicious_target(code, c):
            continue
        new = fix_target(code, c, window)
        if new is None:
            unfixable.append(
                f"{ref}: target_char_positions[{k}] {t} ({_show(code, c)}) has no identifier start "
                f"within {window} characters"
            )
            continue
        targets[k] = from_char(new)
        changes.append(f"{ref}: target_char_positions[{k}] {t} → {targets[k]} ({_show(code, c)} → {_show(code, new)})")
    out["target_char_positions"] = targets
    return out


def fix_document(
    doc: dict[str, Any], offsets: str = "chars", window: int = FIX_WINDOW
) -> tuple[dict[str, Any], list[str], list[str]]:
    """(repaired document, changes, problems left). Markers not at their pattern move to the nearest occurrence;
    targets on whitespace or inside an identifier move to the identifier's start. A sample with missing or
    mistyped fields is left as it is and reported."""
    out: dict[str, Any] = {}
    changes: list[str] = []
    unfixable: list[str] = []
    for key, value in doc.items():
        if key.startswith("_") or not isinstance(value, list):
            out[key] = value
            continue
        fixed = []
        for i, s in enumerate(value):
            ref = f"sample {s['id']!r}" if isinstance(s, dict) and isinstance(s.get("id"), str) else f"{key}[{i}]"
            if (
                not isinstance(s, dict)
                or not all(f in s for f in SAMPLE_FIELDS)
                or not isinstance(s["code"], str)
                or not s["code"]
                or not isinstance(s["marker_char_pos"], int)
                or not isinstance(s["marker_pattern"], str)
                or not s["marker_pattern"]
                or not isinstance(s["target_char_positions"], list)
                or not all(isinstance(t, int) for t in s["target_char_positions"])
            ):
                unfixable.append(f"{ref}: not a well-formed sample (fields {', '.join(SAMPLE_FIELDS)})")
                fixed.append(s)
                continue
            fixed.append(_fix_sample(s, ref, offsets, window, changes, unfixable))
        out[key] = fixed
    if not unfixable:
        _, problems = read_groups(out, offsets)
        unfixable.extend(problems)
    return out, changes, unfixable


# -- showing a sample ------------------------------------------------------------------------------------------------


def token_rows(sp: SamplePositions) -> list[dict[str, Any]]:
    """One row per token of a sample: index, text, character span, and whether it is the marker or a target."""
    roles: dict[int, list[str]] = {}
    if sp.marker_token is not None:
        roles.setdefault(sp.marker_token, []).append("marker" + ("~" if sp.marker_match == "fallback" else ""))
    for k, (t, how, after) in enumerate(zip(sp.target_tokens, sp.target_matches, sp.after_marker, strict=True)):
        if t is not None:
            roles.setdefault(t, []).append(
                f"target {k}" + ("~" if how == "fallback" else "") + (" (after marker)" if after else "")
            )
    rows = []
    for i, (tid, (a, b)) in enumerate(zip(sp.input_ids, sp.offsets, strict=True)):
        text = "<bos>" if sp.bos and i == 0 else sp.sample.code[a:b]
        rows.append({"index": i, "id": tid, "text": text, "start": a, "end": b, "role": ", ".join(roles.get(i, []))})
    return rows
