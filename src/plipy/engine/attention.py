"""The one attention function plipy registers with transformers (every architecture calls it the same way).

Layers with nothing to do delegate to HF's own SDPA function, so an idle engine computes exactly what
`attn_implementation="sdpa"` computes. Layers with captures or edits compute only the query rows involved
explicitly (eager maths: scores, softcap, mask, edits, softmax) and, where an edit changed a row, replace that
row of the SDPA output. Gemma-2-style softcapping has no SDPA path, so those layers run eagerly in full.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from plipy.engine.arch import softmax_upcast
from plipy.engine.spec import LayerEdit, Record
from plipy.errors import CausalEdgeError, MaskedRowError, PlipyError

NAME = "plipy"


@dataclass
class ActivePlan:
    """A compiled run: which layers capture what, which edits apply, and where results go."""

    owner: int  # id() of the model this plan is for
    capture_layers: frozenset[int]
    rows: torch.Tensor | None  # [batch or 1, r] absolute positions
    want_scores: bool
    want_value_norms: bool
    want_values: bool
    edits: dict[int, list[LayerEdit]]
    record: Record
    residual: Any = None  # plipy.engine.residual.ResidualPlan
    calls: dict[int, int] = field(default_factory=dict)


ACTIVE: ContextVar[ActivePlan | None] = ContextVar("plipy_active_plan", default=None)


def register() -> None:
    """Register the attention function and its mask builder (idempotent, process-global)."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, plipy_attention)
    # Without the mask entry transformers passes attention_mask=None: the causal mask silently disappears.
    if NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(NAME, sdpa_mask)


def plipy_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for one layer: SDPA when idle, row-wise explicit maths where asked to capture or edit."""
    plan = ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if plan is not None and getattr(module, "_plipy_owner", None) != plan.owner:
        plan = None
    edits = plan.edits.get(layer, ()) if plan is not None else ()
    capture = plan is not None and layer in plan.capture_layers
    if (edits or capture) and _keys_dropped(query, key, kwargs, edits, plan.rows if capture else None, layer):
        edits, capture = (), False  # nothing asked for lies in this call
    softcap = kwargs.get("softcap")
    # Full explicit rows: softcapping has no SDPA kernel, and eager mode reproduces HF eager op for op.
    full = softcap is not None or getattr(module, "_plipy_eager", False)
    if not edits and not capture and not full:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    key, value, offset = _causal_keys(query, key, value, attention_mask)
    q_len = query.shape[2]
    cap_rows = _capture_rows_in_chunk(plan, offset, q_len, query.device) if capture else None
    capture = cap_rows is not None
    chunk_edits = _edits_in_chunk(edits, offset, q_len, query.shape[0])
    rows = _rows_to_compute(cap_rows, chunk_edits, offset, q_len, full, query.device)
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    probs, scores, bias_rows = _explicit_rows(
        module, query, key, value, attention_mask, rows, offset, scaling, softcap, chunk_edits, layer
    )
    n_rep = query.shape[1] // key.shape[1]
    value_full = _repeat_kv(value, n_rep)
    if full:
        out = torch.matmul(probs, value_full).transpose(1, 2).contiguous()
    else:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)[0]
        out = _patch_edited_rows(out, probs, value_full, rows, bias_rows)

    if capture:
        _record_capture(plan, layer, probs, scores, rows, cap_rows, value, value_full)
    return out, None


def _causal_keys(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The keys/values this call attends over and the absolute position of query row 0 → (key, value, offset)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1 and k_len > q_len:
        # Mirrors HF's SDPA path: a skipped mask with extra keys (static-cache prefill) means upper-left causal.
        return key[:, :, :q_len], value[:, :, :q_len], 0
    return key, value, k_len - q_len  # offset: absolute position of query row 0 (dynamic cache)


def _keys_dropped(query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any], edits: Any,
                  rows: torch.Tensor | None, layer: int | None) -> bool:
    """True when a sliding-window cache dropped keys before this call (generate()'s default cache past the
    window) and no edit query or capture row can lie in it; such a call runs as if idle. Position ids never exceed
    the absolute index (left padding only lowers them), so one at or beyond the key count means keys are missing,
    and nothing before the smallest one is in this call. Anything that may be in it is refused: neither its
    absolute position nor its keys' can be known."""
    pos = kwargs.get("position_ids")
    if kwargs.get("sliding_window") is None or pos is None or query.shape[2] >= key.shape[2]:
        return False
    if int(pos.max()) < key.shape[2]:
        return False
    first = int(pos.min())
    wanted = [q for e in edits for _b, q, _k in e.edges] + ([] if rows is None else rows.flatten().tolist())
    if any(q >= first for q in wanted):
        raise PlipyError(
            f"layer {layer}: the KV cache kept only the last {key.shape[2]} keys (a sliding-window cache), so "
            "plipy cannot place captures or edits on the tokens being generated; generate with a cache that keeps "
            "every position: model.generate(..., past_key_values=transformers.DynamicCache())"
        )
    return True


def _capture_rows_in_chunk(
    plan: ActivePlan, offset: int, q_len: int, device: torch.device
) -> torch.Tensor | None:
    """The plan's capture rows local to this call's query chunk, or None when they are not all in it."""
    cap_rows = plan.rows.to(device) - offset
    if ((cap_rows < 0) | (cap_rows >= q_len)).any():
        return None  # rows not in this call (e.g. a later generation step)
    return cap_rows


def _rows_to_compute(
    cap_rows: torch.Tensor | None,
    chunk_edits: list[tuple[int | None, int, int, list[int] | None, float]],
    offset: int,
    q_len: int,
    full: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """Sorted local query rows to compute explicitly (all of them when `full`); None: nothing to do here."""
    local_rows: list[torch.Tensor] = []
    if cap_rows is not None:
        local_rows.append(cap_rows.flatten())
    for _b, q, _k, _h, _v in chunk_edits:
        local_rows.append(torch.tensor([q - offset], device=device))
    if full:
        return torch.arange(q_len, device=device)
    if local_rows:
        return torch.unique(torch.cat(local_rows))  # sorted
    return None


def _patch_edited_rows(
    out: torch.Tensor, probs: torch.Tensor, value_full: torch.Tensor, rows: torch.Tensor, bias_rows: torch.Tensor
) -> torch.Tensor:
    """The SDPA output with only the rows an edit changed recomputed, so untouched rows stay bit-identical."""
    if bias_rows.any():
        b_idx, r_idx = bias_rows.nonzero(as_tuple=True)
        new = torch.matmul(probs[b_idx, :, r_idx].unsqueeze(2), value_full[b_idx]).squeeze(2)
        out = out.clone()
        out[b_idx, rows[r_idx]] = new.to(out.dtype)
    return out


def _record_capture(
    plan: ActivePlan,
    layer: int | None,
    probs: torch.Tensor,
    scores: torch.Tensor,
    rows: torch.Tensor,
    cap_rows: torch.Tensor,
    value: torch.Tensor,
    value_full: torch.Tensor,
) -> None:
    """Store the captured rows' probabilities (and, if asked, scores and values) in the plan's record."""
    slot = torch.searchsorted(rows, cap_rows)  # [batch or 1, r] → index into computed rows
    b = probs.shape[0]
    slot = slot.expand(b, -1) if slot.shape[0] == 1 else slot
    gather = slot[:, None, :, None].expand(b, probs.shape[1], slot.shape[1], probs.shape[-1])
    rec = plan.record
    rec.attn[layer] = probs.gather(2, gather).detach().float()
    if plan.want_scores:
        rec.scores[layer] = scores.gather(2, gather).detach().float()
    if plan.want_value_norms:
        rec.value_norms[layer] = value_full.detach().float().norm(dim=-1)
    if plan.want_values:
        rec.values[layer] = value.detach().clone()


def _edits_in_chunk(
    edits: list[LayerEdit], offset: int, q_len: int, batch: int
) -> list[tuple[int | None, int, int, list[int] | None, float]]:
    """The edits whose query lies in this call's query chunk, flattened to (batch, q, k, heads, bias)."""
    out = []
    for e in edits:
        for b, q, k in e.edges:
            if offset <= q < offset + q_len:
                if b is not None and not 0 <= b < batch:
                    raise MaskedRowError(f"edge for batch item {b}, but the batch has {batch} items")
                out.append((b, q, k, e.heads, e.bias))
    return out


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # GQA from shapes: GPT-2 and GPT-NeoX have no num_key_value_groups attribute.
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _explicit_rows(
    module, query, key, value, mask, rows, offset, scaling, softcap, chunk_edits, layer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager attention for the given local query rows → (probs, scores, rows-with-bias [batch, r] bool)."""
    b, n_heads, _, d = query.shape
    n_rep = n_heads // key.shape[1]
    k_len = key.shape[2]
    # All rows: use the query as is, so the matmul is eager's own (a copied layout can round differently).
    q_sel = query if rows.numel() == query.shape[2] else query.index_select(2, rows)
    scores = torch.matmul(q_sel, _repeat_kv(key, n_rep).transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap  # before the mask, as Gemma-2's eager does
    if mask is None:
        allowed = torch.arange(k_len, device=query.device)[None, None, None, :] <= (rows + offset)[None, None, :, None]
        allowed = allowed.expand(b, 1, -1, -1)
    elif mask.dtype == torch.bool:
        allowed = mask.index_select(2, rows).expand(b, -1, -1, -1)
    else:
        m = mask.index_select(2, rows)
        scores = scores + m.to(scores.dtype)
        allowed = (m > torch.finfo(m.dtype).min / 2).expand(b, -1, -1, -1)
    upcast = softmax_upcast(module)
    scores = scores.float() if upcast else scores
    scores = scores.masked_fill(~allowed, -math.inf)

    probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if upcast else None)
    # Rows the model's own mask empties (left-padding queries) are 0, not NaN; no edit can reach them.
    probs = torch.nan_to_num(probs, nan=0.0)
    bias_rows = torch.zeros(b, rows.numel(), dtype=torch.bool, device=query.device)
    if chunk_edits:
        # exp(bias) = α applied after the softmax and renormalised: the same function as adding log α to the
        # score, without rounding log α into a score of magnitude ~10–30 in fp32.
        factor = torch.ones_like(probs)
        for eb, q, k, heads, val in chunk_edits:
            r = int(torch.searchsorted(rows, torch.tensor(q - offset, device=rows.device)))
            bs = slice(None) if eb is None else slice(eb, eb + 1)
            if k >= k_len or not allowed[bs, 0, r, k].all():
                raise CausalEdgeError(
                    f"layer {layer}: edge query {q} → key {k} is masked for this query (causality, padding or "
                    "a sliding window): there is no attention to remove or steer"
                )
            hs = slice(None) if heads is None else heads
            factor[bs, hs, r, k] *= math.exp(val)
            bias_rows[bs, r] = True
        edited = (factor != 1).any(-1, keepdim=True)
        probs = probs * factor
        total = probs.sum(-1, keepdim=True)
        dead = edited.squeeze(-1) & (total.squeeze(-1) == 0)
        if dead.any():
            bi, hi, ri = dead.nonzero(as_tuple=True)
            raise MaskedRowError(
                f"layer {layer}: the intervention removes every key of query row {int(rows[ri[0]]) + offset} "
                f"(batch item {int(bi[0])}, head {int(hi[0])}): softmax over no keys is undefined"
            )
        probs = torch.where(edited, probs / total, probs)  # untouched rows stay bit-identical
        scores = scores + factor.log()  # the equivalent pre-softmax scores, for the record
    probs = probs.to(query.dtype)
    return probs, scores, bias_rows
