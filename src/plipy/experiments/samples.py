"""Sample preparation shared by the corpus experiments (scan, knockout, steering): the groups a run compares, each
sample's identity and positions in a result, and the marker rows of a left-padded forward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from plipy.corpus import Corpus, SamplePositions
from plipy.engine import Capture, Engine
from plipy.engine.batch import pad_id, pad_left
from plipy.engine.runner import last_logits_only
from plipy.errors import ParameterError, PlipyError
from plipy.finite import require_finite
from plipy.models import LoadedModel

DEFAULT_GROUPS = ("python_doctest", "rust_test")


def choose_groups(corpus: Corpus, groups: Sequence[str] | None) -> tuple[list[str], tuple[str, str]]:
    """All groups to measure, and the two the test compares (each needs ≥ 2 samples: checked here, before any
    model loads)."""
    chosen, pair = _choose_groups(corpus, groups)
    for g in pair:
        if len(corpus.groups[g]) < 2:
            raise PlipyError(
                f"group {g!r} has {len(corpus.groups[g])} sample(s): comparing groups needs at least 2 "
                "each; add samples or name other --groups"
            )
    return chosen, pair


def _choose_groups(corpus: Corpus, groups: Sequence[str] | None) -> tuple[list[str], tuple[str, str]]:
    names = corpus.group_names
    if groups:
        unknown = [g for g in groups if g not in names]
        if unknown:
            raise PlipyError(f"unknown group(s) {', '.join(unknown)}; the corpus has: {', '.join(names)}")
        if len(groups) < 2:
            raise ParameterError("groups", "name at least two groups to compare")
        return list(groups), (groups[0], groups[1])
    if all(g in names for g in DEFAULT_GROUPS):
        return list(DEFAULT_GROUPS), DEFAULT_GROUPS
    if len(names) < 2:
        raise PlipyError(f"the corpus has {len(names)} group(s); a scan compares two")
    return names, (names[0], names[1])


def identity(sp: SamplePositions) -> dict[str, Any]:
    """The fields that name a sample and its token positions in every result."""
    return {
        "id": sp.sample.id,
        "group": sp.sample.group,
        "n_tokens": sp.seq_len,
        "marker_token": sp.marker_token,
        "marker_text": sp.marker_text,
        "target_tokens": sp.target_tokens,
    }


def after_marker(sp: SamplePositions) -> list[int | None]:
    """The target tokens that come after the marker (causally unreachable from it)."""
    return [t for t, a in zip(sp.target_tokens, sp.after_marker, strict=True) if a]


def marker_rows(
    lm: LoadedModel, engine: Engine, sps: Sequence[SamplePositions], layers: Sequence[int]
) -> list[torch.Tensor]:
    """Each sample's marker row at every layer of `layers`, `[layers, heads, keys]` float32 on the CPU, from one
    left-padded forward (only the last position's logits are computed: the rows need none)."""
    padded = pad_left([sp.input_ids for sp in sps], pad_id(lm.tokenizer), lm.device)
    capture = Capture(rows=padded.shift([[int(sp.marker_token or 0)] for sp in sps]), layers=list(layers))
    with torch.inference_mode(), engine.run(capture=capture) as cap:
        out = lm.model(padded.ids, **padded.forward_kwargs(), **last_logits_only(lm.model))
    # A NaN in a layer no row is captured from (SDPA there) shows up in the logits: a broken model, not a result.
    require_finite(out.logits[:, -1], "the next-token logits")
    att = torch.stack([cap.attn[layer][:, :, 0] for layer in layers], 1).cpu()  # [B, L, H, T]
    return [att[i, :, :, pad:] for i, pad in enumerate(padded.pads)]
