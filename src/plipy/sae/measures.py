"""Attention from the last position to the steered positions, per layer and head, in float64 from per-key
quantities (never a [batch, heads, q, k, d] tensor), for the "Do I know this entity?" analysis
(`plipy.experiments.sae_attention`):

- `attn_weights`           Σ a_qk
- `value_weighted`         Σ ‖a_qk v_k‖ = Σ a_qk ‖v_k‖
- `output_value_weighted`  Σ ‖a_qk v_k W_O^h‖ (L1 over d_model as upstream, L2 as an option)
- `distance_based`         Σ clip(‖o_q^h‖ − ‖f_qk^h − o_q^h‖, 1e-5), f_qk^h = a_qk v_k W_O^h, o_q^h = Σ_k f_qk^h
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from plipy.engine import Capture, Engine, ResidualAdd, ResidualCapture
from plipy.engine.batch import pad_left
from plipy.errors import PlipyError
from plipy.finite import require_finite
from plipy.sae.inputs import Tokenized, positions_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MEASURES = ("attn_weights", "value_weighted", "output_value_weighted", "distance_based")


def layer_measures(
    attn: torch.Tensor,
    values: torch.Tensor,
    keys: torch.Tensor,
    kmask: torch.Tensor,
    w_o: torch.Tensor | None,
    measures: Sequence[str],
    ovw_norm: str = "l1",
) -> dict[str, torch.Tensor]:
    """The measures of one layer, `{measure: [batch, heads]}` (float64).

    `attn` `[batch, heads, keys]` is the last position's post-softmax row, `values` `[batch, kv_heads, keys, d]`
    the raw value states (GQA: head h reads kv head h // (heads/kv_heads)), `keys` `[batch, P]` the steered
    positions of each item (padded; `kmask` `[batch, P]` marks the real ones), `w_o` `[heads, d, d_model]` (needed
    for the two output-space measures). Only the steered keys are projected: `[batch, heads, P, d_model]` at most.
    """
    a = attn.double()
    b, n_heads, _ = a.shape
    n_rep = n_heads // values.shape[1]
    v = values.double().repeat_interleave(n_rep, dim=1)  # [b, H, K, d]
    keys = keys.to(a.device)
    m = kmask.to(a.device, torch.float64)[:, None, :]  # [b, 1, P]
    a_k = a.gather(2, keys[:, None, :].expand(b, n_heads, -1))  # [b, H, P]
    v_k = v.gather(2, keys[:, None, :, None].expand(b, n_heads, -1, v.shape[-1]))  # [b, H, P, d]
    out: dict[str, torch.Tensor] = {}
    if "attn_weights" in measures:
        out["attn_weights"] = (a_k * m).sum(-1)
    if "value_weighted" in measures:
        out["value_weighted"] = (a_k * v_k.norm(dim=-1) * m).sum(-1)
    if "output_value_weighted" in measures or "distance_based" in measures:
        if w_o is None:
            raise PlipyError("output-space measures need the per-head W_O")
        w_o = w_o.to(a.device)
        g = torch.einsum("bhpd,hdD->bhpD", v_k, w_o)  # v_k W_O^h
        if "output_value_weighted" in measures:
            p = 1 if ovw_norm == "l1" else 2
            out["output_value_weighted"] = (a_k * g.norm(p=p, dim=-1) * m).sum(-1)
        if "distance_based" in measures:
            o = torch.einsum("bhd,hdD->bhD", torch.einsum("bhk,bhkd->bhd", a, v), w_o)  # Σ_k f_qk (no b_O)
            f = a_k[..., None] * g
            dist = (f - o[:, :, None, :] + 1e-6).norm(dim=-1)  # F.pairwise_distance semantics (eps=1e-6)
            score = torch.clamp(o.norm(dim=-1)[..., None] - dist, min=1e-5)
            out["distance_based"] = (score * m).sum(-1)
    return out


def key_index(steer_positions: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item steered positions as a padded `[batch, P]` index and its mask (items steer different counts)."""
    width = max(len(ps) for ps in steer_positions)
    keys = torch.zeros(len(steer_positions), width, dtype=torch.long)
    kmask = torch.zeros(len(steer_positions), width, dtype=torch.bool)
    for b, ps in enumerate(steer_positions):
        keys[b, : len(ps)] = torch.tensor(list(ps), dtype=torch.long)
        kmask[b, : len(ps)] = True
    return keys, kmask


@dataclass
class Batch:
    """A left-padded batch: ids, mask, position_ids, and per item the steered absolute positions."""

    ids: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    steer_positions: list[list[int]]


def make_batch(items: Sequence[Tokenized], pos_type: str, pad_id: int, device: Any = "cpu") -> Batch:
    """Left-pad (`plipy.engine.batch.pad_left`); positions become absolute padded positions; position_ids restart at
    0 on each item's first real token, so a padded item computes what it computes alone."""
    p = pad_left([t.input_ids for t in items], pad_id, device)
    steer = p.shift([positions_for(t.entity_tokens, len(t.input_ids), pos_type) for t in items])
    return Batch(p.ids, p.mask, p.positions, steer)


def forward_measures(
    engine: Engine,
    model: PreTrainedModel,
    batch: Batch,
    w_o: dict[int, torch.Tensor],
    measures: Sequence[str],
    ovw_norm: str,
    adds: Sequence[ResidualAdd] = (),
    resid_layer: int | None = None,
) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
    """One forward: `{measure: [batch, layers, heads]}` and, if asked, the residual entering `resid_layer`."""
    length = batch.ids.shape[1]
    keys, kmask = key_index(batch.steer_positions)
    rc = ResidualCapture(layers=[resid_layer], where=("pre",)) if resid_layer is not None else None
    with (
        torch.inference_mode(),
        engine.run(capture=Capture(rows=[length - 1], values=True), residual_adds=adds, residual_capture=rc) as rec,
    ):
        # The decoder stack only: logits are not needed (the vocabulary projection is the costliest matmul).
        model.base_model(
            input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.position_ids, use_cache=False
        )
    per_layer = [
        layer_measures(rec.attn[layer][:, :, 0], rec.values[layer], keys, kmask, w_o.get(layer), measures, ovw_norm)
        for layer in range(engine.n_layers)
    ]
    for layer, pl in enumerate(per_layer):  # NaN value states (rows finite) would make NaN measures
        for m, t in pl.items():
            require_finite(t, f"the {m} measure", layer)
    out = {m: torch.stack([pl[m] for pl in per_layer], dim=1).cpu().numpy() for m in measures}
    resid = rec.resid.get((resid_layer, "pre")) if resid_layer is not None else None
    return out, resid
