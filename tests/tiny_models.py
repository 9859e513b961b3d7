"""Tiny random configs of every supported architecture (for parity tests against HF eager and SDPA)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import torch
import transformers as tf
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

VOCAB = 128

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)


def _configs() -> dict:
    return {
        "qwen2": tf.Qwen2Config(**COMMON, num_key_value_heads=2, max_position_embeddings=128),
        "starcoder2": tf.Starcoder2Config(
            **COMMON, num_key_value_heads=2, sliding_window=4, use_bias=True, max_position_embeddings=128
        ),
        "gemma": tf.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=16, max_position_embeddings=128),
        "gemma2": tf.Gemma2Config(
            **COMMON,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=16,
            max_position_embeddings=128,
        ),
        "gemma3": tf.Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 4},
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=16,
            max_position_embeddings=128,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        ),
        "llama": tf.LlamaConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=128),
        "phi3": tf.Phi3Config(**COMMON, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0),
        "gpt2": tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128),
        "gpt_neox": tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            rotary_pct=0.5,
            max_position_embeddings=128,
        ),
    }


ARCHS = list(_configs())
SLIDING = {"starcoder2", "gemma2", "gemma3"}
NO_SDPA = {"gemma2"}


def build(arch: str, impl: str = "eager", seed: int = 0, **config: object) -> torch.nn.Module:
    """A tiny random model of `arch` with its own config object (configs are shared objects in HF); `config`
    overrides fields (e.g. `vocab_size=len(tokenizer)` to run on a real tokenizer's ids)."""
    torch.manual_seed(seed)
    cfg = copy.deepcopy(_configs()[arch])
    for key, value in config.items():
        setattr(cfg, key, value)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    # Non-trivial weights: random init is near-uniform attention, which would hide row/column mix-ups.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "ln" not in name and p.ndim >= 2:
                p.normal_(0, 0.15)
    return model.eval().requires_grad_(False)


def variant(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """A deep copy of `model` running attention implementation `impl` (same weights)."""
    m = copy.deepcopy(model)
    m.set_attn_implementation(impl)
    return m


# --- an independent reference: full eager attention with an explicit post-softmax edit -------------------------

REF = "plipy_test_reference"
REF_EDITS: dict = {}


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention written from scratch; edits multiply post-softmax weights and renormalise each row, or set
    the total weight of a row's keys (mass edits)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1)
    v = value.repeat_interleave(n_rep, dim=1)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if kwargs.get("softcap") is not None:
        w = torch.tanh(w / kwargs["softcap"]) * kwargs["softcap"]
    if attention_mask is not None:
        w = w + attention_mask
    # fp32 softmax as eager does (unedited layers then match eager exactly); the edit itself in fp64. A float64
    # model runs in float64 throughout: it is the exact answer the fp32 runs are measured against.
    out_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    p = torch.softmax(w, dim=-1, dtype=out_dtype).double()
    off = REF_EDITS.get("offset", 0)  # an item run alone without its left padding: positions shift
    for layer, q, kk, heads, alpha in REF_EDITS.get("edits", []):
        q, kk = q - off, kk - off
        if layer == module.layer_idx:
            hs = list(range(p.shape[1])) if heads is None else heads
            p[:, hs, q, kk] *= alpha
            p[:, hs, q, :] /= p[:, hs, q, :].sum(-1, keepdim=True)
    # mass edits: (layer, query, keys, heads, per-head mass) — the row's keys scaled to that total, the rest to 1 − it
    for layer, q, keys, heads, masses in REF_EDITS.get("masses", []):
        if layer == module.layer_idx:
            q, keys = q - off, [kk - off for kk in keys]
            others = [kk for kk in range(p.shape[-1]) if kk not in keys]
            for h, m in zip(range(p.shape[1]) if heads is None else heads, masses, strict=True):
                p[:, h, q, keys] *= m / p[:, h, q, keys].sum(-1, keepdim=True)
                p[:, h, q, others] *= (1 - m) / p[:, h, q, others].sum(-1, keepdim=True)
    REF_EDITS.setdefault("probs", {})[module.layer_idx] = p.to(out_dtype)
    out = torch.matmul(p.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, p.to(out_dtype)


EPS32 = torch.finfo(torch.float32).eps


def fp32_bound(ref32: torch.Tensor, ref64: torch.Tensor, ulps: int = 16) -> float:
    """How far an fp32 computation may fall from the float64 answer: 4× the error HF's own fp32 run makes on the
    same inputs, plus `ulps` ulps of the largest value. Both fp32 errors come from the same rounding, so the bound
    moves with the kernels torch picks (AVX-512, AVX2, scalar) instead of holding for one of them only."""
    err = (ref32.double() - ref64).abs().max().item()
    return 4 * err + ulps * EPS32 * ref64.abs().max().item()


def float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of `model` (same weights): the exact answer of the same computation."""
    return copy.deepcopy(model).double()


def batch_reference(model64: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw) -> SimpleNamespace:
    """HF's float64 run of a left-padded batch, item by item: each item's real tokens alone, at the positions they
    have in the batch, put back in the batch layout (zeros where padding was). Real rows never see padding (its
    weights are exactly 0), so this is the batch's exact answer; running the padded batch itself in float64 does not
    work: HF's eager float64 mask turns fully padded rows into NaN, which leaks into real rows through 0 · NaN."""
    B, T = ids.shape
    logits, atts, hids, probs = None, {}, {}, {}
    for b in range(B):
        pad = int((mask[b] == 0).sum())
        REF_EDITS["offset"] = pad
        REF_EDITS.pop("probs", None)  # only what this item's run records (none for a non-reference model)
        try:
            o = model64(ids[b : b + 1, pad:], position_ids=torch.arange(pad, T)[None], **kw)
        finally:
            REF_EDITS.pop("offset", None)
        if logits is None:
            logits = torch.zeros(B, T, o.logits.shape[-1], dtype=torch.float64)
        logits[b, pad:] = o.logits[0]
        for i, a in enumerate(o.attentions or ()):
            atts.setdefault(i, torch.zeros(B, a.shape[1], T, T, dtype=torch.float64))[b, :, pad:, pad:] = a[0]
        for i, h in enumerate(o.hidden_states or ()):
            hids.setdefault(i, torch.zeros(B, T, h.shape[-1], dtype=torch.float64))[b, pad:] = h[0]
        for i, p in REF_EDITS.get("probs", {}).items():
            probs.setdefault(i, torch.zeros(B, p.shape[1], T, T, dtype=torch.float64))[b, :, pad:, pad:] = p[0]
    return SimpleNamespace(
        logits=logits,
        attentions=[atts[i] for i in sorted(atts)],
        hidden_states=[hids[i] for i in sorted(hids)],
        probs=probs,
    )


def register_reference() -> None:
    AttentionInterface.register(REF, _reference_attention)
    AttentionMaskInterface.register(REF, eager_mask)


def batch_inputs(seed: int = 1, length: int = 10, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences; the second is left-padded by `pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).max())


def log(x: float) -> float:
    return -math.inf if x == 0 else math.log(x)
