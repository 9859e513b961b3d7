"""The one attention function plipy registers with transformers (every architecture calls it the same way).

Layers with nothing to do delegate to HF's own SDPA function, so an idle engine computes exactly what
`attn_implementation="sdpa"` computes. Layers with captures or edits compute only the query rows involved
explicitly (eager maths: scores, softcap, mask, edits, softmax) and, where an edit changed a row, replace that
row of the SDPA output. Gemma-2-style softcapping has no SDPA path, so those layers run eagerly in full.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from plipy.engine.arch import softmax_upcast
from plipy.engine.spec import CompiledPatch, LayerEdit, Record
from plipy.errors import CausalEdgeError, MaskedRowError, NonFiniteError, PlipyError

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
    patches: dict[tuple[int, str], list[CompiledPatch]] | None = None  # (layer, "z" | "attn" | "mlp") → rows
    mix: dict[int, QKVMix] | None = None  # path patching: layers whose batch is real items + their twins


@dataclass(frozen=True)
class QKVMix:
    """Path patching at one layer: the batch holds n real items then their n twins (the same items' inputs with a
    sender's direct effect added); the real items' `heads` take their query, key or value (`inputs`) from the twin."""

    heads: tuple[int, ...]
    inputs: frozenset[str]


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
    plan, layer = _plan_for(module)
    edits: list[LayerEdit] = plan.edits.get(layer, []) if plan is not None else []
    capture = plan is not None and layer in plan.capture_layers
    mixed = _patching(plan, module, query, key, value, attention_mask, scaling, edits, layer, **kwargs)
    if mixed is not None:
        return mixed
    if (edits or capture) and _keys_dropped(query, key, kwargs, edits, _capture_rows(plan, capture), layer):
        edits, capture = [], False  # nothing asked for lies in this call
    softcap = kwargs.get("softcap")
    # Full explicit rows: softcapping has no SDPA kernel, and eager mode reproduces HF eager op for op.
    full = softcap is not None or getattr(module, "_plipy_eager", False)
    if not edits and not capture and not full:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    key, value, offset = _causal_keys(query, key, value, attention_mask)
    q_len = query.shape[2]
    cap_rows = _capture_rows_in_chunk(plan, offset, q_len, query.device) if plan is not None and capture else None
    chunk_edits = _edits_in_chunk(edits, offset, q_len, query.shape[0], query.device)
    masked = not full and _use_masked_sdpa(chunk_edits)
    rows = _rows_to_compute(cap_rows, [] if masked else chunk_edits, q_len, full, query.device)
    if plan is not None:
        plan.record.paths[layer] = "masked-sdpa" if masked else "full" if full else "explicit"
    out = None
    if masked:
        # Many knocked-out rows: SDPA itself with the edges removed from its mask (no T×T fp32 matrices).
        def idle() -> torch.Tensor:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)[0]

        out = _masked_sdpa(query, key, value, attention_mask, chunk_edits, offset, scaling, layer, idle)
        if rows is None:
            return out, None
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    row_edits = _edits_for_rows(chunk_edits, rows) if masked else chunk_edits
    probs, scores, bias_rows = _explicit_rows(
        module, query, key, value, attention_mask, rows, offset, scaling, softcap, row_edits, layer
    )
    n_rep = query.shape[1] // key.shape[1]
    value_full = _repeat_kv(value, n_rep)

    sdpa = partial(sdpa_attention_forward, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = _rows_output(full, out, probs, value_full, rows, bias_rows, sdpa)

    if plan is not None and cap_rows is not None:
        _record_capture(plan, layer, probs, scores, rows, cap_rows, value, value_full)
    return out, None


def _plan_for(module: torch.nn.Module) -> tuple[ActivePlan | None, int]:
    """The active plan when it is for this module's model (else None), and the module's layer index (-1: none;
    every attention module of an engine's model has one: `Engine` checks)."""
    plan = ACTIVE.get()
    if plan is not None and getattr(module, "_plipy_owner", None) != plan.owner:
        plan = None
    layer = getattr(module, "layer_idx", None)
    return plan, -1 if layer is None else layer


def _capture_rows(plan: ActivePlan | None, capture: bool) -> torch.Tensor | None:
    """The plan's capture rows when this layer captures."""
    return plan.rows if plan is not None and capture else None


def _rows_output(
    full: bool,
    out: torch.Tensor | None,
    probs: torch.Tensor,
    value_full: torch.Tensor,
    rows: torch.Tensor,
    bias_rows: torch.Tensor,
    idle: Any,
) -> torch.Tensor:
    """The layer's output from the explicit rows: all of them (`full`), else the SDPA output (`idle()`, unless a
    masked SDPA gave `out` already) with the rows an edit changed recomputed."""
    if full:
        return torch.matmul(probs, value_full).transpose(1, 2).contiguous()
    if out is None:
        out = _patch_edited_rows(idle()[0], probs, value_full, rows, bias_rows)
    return out


def _patching(
    plan: ActivePlan | None,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    edits: Any,
    layer: int | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None] | None:
    """What activation and path patching need of a layer's attention: the offset of its first query row (patch
    hooks place their rows with it) and, at a path-patching receiver layer, the mixed attention (else None)."""
    if plan is None:
        return None
    if plan.patches:
        plan.record.offsets[layer] = _causal_keys(query, key, value, attention_mask)[2]  # type: ignore[index]
    if plan.mix and layer in plan.mix:
        return _mixed(module, query, key, value, attention_mask, scaling, plan.mix[layer], edits, layer, **kwargs)
    return None


def _mixed(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    mix: QKVMix,
    edits: Any,
    layer: int | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a real + twin batch where the real items' mixed heads read the twin's query, key or value
    (explicit eager rows for every head; keys and values per query head, so one head of a GQA group can change)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    n = query.shape[0] // 2
    n_rep = query.shape[1] // key.shape[1]
    key, value, offset = _causal_keys(query, key, value, attention_mask)
    hs = torch.tensor(mix.heads, device=query.device, dtype=torch.long)
    query, key, value = query.clone(), _repeat_kv(key, n_rep).clone(), _repeat_kv(value, n_rep).clone()
    for name, t in (("q", query), ("k", key), ("v", value)):
        if name in mix.inputs:
            t[:n, hs] = t[n:, hs]
    rows = torch.arange(query.shape[2], device=query.device)
    chunk_edits = _edits_in_chunk(list(edits), offset, query.shape[2], query.shape[0], query.device)
    probs, _, _ = _explicit_rows(
        module, query, key, value, attention_mask, rows, offset, scaling, kwargs.get("softcap"), chunk_edits, layer
    )
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _causal_keys(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The keys/values this call attends over and the absolute position of query row 0 → (key, value, offset)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1 and k_len > q_len:
        # Mirrors HF's SDPA path: a skipped mask with extra keys (static-cache prefill) means upper-left causal.
        return key[:, :, :q_len], value[:, :, :q_len], 0
    return key, value, k_len - q_len  # offset: absolute position of query row 0 (dynamic cache)


def _keys_dropped(
    query: torch.Tensor,
    key: torch.Tensor,
    kwargs: dict[str, Any],
    edits: Any,
    rows: torch.Tensor | None,
    layer: int | None,
) -> bool:
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
    wanted = [int(e.q.max()) for e in edits if e.q.numel()] + ([] if rows is None else [int(rows.max())])
    if max(wanted, default=-1) >= first:
        raise PlipyError(
            f"layer {layer}: the KV cache kept only the last {key.shape[2]} keys (a sliding-window cache), so "
            "plipy cannot place captures or edits on the tokens being generated; generate with a cache that keeps "
            "every position: model.generate(..., past_key_values=transformers.DynamicCache())"
        )
    return True


def _capture_rows_in_chunk(plan: ActivePlan, offset: int, q_len: int, device: torch.device) -> torch.Tensor | None:
    """The plan's capture rows local to this call's query chunk, or None when they are not all in it."""
    assert plan.rows is not None, "a plan that captures has rows"  # Engine.run sets them with the capture layers
    cap_rows = plan.rows.to(device) - offset
    if ((cap_rows < 0) | (cap_rows >= q_len)).any():
        return None  # rows not in this call (e.g. a later generation step)
    return cap_rows


def _rows_to_compute(
    cap_rows: torch.Tensor | None, chunk_edits: list[ChunkEdit], q_len: int, full: bool, device: torch.device
) -> torch.Tensor | None:
    """Sorted local query rows to compute explicitly (all of them when `full`); None: nothing to do here."""
    if full:
        return torch.arange(q_len, device=device)
    local_rows = [e.q for e in chunk_edits]
    if cap_rows is not None:
        local_rows.append(cap_rows.flatten())
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
    layer: int,
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


@dataclass
class ChunkEdit:
    """One LayerEdit's edges that fall in this call's query chunk, on the call's device: `b` per edge (-1: every
    batch item), `q` local row, `k` key; a mass edit's `[E, heads]` masses."""

    b: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    heads: list[int] | None
    bias: float
    mass: torch.Tensor | None = None

    def per_item(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch item, local row, key, edge index) of every edited entry, edges for every item repeated per item."""
        every = self.b < 0
        src = torch.arange(len(self.b), device=self.b.device)
        b, q, k, i = self.b[~every], self.q[~every], self.k[~every], src[~every]
        if every.any():
            n = int(every.sum())
            items = torch.arange(batch, device=self.b.device).repeat_interleave(n)
            b = torch.cat([b, items])
            q = torch.cat([q, self.q[every].repeat(batch)])
            k = torch.cat([k, self.k[every].repeat(batch)])
            i = torch.cat([i, src[every].repeat(batch)])
        return b, q, k, i

    def part(self, keep: torch.Tensor) -> ChunkEdit:
        """The edges where `keep` holds."""
        mass = None if self.mass is None else self.mass[keep.to(self.mass.device)]
        return ChunkEdit(self.b[keep], self.q[keep], self.k[keep], self.heads, self.bias, mass)


def _edits_in_chunk(
    edits: list[LayerEdit], offset: int, q_len: int, batch: int, device: torch.device
) -> list[ChunkEdit]:
    """The edits whose query lies in this call's query chunk, as local-row tensors on the call's device."""
    out = []
    for e in edits:
        inside = (e.q >= offset) & (e.q < offset + q_len)
        if not inside.any():
            continue
        b = e.b[inside]
        if (b >= batch).any():
            raise MaskedRowError(f"edge for batch item {int(b.max())}, but the batch has {batch} items")
        mass = None if e.mass is None else e.mass[inside].to(device)
        out.append(
            ChunkEdit(b.to(device), (e.q[inside] - offset).to(device), e.k[inside].to(device), e.heads, e.bias, mass)
        )
    return out


def _edits_for_rows(chunk_edits: list[ChunkEdit], rows: torch.Tensor) -> list[ChunkEdit]:
    """The part of each chunk edit whose query row is one of `rows` (the rows computed explicitly)."""
    out = []
    for e in chunk_edits:
        keep = torch.isin(e.q, rows)
        if keep.any():
            out.append(e.part(keep))
    return out


# Knockouts editing at least this many query rows of a call go through SDPA with an edited mask rather than the
# explicit rows: explicit rows hold [batch, heads, rows, keys] fp32 matrices, a masked SDPA only a boolean mask.
MASKED_SDPA_MIN_ROWS = 16


def _use_masked_sdpa(chunk_edits: list[ChunkEdit]) -> bool:
    """Whether this call's edits are knockouts of many rows sharing one head set (the masked-SDPA case)."""
    if not chunk_edits or any(e.bias != -math.inf or e.mass is not None for e in chunk_edits):
        return False
    if len({None if e.heads is None else tuple(e.heads) for e in chunk_edits}) != 1:
        return False
    return int(torch.unique(torch.cat([e.q for e in chunk_edits])).numel()) >= MASKED_SDPA_MIN_ROWS


def _allowed(
    mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, offset: int, device: torch.device
) -> torch.Tensor:
    """The keys each query may see under the model's own mask: `[batch, 1, q_len, k_len]` bool."""
    if mask is None:
        causal = torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + offset
        return causal[None, None].expand(batch, 1, -1, -1)
    if mask.dtype == torch.bool:
        return mask[..., :k_len].expand(batch, 1, -1, -1)
    return (mask[..., :k_len] > torch.finfo(mask.dtype).min / 2).expand(batch, 1, -1, -1)


def _masked_sdpa(query, key, value, mask, chunk_edits, offset, scaling, layer, idle) -> torch.Tensor:
    """Attention output `[batch, q, heads, d]` with the chunk's knocked-out edges removed from SDPA's mask.

    Rows no edit touches keep `idle()`'s output bit for bit, unless most rows are edited: then one masked SDPA
    over every row is cheaper than the idle SDPA plus the edited rows."""
    b, n_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    base = _allowed(mask, b, q_len, k_len, offset, query.device)
    edited = base.clone()
    rows_all = []
    for e in chunk_edits:
        bi, qi, ki, _ = e.per_item(b)
        _check_allowed(base, bi, qi, ki, qi + offset, layer)
        edited[bi, 0, qi, ki] = False
        rows_all.append(qi)
        dead = ~edited[bi, 0, qi].any(-1)
        if dead.any():
            j = int(dead.nonzero()[0, 0])
            raise MaskedRowError(
                f"layer {layer}: the intervention removes every key of query row "
                f"{int(qi[j]) + offset} (batch item {int(bi[j])}): softmax over no keys is undefined"
            )
    rows = torch.unique(torch.cat(rows_all))
    heads = chunk_edits[0].heads
    hs = torch.arange(n_heads, device=query.device) if heads is None else torch.tensor(heads, device=query.device)
    n_rep = n_heads // key.shape[1]
    kv = torch.div(hs, n_rep, rounding_mode="floor")
    if heads is None and rows.numel() * 2 >= q_len:
        return _sdpa(query, _repeat_kv(key, n_rep), _repeat_kv(value, n_rep), edited, scaling)
    sub = _sdpa(query[:, hs][:, :, rows], key[:, kv], value[:, kv], edited[:, :, rows], scaling)  # [b, r, h, d]
    out = idle().clone()
    out[:, rows[:, None], hs[None, :]] = sub.to(out.dtype)
    return out


def _sdpa(query, key, value, mask, scaling) -> torch.Tensor:
    """Plain SDPA with an explicit boolean mask, output `[batch, q, heads, d]` as HF's attention functions give."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _check_allowed(
    allowed: torch.Tensor,
    bi: torch.Tensor,
    ri: torch.Tensor,
    ki: torch.Tensor,
    queries: torch.Tensor,
    layer: int | None,
) -> None:
    """CausalEdgeError unless every edge is a key its query can see under the model's own mask (`allowed`
    `[batch or 1, 1, rows, keys]`, indexed by row `ri`; `queries` are the absolute positions, for the message)."""
    ok = ki < allowed.shape[-1]
    ok[ok.clone()] = allowed[bi[ok] if allowed.shape[0] > 1 else 0, 0, ri[ok], ki[ok]]
    if not ok.all():
        j = int((~ok).nonzero()[0, 0])
        raise CausalEdgeError(
            f"layer {layer}: edge query {int(queries[j])} → key {int(ki[j])} is masked for this query (causality, "
            "padding or a sliding window): there is no attention to remove or steer"
        )


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

    probs = _empty_rows_to_zero(torch.softmax(scores, dim=-1, dtype=torch.float32 if upcast else None), allowed)
    bias_rows = torch.zeros(b, rows.numel(), dtype=torch.bool, device=query.device)
    scaled = [e for e in chunk_edits if e.mass is None]
    if scaled:
        probs, scores = _scale_edges(probs, scores, scaled, rows, allowed, offset, layer, bias_rows)
    for e in chunk_edits:
        if e.mass is not None:
            probs, scores = _set_mass(probs, scores, e, rows, allowed, offset, layer, bias_rows)
    _require_finite_rows(probs, rows, offset, layer)
    probs = probs.to(query.dtype)
    return probs, scores, bias_rows


def _edit_index(
    e: ChunkEdit, probs: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor, offset: int, layer: int | None
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """The edit's entries as an index into `probs` `[batch, heads, rows, keys]` (edges × heads), each entry's
    computed-row index, and its edge index; CausalEdgeError for an edge the model's own mask hides."""
    bi, qi, ki, src = e.per_item(probs.shape[0])
    r = torch.searchsorted(rows, qi)
    _check_allowed(allowed, bi, r, ki, qi + offset, layer)
    hs = torch.arange(probs.shape[1], device=probs.device) if e.heads is None else torch.tensor(e.heads)
    hs = hs.to(probs.device)
    return (bi[:, None], hs[None, :], r[:, None], ki[:, None]), r, src


def _scale_edges(probs, scores, chunk_edits, rows, allowed, offset, layer, bias_rows):
    """Scale edits: each edge's weight × exp(bias), its row renormalised (exp(bias) = α applied after the softmax
    and renormalised is the same function as adding log α to the score, without rounding log α into a score of
    magnitude ~10–30 in fp32)."""
    factor = torch.ones_like(probs)
    for e in chunk_edits:  # one scatter per LayerEdit, whatever its number of edges
        idx, r, _ = _edit_index(e, probs, rows, allowed, offset, layer)
        factor[idx] = factor[idx] * math.exp(e.bias)
        bias_rows[idx[0][:, 0], r] = True
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
    return probs, scores + factor.log()  # the equivalent pre-softmax scores, for the record


def _set_mass(probs, scores, e, rows, allowed, offset, layer, bias_rows):
    """A mass edit: in each edited (item, head, row) the edges' keys scaled to carry the row's mass in total and
    the other keys the rest, each side in its own proportions (float64; a row that already carries its mass is
    left as it is, bit for bit)."""
    idx, r, src = _edit_index(e, probs, rows, allowed, offset, layer)
    assert e.mass is not None
    chosen = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    chosen[idx] = True
    target = torch.full(probs.shape[:-1], math.nan, dtype=torch.float64, device=probs.device)
    target[idx[:3]] = e.mass[src.to(e.mass.device)].to(probs.device)
    p64 = probs.double()
    inside, outside = (p64 * chosen).sum(-1), (p64 * ~chosen).sum(-1)
    todo = ~torch.isnan(target) & (target != inside)
    stuck = todo & (((inside == 0) & (target > 0)) | ((outside == 0) & (target < 1)))
    if stuck.any():
        bi, hi, ri = (int(x) for x in stuck.nonzero()[0])
        raise MaskedRowError(
            f"layer {layer}: query row {int(rows[ri]) + offset} (batch item {bi}, head {hi}) has weight "
            f"{float(inside[bi, hi, ri]):.3g} on the edited keys and {float(outside[bi, hi, ri]):.3g} elsewhere: "
            f"no rescaling gives the edges a total of {float(target[bi, hi, ri]):.3g}"
        )
    f_in = torch.where(todo & (inside > 0), target / inside, 1.0)
    f_out = torch.where(todo & (outside > 0), (1 - target) / outside, 1.0)
    factor = torch.where(chosen, f_in[..., None], f_out[..., None])
    probs = torch.where(todo[..., None], (p64 * factor).to(probs.dtype), probs)
    bias_rows |= todo.any(1)
    return probs, torch.where(todo[..., None], scores + factor.log().to(scores.dtype), scores)


def _empty_rows_to_zero(probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Rows the model's own mask empties (left-padding queries) are 0, not softmax's NaN; no edit can reach them.
    Only those rows: a NaN anywhere else is the model's and must not become a number."""
    empty = ~allowed.any(-1, keepdim=True)  # [batch, 1, rows, 1]
    return probs.masked_fill(empty, 0.0) if bool(empty.any()) else probs


def _require_finite_rows(probs: torch.Tensor, rows: torch.Tensor, offset: int, layer: int | None) -> None:
    """NonFiniteError if any computed row holds NaN or inf (weights, or an edit too large for the dtype). A row's
    sum is non-finite exactly when one of its weights is (all are in [0, 1] otherwise), so this checks
    `[batch, heads, rows]` sums instead of allocating another `[…, keys]` mask."""
    bad = ~torch.isfinite(probs.sum(-1))
    if bool(bad.any()):
        b, h, r = (int(x) for x in bad.nonzero()[0])
        raise NonFiniteError(f"the attention weights of query position {int(rows[r]) + offset} (head {h})", layer, b)
