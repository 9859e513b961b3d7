"""Left-padded batches: several sequences in one forward, each item computing what it would compute alone.

HF decoders take positions from `position_ids` (or count them from the cache), not from the attention mask, so a
left-padded item gets its own positions, 0 at its first real token, exactly as `generate()` builds them; otherwise
RoPE (or GPT-2's absolute embeddings) would see shifted positions. Padding keys are masked (weight exactly 0), so an
item's numbers equal its unpadded run up to fp32 rounding: matmuls of other shapes may round differently.

Batches are planned from the lengths alone (sorted by length, then cut), so the same inputs always form the same
batches: a resumed run recomputes a half-finished batch bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Padded tokens per forward beyond which a batch is cut (long inputs run in smaller batches): bounds activations
# and the [batch, 1, T, T] boolean mask a padded batch needs.
MAX_BATCH_TOKENS = 16384


def default_batch_size(device: Any) -> int:
    """Inputs per forward when none is given: 16 on CPU (amortises per-call overhead on short inputs), 64 on GPUs."""
    return 64 if torch.device(device).type == "cuda" else 16


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices grouped into batches of ≤ `batch_size` inputs of similar length (≤ `max_tokens` padded tokens, one
    input at least). Deterministic: it depends on the lengths only."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in cur] + [lengths[i]])
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * longest > max_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class Padded:
    """A left-padded batch: `ids`/`mask`/`positions` `[B, T]`, and each item's number of padding tokens."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    pads: list[int]

    def forward_kwargs(self) -> dict[str, torch.Tensor]:
        """What a forward needs beyond `input_ids`; nothing when no item is padded (then the batch runs exactly
        like unpadded inputs: the causal mask needs no tensor and positions count from 0)."""
        if not any(self.pads):
            return {}
        return {"attention_mask": self.mask, "position_ids": self.positions}

    def shift(self, rows: Sequence[Sequence[int]]) -> list[list[int]]:
        """Per-item positions of the unpadded sequences → positions in the padded batch."""
        return [[int(r) + pad for r in rs] for rs, pad in zip(rows, self.pads, strict=True)]


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu") -> Padded:
    """Left-pad token sequences to one length, with the attention mask and per-item positions `generate()` uses."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pad_left needs one or more non-empty sequences")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pads = []
    for i, s in enumerate(seqs):
        pad = width - len(s)
        ids[i, pad:] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, pad:] = 1
        pads.append(pad)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return Padded(ids.to(device), mask.to(device), positions.to(device), pads)


def pad_id(tokenizer: Any) -> int:
    """The token padding is written with (its value never matters: padded keys are masked)."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0
