"""The option grammars shared by the Python API and the CLI: layers, heads, groups, numbers.

One grammar each, so `plipy.scan(..., layers="0-2")`, `layers=[0, 1, 2]` and `plipy scan --layers 0-2` mean the
same. Errors are `ParameterError`s naming the parameter; the CLI shows the matching flag instead.
"""

from __future__ import annotations

import math
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


LAYER_HEADS_GRAMMAR = "LAYER.HEAD[,LAYER.HEAD…], e.g. 14.3,16.2"


def parse_layer_heads(
    value: Any, n_layers: int | None = None, n_heads: int | None = None, *, param: str
) -> list[tuple[int, int]]:
    """(layer, head) pairs from "14.3,16.2", [(14, 3)] or ["14.3"], sorted and each once; checked against the
    model's sizes when given (without them: the grammar only, before any model loads)."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, Sequence) else [value]
    out: set[tuple[int, int]] = set()
    for item in items:
        try:
            layer, head = (int(x) for x in (item.strip().split(".") if isinstance(item, str) else item))
        except (TypeError, ValueError):
            raise ParameterError(param, f"cannot read {item!r}: use {LAYER_HEADS_GRAMMAR}") from None
        if layer < 0 or head < 0:
            raise ParameterError(param, f"{layer}.{head}: layers and heads count from 0")
        if n_layers is not None and layer >= n_layers:
            raise ParameterError(param, f"layer {layer} does not exist: the model has {n_layers} layers")
        if n_heads is not None and head >= n_heads:
            raise ParameterError(param, f"head {head} does not exist: the model has {n_heads} query heads")
        out.add((layer, head))
    if not out:
        raise ParameterError(param, f"names no head: use {LAYER_HEADS_GRAMMAR}")
    return sorted(out)
