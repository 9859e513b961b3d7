"""The token view's data: a sample's code as tokens, coloured by one query row's attention at a chosen layer and
head (or the mean of the metric's heads), with a layer slider, a head picker and per-target bars (drawn by
page.js).

Rows travel as base64 of little-endian float32, exactly the captured values: smaller than decimal text rounded to
four digits (4 bytes → 5.3 characters), decoded without loss, and cut after the query token (later keys are
causally masked: exactly 0). Any result kind with attention rows can use it (`Section.tokens(key, payload(...))`).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TokenSample:
    """One sample of the token view. `rows`: [layers, heads, keys] attention of the query (marker) token."""

    id: str
    group: str
    tokens: list[str]
    marker: int
    targets: list[int]
    rows: Any
    after: list[int] = field(default_factory=list)  # targets after the marker (causally unreachable)
    values: list[float] | None = None  # the result's own per-layer metric, shown beside the view


def encode_rows(rows: Any, marker: int) -> str:
    """Base64 of the rows' keys 0…marker as little-endian float32 (the values exactly as captured)."""
    a = np.ascontiguousarray(np.asarray(rows, dtype=np.float32)[:, :, : marker + 1], dtype="<f4")
    return base64.b64encode(a.tobytes()).decode("ascii")


def payload(
    samples: Sequence[TokenSample],
    layers: Sequence[int],
    metric_heads: Sequence[int],
    *,
    initial_sample: int = 0,
    initial_layer: int | None = None,
    value_name: str = "attention",
) -> dict[str, Any]:
    """The token view's JSON: per sample its tokens, marker, targets and encoded rows; the layer/head choices."""
    if not samples:
        raise ValueError("a token view needs at least one sample")
    n_heads = int(np.asarray(samples[0].rows).shape[1])
    return {
        "layers": [int(x) for x in layers],
        "n_heads": n_heads,
        "metric_heads": [int(h) for h in metric_heads],
        "value_name": value_name,
        "samples": [
            {
                "id": s.id,
                "group": s.group,
                "tokens": list(s.tokens),
                "marker": int(s.marker),
                "targets": [int(t) for t in s.targets],
                "after": [int(t) for t in s.after],
                "values": s.values,
                "keys": int(s.marker) + 1,
                "rows": encode_rows(s.rows, s.marker),
            }
            for s in samples
        ],
        "initial": {
            "sample": int(initial_sample),
            "layer": int(initial_layer if initial_layer is not None else layers[-1]),
            "head": "mean",
        },
    }
