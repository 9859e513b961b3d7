"""The option grammars shared by the Python API and the CLI: layers, heads, groups, numbers.

One grammar each, so `plipy.scan(..., layers="0-2")`, `layers=[0, 1, 2]` and `plipy scan --layers 0-2` mean the
same. Errors are `ParameterError`s naming the parameter; the CLI shows the matching flag instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from plipy.errors import ParameterError

LAYERS_GRAMMAR = "all | plip (n/3…n−1) | A-B | a,b,c"
HEADS_GRAMMAR = "all | none | A-B | a,b,c"


MAX_SPAN = 1_000_000  # no model has this many layers, heads or tokens: a longer range is a typo, never expanded
MAX_RESAMPLES = 1_000_000  # bootstrap / permutation resamples: beyond this the p-value resolution gains nothing


def _ranges(value: Any, param: str, what: str) -> list[tuple[int, int]]:
    """Parse `3`, `[3, 5]`, `"3,5"`, `"0-4"` and mixes like `"0-2,7"` into inclusive ranges (not expanded, not
    bounds-checked: `0-99999999999999` costs nothing here)."""
    if isinstance(value, bool):
        raise ParameterError(param, f"expected {what} indices, got {value!r}")
    if isinstance(value, int):
        return [(value, value)]
    if not isinstance(value, str):
        try:
            return [(int(v), int(v)) for v in value]
        except (TypeError, ValueError):
            raise ParameterError(param, f"expected {what} indices, got {value!r}") from None
    out: list[tuple[int, int]] = []
    for part in value.split(","):
        a, b = _bounds(part.strip(), value, param, what)
        if a > b:  # outside _bounds' try: a ParameterError is a ValueError too
            raise ParameterError(param, f"range {part.strip()!r} is empty: the start must not exceed the end")
        out.append((a, b))
    return out


def indices(value: Any, *, param: str, what: str) -> list[int]:
    """The integers a selection names (`3`, `[3, 5]`, `"0-2,7"`), in order, for callers that check their own
    bounds (token positions may count from the end); a span beyond `MAX_SPAN` is refused, never expanded."""
    out: list[int] = []
    for a, b in _ranges(value, param, what):
        if b - a >= MAX_SPAN:
            raise ParameterError(param, f"{what} range {a}-{b} is longer than any model has {what}s")
        out.extend(range(a, b + 1))
    return out


def _bounds(part: str, value: str, param: str, what: str) -> tuple[int, int]:
    """`A-B` → (A, B); `A` → (A, A)."""
    try:
        if "-" in part.lstrip("-"):
            a, b = (int(x) for x in part.split("-", 1))
            return a, b
        return int(part), int(part)
    except ValueError:
        grammar = LAYERS_GRAMMAR if what == "layer" else HEADS_GRAMMAR
        raise ParameterError(param, f"cannot read {value!r}: use {grammar}") from None


def _checked(ranges: list[tuple[int, int]], n: int, param: str, what: str) -> list[int]:
    """The sorted unique values of `ranges`, all in 0…n−1 (else an error naming the worst value and how many are
    out of range, counted without expanding the ranges)."""
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    below = [(a, min(b, -1)) for a, b in merged if a < 0]
    above = [(max(a, n), b) for a, b in merged if b >= n]
    bad = below + above
    if bad:  # name the worst value; a long range is summarised, never listed
        count = sum(b - a + 1 for a, b in bad)
        lo, hi = bad[0][0], bad[-1][1]
        more = "" if count == 1 else f" ({count} values out of range: {lo}…{hi})"
        raise ParameterError(param, f"{what} {hi} does not exist: the model has {n} {what}s (0-{n - 1}){more}")
    return [v for a, b in merged for v in range(a, b + 1)]


def check_selection(value: Any, *, param: str, what: str = "layer") -> None:
    """The grammar of a layer or head selection, checked before any model loads (its bounds need the model)."""
    if value is None or isinstance(value, list | tuple) and not value and what == "head":
        return
    if isinstance(value, str):
        text = value.strip()
        grammar = LAYERS_GRAMMAR if what == "layer" else HEADS_GRAMMAR
        if not text:
            raise ParameterError(param, f"is empty: use {grammar}")
        if text in ("all", "plip" if what == "layer" else "none"):
            return
    ranges = _ranges(value, param, what)
    if any(a < 0 for a, _ in ranges):
        raise ParameterError(param, f"{what} indices start at 0, got {min(a for a, _ in ranges)}")


def plip_layers(n_layers: int) -> list[int]:
    """PLIP-rs' default scan range: n/3 … n−1."""
    return list(range(n_layers // 3, n_layers))


def plip_default_layer(n_layers: int) -> int:
    """PLIP-rs' default knockout and steering layer: 20 for ≥ 32 layers, 16 for ≥ 28, else 14 (clipped to the
    model)."""
    layer = 20 if n_layers >= 32 else 16 if n_layers >= 28 else 14
    return min(layer, n_layers - 1)


def layer_label(layers: Sequence[int]) -> str:
    """`5`, `3-7` for a contiguous range, else `1,4,9`."""
    ls = sorted(layers)
    if len(ls) == 1:
        return str(ls[0])
    if ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return ",".join(map(str, ls))


def parse_layers(value: Any, n_layers: int, *, param: str = "layers") -> list[int]:
    """Layers from None/"all" (every layer), "plip", an int, a list, "A-B" or "a,b,c" → sorted unique indices."""
    if value is None:
        return list(range(n_layers))
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ParameterError(param, f"is empty: use {LAYERS_GRAMMAR}")
        if text == "all":
            return list(range(n_layers))
        if text == "plip":
            return plip_layers(n_layers)
    vals = _checked(_ranges(value, param, "layer"), n_layers, param, "layer")
    if not vals:
        raise ParameterError(param, f"names no layer: use {LAYERS_GRAMMAR}")
    return vals


def parse_heads(value: Any, n_heads: int, *, param: str = "heads", all_as_none: bool = False) -> list[int] | None:
    """Query heads from None/"all", "none" (an identity run), an int, a list, "A-B" or "a,b,c".

    With `all_as_none`, every head is None (the engine's "every head", the same numbers as listing them)."""
    if value is None or (isinstance(value, str) and value.strip() == "all"):
        return None if all_as_none else list(range(n_heads))
    if isinstance(value, str):
        if not value.strip():
            raise ParameterError(param, f"is empty: use {HEADS_GRAMMAR}")
        if value.strip() == "none":
            return []
    return _checked(_ranges(value, param, "head"), n_heads, param, "head")


HEAD_SITE_GRAMMAR = "L12H3 or 12.3 (layer 12, query head 3; L12.H3 as results label it), comma-separated"
LAYER_HEADS_GRAMMAR = (
    f"{HEAD_SITE_GRAMMAR} (heads of layers) or {HEADS_GRAMMAR} (those heads of every layer from the first)"
)
_HEAD_SITE = re.compile(r"L?(\d+)(?:\.H?|H)(\d+)", re.IGNORECASE)


def read_head_site(text: str) -> tuple[int, int] | None:
    """(layer, head) of one head written `L12H3`, `L12.H3` (as results label it) or `12.3`; None if it is none of
    these. The one spelling of a head of a layer everywhere (SAE heads, patching receivers)."""
    m = _HEAD_SITE.fullmatch(text.strip())
    return (int(m[1]), int(m[2])) if m else None


def _named_heads(text: str, first: int | None, param: str) -> list[tuple[int, int]]:
    """`L12H3,14.0` → [(12, 3), (14, 0)]; a head in a layer before `first` is refused (nothing there can change)."""
    out = []
    for part in text.split(","):
        site = read_head_site(part)
        if site is None:
            raise ParameterError(param, f"cannot read head {part!r}: write {HEAD_SITE_GRAMMAR}")
        la, h = site
        if first is not None and la < first:
            raise ParameterError(
                param, f"{part.strip()} is in layer {la}, before the first steered layer {first}: it cannot change"
            )
        out.append((la, h))
    return out


def check_layer_heads(value: Any, *, first: int | None = None, param: str = "heads") -> None:
    """The grammar of `parse_layer_heads`, checked before any model loads (its bounds need the model)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    if text.strip() == "all":
        return
    if _names_layers(text):
        _named_heads(text, first, param)
    else:
        check_selection(text, param=param, what="head")


def _names_layers(text: str) -> bool:
    """Whether a head list names heads of layers (`L12H3`, `12.3`) rather than head numbers (`0,3`, `0-4`)."""
    return "H" in text.upper() or "." in text


def parse_layer_heads(
    value: Any, n_layers: int, n_heads: int, *, first: int | None = None, param: str = "heads"
) -> list[tuple[int, int]] | None:
    """(layer, head) pairs: `L12H3,L14H0` names heads of layers; the head grammar (`0,3`, `0-4`) names those heads
    in every layer from `first` on; `all` every head of every layer; None/'' → None (the caller's default)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    if text.strip() == "all":
        return [(la, h) for la in range(n_layers) for h in range(n_heads)]
    if not _names_layers(text):
        hs = parse_heads(text, n_heads, param=param) or []
        return [(la, h) for la in range(first or 0, n_layers) for h in hs]
    out = _named_heads(text, first, param)
    for (la, h), part in zip(out, text.split(","), strict=True):
        if not (0 <= la < n_layers and 0 <= h < n_heads):
            raise ParameterError(
                param, f"head {part!r} does not exist (layers 0-{n_layers - 1}, heads 0-{n_heads - 1})"
            )
    return out


def check_alpha(value: float, *, param: str = "alpha") -> float:
    """A significance level: a number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ParameterError(param, f"must be a number between 0 and 1 (exclusive), got {value!r}")
    return value


def parse_groups(value: Any, *, param: str = "groups") -> list[str] | None:
    """Groups from None (the default), "a,b", ["a", "b"] or ["a,b"] → a list of names."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = [g.strip() for item in items for g in str(item).split(",") if g.strip()]
    if not out:
        raise ParameterError(param, "names no group")
    repeated = sorted({g for g in out if out.count(g) > 1})
    if repeated:  # `A,A` would compare a group with itself
        raise ParameterError(param, f"names {', '.join(repeated)} more than once")
    return out


def parse_floats(value: Any, *, param: str) -> list[float]:
    """Finite numbers from "0.5,1,2", a number or a list."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        items: Sequence[Any] = [value]
    elif isinstance(value, str):
        items = [x for x in value.split(",") if x.strip()]
    else:
        items = list(value)
    try:
        out = [float(x) for x in items]
    except (TypeError, ValueError):
        raise ParameterError(param, f"cannot read {value!r}: use comma-separated numbers, e.g. 0.5,1,2") from None
    bad = [x for x in out if not math.isfinite(x)]
    if bad:
        raise ParameterError(param, f"must be finite numbers, got {bad}")
    return out


def check_positive(value: int, *, param: str, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer option that must be ≥ `minimum` (and ≤ `maximum` when it has one): resamples, batch sizes,
    limits. Every count is bounded by what it can mean before any work starts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(param, f"must be an integer ≥ {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ParameterError(param, f"must be at most {maximum:,}, got {value:,}")
    return value


def check_resamples(value: int, *, param: str = "resamples") -> int:
    """Bootstrap / permutation resamples: 1 … MAX_RESAMPLES."""
    return check_positive(value, param=param, maximum=MAX_RESAMPLES)


def check_seed(value: int, *, param: str = "seed") -> int:
    """A random seed: an integer 0 … 2³²−1 (what numpy's generators accept)."""
    return check_positive(value, param=param, minimum=0, maximum=2**32 - 1)


def check_choice(value: str, choices: Sequence[str], *, param: str) -> str:
    """A value from a fixed set."""
    if value not in choices:
        raise ParameterError(param, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_batch_size(value: int | None, *, param: str = "batch_size") -> int | None:
    """Inputs per forward: None (the device's default) or an integer ≥ 1."""
    return None if value is None else check_positive(value, param=param)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value: Any, *, param: str = "device_map") -> Any:
    """None, one of accelerate's strategies (auto, balanced, balanced_low_0, sequential), a module → device dict,
    or a JSON file holding one."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ParameterError(param, f"expected {' | '.join(DEVICE_MAPS)}, a JSON file or a dict, got {value!r}")
    if value in DEVICE_MAPS:
        return value
    import json
    from pathlib import Path

    p = Path(value)
    if not p.is_file():
        raise ParameterError(param, f"{value!r} is neither {' | '.join(DEVICE_MAPS)} nor a JSON file")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ParameterError(param, f"{p}: not a JSON module → device map ({e})") from None
    if not isinstance(data, dict) or not data:
        raise ParameterError(param, f"{p}: expected a JSON object of module → device")
    return data


def parse_max_memory(value: Any, *, param: str = "max_memory") -> dict[Any, str] | None:
    """None, a dict, or "0=20GiB,1=20GiB,cpu=60GiB" → {0: "20GiB", 1: "20GiB", "cpu": "60GiB"} (GPU indices as
    integers, as accelerate wants them)."""
    if value is None or isinstance(value, dict):
        return value
    out: dict[Any, str] = {}
    for item in str(value).split(","):
        dev, sep, amount = item.strip().partition("=")
        if not sep or not dev.strip() or not amount.strip():
            raise ParameterError(param, f"cannot read {item!r}: use DEVICE=AMOUNT pairs, e.g. 0=20GiB,cpu=60GiB")
        dev = dev.strip()
        out[int(dev) if dev.isdigit() else dev] = amount.strip()
    return out


# -- the logit lens and the probes ---------------------------------------------------------------------------------

POSITION_WORDS = ("last", "all", "marker")
POSITIONS_GRAMMAR = "last | all | marker | token indices such as 0,5,-1"
PROBE_FEATURES = ("last", "marker")
PROBE_LABELS = ("group", "prefix")


def check_top_k(value: int, *, vocab_size: int | None = None, param: str = "top_k") -> int:
    """Tokens per layer: an integer ≥ 1, and, once the model is known, at most its vocabulary (a larger k lists
    nothing more and claims a k the result does not have)."""
    check_positive(value, param=param)
    if vocab_size is not None and value > vocab_size:
        raise ParameterError(param, f"must be at most the vocabulary size ({vocab_size:,} tokens), got {value:,}")
    return value


def check_positions(value: Any, *, marker: bool, param: str = "positions") -> None:
    """The grammar of lens positions (`last`, `all`, `marker`, token indices), before any model loads; `marker`:
    whether the text has a marker (a corpus sample)."""
    if isinstance(value, str) and value.strip() == "marker" and not marker:
        raise ParameterError(param, "'marker' needs a corpus sample (sample=…, --sample)")
    if isinstance(value, str) and value.strip() in POSITION_WORDS:
        return
    _position_indices(value, param)


def _position_indices(value: Any, param: str) -> list[int]:
    if isinstance(value, str) and not value.strip():
        raise ParameterError(param, f"is empty: use {POSITIONS_GRAMMAR}")
    try:
        return indices(value, param=param, what="position")
    except ParameterError:
        raise ParameterError(param, f"cannot read {value!r}: use {POSITIONS_GRAMMAR}") from None


def parse_positions(value: Any, n_tokens: int, marker: int | None = None, *, param: str = "positions") -> list[int]:
    """Token indices from "last", "all", "marker", an int, a list or "0,5,-1" (negative from the end), each within
    the text's `n_tokens`; unique, in the order given."""
    if isinstance(value, str) and value.strip() in POSITION_WORDS:
        word = value.strip()
        if word == "last":
            return [n_tokens - 1]
        if word == "all":
            return list(range(n_tokens))
        if marker is None:
            raise ParameterError(param, "'marker' needs a corpus sample (sample=…, --sample) whose marker has a token")
        return [marker]
    raw = _position_indices(value, param)
    bad = [p for p in raw if not -n_tokens <= p < n_tokens]
    if bad:
        raise ParameterError(
            param,
            f"position {bad[0]} does not exist: the text has {n_tokens} tokens "
            f"(0-{n_tokens - 1}, or -{n_tokens}…-1 from the end)",
        )
    out: list[int] = []
    for p in raw:
        p = p % n_tokens
        if p not in out:
            out.append(p)
    return out


def check_tokens(value: Any, *, param: str = "tokens") -> list[int | str]:
    """Tokens to follow: token ids (≥ 0) or non-empty strings, one or a list; checked before any model loads (whether
    a string is one token, and an id in the vocabulary, needs the tokenizer: `parse_tokens`)."""
    items = [value] if isinstance(value, (str, int)) else list(value or ())
    for t in items:
        if isinstance(t, bool) or not (isinstance(t, int) or (isinstance(t, str) and t)):
            raise ParameterError(param, f"expected token ids or non-empty strings, got {t!r}")
        if isinstance(t, int) and t < 0:
            raise ParameterError(param, f"token id {t} does not exist: ids start at 0")
    return items


def parse_tokens(tokenizer: Any, value: Sequence[int | str], vocab_size: int, *, param: str = "tokens") -> list[int]:
    """Vocabulary ids of tokens: ids as given (below `vocab_size`), strings that are exactly one token (no special
    tokens); unique, in the order given."""
    out: list[int] = []
    for t in check_tokens(value, param=param):
        if isinstance(t, int):
            if not t < vocab_size:
                raise ParameterError(param, f"token id {t} does not exist: the vocabulary has {vocab_size} entries")
            tid = t
        else:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                pieces = [tokenizer.decode([i]) for i in ids]
                raise ParameterError(
                    param,
                    f"{t!r} is {len(ids)} tokens {pieces}, not one: give a single token "
                    "(e.g. one of those pieces) or its id",
                )
            tid = int(ids[0])
        if tid not in out:
            out.append(tid)
    return out


def check_folds(value: int, *, param: str = "folds") -> int:
    """Stratified k-fold splits: 2 … MAX_SPAN (a run uses fewer when a class is smaller)."""
    return check_positive(value, param=param, minimum=2, maximum=MAX_SPAN)


def check_permutations(value: int, *, param: str = "permutations") -> int:
    """Shuffled-label refits per layer: 0 (no control) … MAX_RESAMPLES."""
    return check_positive(value, param=param, minimum=0, maximum=MAX_RESAMPLES)


def check_positive_number(value: Any, *, param: str) -> float:
    """A finite number > 0 (a regularisation strength), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
        raise ParameterError(param, f"must be a positive finite number, got {value!r}")
    return float(value)


# -- steering: layers, doses, numbers ------------------------------------------------------------------------------


def check_layer(value: Any, *, param: str = "layer") -> int:
    """One layer index (an integer ≥ 0), checked before any model loads (its bound needs the model)."""
    import operator

    try:
        index = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        index = None
    if index is None:
        raise ParameterError(param, f"expected one layer index, got {value!r}")
    if index < 0:
        raise ParameterError(param, f"layer indices start at 0, got {index}")
    return index


def _several_layers() -> ParameterError:
    return ParameterError(
        "target_attention", "needs a single layer: with several, each layer's pre-edit row depends on α"
    )


def check_steered_layers(layer: Any, layers: Any, *, target_attention: float | None = None) -> None:
    """`layer` (one) or `layers` (a selection), not both, in their grammar; a target attention needs one layer.
    Checked before any model loads; `steered_layers` checks the bounds on the model."""
    if layer is not None and layers is not None:
        raise ParameterError("layers", "give layer or layers, not both")
    if layer is not None:
        check_layer(layer)
    check_selection(layers, param="layers")
    if target_attention is None or layers is None or isinstance(layers, str) and layers.strip() in ("all", "plip"):
        return  # "all" and "plip" count layers on the model
    ranges = _ranges(layers, "layers", "layer")
    if any(a != b for a, b in ranges) or len({a for a, _ in ranges}) > 1:
        raise _several_layers()


def steered_layers(layer: Any, layers: Any, n_layers: int, *, target_attention: float | None = None) -> list[int]:
    """The layers a steering run edits, bounds-checked on the model: `layers`, else `layer`, else PLIP's default
    layer (`plip_default_layer`). A target attention needs exactly one."""
    if layers is not None:
        out = parse_layers(layers, n_layers)
    elif layer is not None:
        out = parse_layers(check_layer(layer), n_layers, param="layer")
    else:
        out = [plip_default_layer(n_layers)]
    if target_attention is not None and len(out) != 1:
        raise _several_layers()
    return out


def parse_doses(value: Any, *, target_attention: float | None = None, param: str = "doses") -> list[float]:
    """Steering scales α from "0.5,1,2", a number or a list: finite and ≥ 0 (0 cuts the edges); none at all only
    with a target attention (it runs alone)."""
    doses = parse_floats(value, param=param)
    bad = [d for d in doses if d < 0]
    if bad:
        raise ParameterError(param, f"must be ≥ 0, got {bad}")
    if not doses and target_attention is None:
        raise ParameterError(param, "no dose to run: give at least one scale, or a target_attention")
    return doses


def check_number(value: Any, *, param: str, minimum: float = 0.0) -> float:
    """A real option that must be finite and ≥ `minimum` (a scale α, a temperature); NaN and ∞ are refused here,
    before any model loads, rather than minutes later."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ParameterError(param, f"must be a finite number ≥ {minimum:g}, got {value!r}")
    return value


def check_fraction(value: Any, *, param: str) -> float:
    """A value strictly between 0 and 1 (an attention weight to reach)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ParameterError(param, f"must be in (0, 1), got {value!r}")
    return value


def check_regexes(patterns: Sequence[str], *, param: str) -> None:
    """Every pattern compiles as a Python regular expression."""
    import re

    for p in patterns:
        try:
            re.compile(p)
        except (re.error, TypeError) as e:
            raise ParameterError(param, f"bad regex {p!r}: {e}") from None


def parse_choices(value: Any, choices: Sequence[str], *, param: str) -> list[str]:
    """Several values from a fixed set, from "a,b" or a list, in the order given (each once)."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else [value]
    out = [str(x).strip() for item in items for x in str(item).split(",") if str(x).strip()]
    if not out:
        raise ParameterError(param, f"names nothing: use one or more of {', '.join(choices)}")
    for x in out:
        check_choice(x, choices, param=param)
    repeated = sorted({x for x in out if out.count(x) > 1})
    if repeated:
        raise ParameterError(param, f"names {', '.join(repeated)} more than once")
    return out


def _int_pair(item: Any) -> tuple[int, int] | None:
    """(layer, head) from a pair of integers, None from anything else."""
    try:
        layer, head = (int(x) for x in item)
    except (TypeError, ValueError):
        return None
    return layer, head


def parse_head_sites(
    value: Any, n_layers: int | None = None, n_heads: int | None = None, *, param: str
) -> list[tuple[int, int]]:
    """(layer, head) pairs from "14.3,L16H2", [(14, 3)] or ["14.3"], sorted and each once; checked against the
    model's sizes when given (without them: the grammar only, before any model loads)."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, Sequence) else [value]
    out: set[tuple[int, int]] = set()
    for item in items:
        site = read_head_site(item) if isinstance(item, str) else _int_pair(item)
        if site is None:
            raise ParameterError(param, f"cannot read {item!r}: use {HEAD_SITE_GRAMMAR}")
        layer, head = site
        if layer < 0 or head < 0:
            raise ParameterError(param, f"{layer}.{head}: layers and heads count from 0")
        if n_layers is not None and layer >= n_layers:
            raise ParameterError(param, f"layer {layer} does not exist: the model has {n_layers} layers")
        if n_heads is not None and head >= n_heads:
            raise ParameterError(param, f"head {head} does not exist: the model has {n_heads} query heads")
        out.add((layer, head))
    if not out:
        raise ParameterError(param, f"names no head: use {HEAD_SITE_GRAMMAR}")
    return sorted(out)
