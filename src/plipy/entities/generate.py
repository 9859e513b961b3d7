"""Batched generation for the attribute queries: greedy + K samples at T=1, seeded per (prompt, sample).

Every sampled row draws from its own torch.Generator seeded from sha256(seed, prompt, sample index), inside a logits
processor that turns the choice into a one-hot for HF's greedy step. So a query's samples do not depend on which other
queries share its batch (only float rounding of padded batches can differ), which makes per-query caching sound.
Sampling is full-vocabulary softmax at T=1 (no top-k / top-p), as upstream's vLLM SamplingParams(temperature=1.0).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from plipy.finite import require_finite
from plipy.models import LoadedModel

GREEDY = -1  # sample index of the greedy row


def row_seed(seed: int, prompt: str, j: int) -> int:
    """Deterministic 63-bit seed of sample j of one prompt."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{j}\x00{prompt}".encode()).digest()[:8], "big") >> 1


class _RowSampler:
    """Logits processor: greedy rows keep their logits; sampled rows get -inf except the token their own RNG drew."""

    def __init__(self, seeds: Sequence[int | None]):
        self.gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        require_finite(scores, "the next-token logits during generation")  # a NaN would still draw a "token"
        out = scores.clone()
        rows = [i for i, g in enumerate(self.gens) if g is not None]
        if not rows:
            return out
        probs = torch.softmax(scores[rows].float(), dim=-1).cpu()
        u = torch.stack([torch.rand(1, generator=self.gens[i], dtype=torch.float64) for i in rows]).float()
        cdf = probs.cumsum(-1)
        # Inverse-CDF draw; clamp guards u beyond the last cdf value by rounding.
        tok = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1).squeeze(-1)
        one_hot = torch.full((len(rows), scores.shape[-1]), float("-inf"), dtype=scores.dtype)
        one_hot[torch.arange(len(rows)), tok] = 0.0
        out[rows] = one_hot.to(scores.device)
        return out


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    k: int = 10,
    seed: int = 42,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    share_prefill: bool = True,
) -> list[dict[str, Any]]:
    """For each prompt `{"greedy": str, "samples": [K str]}`; `batch_size` = prompts per generate call (each
    becomes 1 + K rows: greedy + samples). `progress(n)` is called with the number of prompts finished.
    `share_prefill` runs each prompt once and copies its KV cache to its 1 + K rows (about half the compute)."""
    from transformers import GenerationConfig, LogitsProcessorList

    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per_batch = max(1, batch_size)
    cfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    old_side = tok.padding_side
    tok.padding_side = "left"  # decoder-only batches must end at the same position
    results: list[dict[str, Any]] = []
    try:
        for start in range(0, len(prompts), per_batch):
            chunk = list(prompts[start : start + per_batch])
            rows = [(p, j) for p in chunk for j in (GREEDY, *range(k))]
            sampler = _RowSampler([None if j == GREEDY else row_seed(seed, p, j) for p, j in rows])
            ids, mask, cache = _plain(lm, [p for p, _ in rows])
            if share_prefill and ids.shape[1] > 1:  # a 1-token batch has nothing to prefill
                ids, mask, cache = _shared_prefill(lm, chunk, k + 1)
            with torch.inference_mode():
                out = lm.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    **_cache_kw(lm.model, cache),
                    generation_config=cfg,
                    logits_processor=LogitsProcessorList([sampler]),
                )
            texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i in range(len(chunk)):
                block = texts[i * (k + 1) : (i + 1) * (k + 1)]
                results.append({"greedy": block[0], "samples": block[1:]})
            if progress is not None:
                progress(len(chunk))
    finally:
        tok.padding_side = old_side
    return results


def _plain(lm: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, None]:
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device), None


def _shared_prefill(lm: LoadedModel, prompts: list[str], copies: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Run the prompts minus their last token once, then repeat ids, mask and KV cache `copies` times per prompt;
    generate() then feeds only the last prompt token. Positions follow the attention mask, as generate() does."""
    from transformers import DynamicCache

    ids, mask, _ = _plain(lm, prompts)
    pos = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode():
        lm.model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=pos[:, :-1],
            **_cache_kw(lm.model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
    cache.batch_repeat_interleave(copies)
    return ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0), cache


def _cache_kw(model: Any, cache: Any) -> dict[str, Any]:
    """The KV cache as the keyword this transformers version expects (`cache` from 5.24, `past_key_values` before)."""
    from plipy.engine.runner import cache_argument

    return {cache_argument(model) or "past_key_values": cache}
