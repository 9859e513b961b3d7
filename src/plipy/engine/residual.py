"""Residual-stream hooks on the decoder layers of any architecture: capture resid_pre/resid_post, add vectors.

resid_pre of layer L is the hidden state entering decoder layer L; resid_post is what it returns
(TransformerLens' `blocks.L.hook_resid_pre` / `hook_resid_post`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plipy.engine.spec import Record, ResidualAdd, ResidualCapture
from plipy.errors import PlipyError
from plipy.finite import require_finite


@dataclass
class ResidualPlan:
    """Per (layer, where): vectors to add and whether to record."""

    adds: dict[tuple[int, str], list[ResidualAdd]] = field(default_factory=dict)
    capture: dict[tuple[int, str], ResidualCapture] = field(default_factory=dict)

    @classmethod
    def build(cls, adds: list[ResidualAdd], capture: ResidualCapture | None, n_layers: int) -> ResidualPlan:
        plan = cls()
        for a in adds:
            _check_layer(a.layer, n_layers)
            if a.where not in ("pre", "post"):
                raise PlipyError(f"residual position must be 'pre' or 'post', got {a.where!r}")
            plan.adds.setdefault((a.layer, a.where), []).append(a)
        if capture is not None:
            layers = range(n_layers) if capture.layers is None else capture.layers
            for layer in layers:
                _check_layer(layer, n_layers)
                for w in capture.where:
                    if w not in ("pre", "post"):
                        raise PlipyError(f"residual position must be 'pre' or 'post', got {w!r}")
                    plan.capture[(int(layer), w)] = capture
        return plan


def _check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise PlipyError(f"layer {layer} does not exist (the model has {n_layers} layers: 0-{n_layers - 1})")


def apply(plan: ResidualPlan, record: Record, layer: int, where: str, hidden: torch.Tensor) -> torch.Tensor | None:
    """Add this point's vectors and record it; returns the new hidden state, or None if untouched."""
    key = (layer, where)
    out = None
    for a in plan.adds.get(key, ()):
        if a.skip_single_token and hidden.shape[1] == 1:
            continue
        vec = a.vector.to(device=hidden.device, dtype=hidden.dtype)
        require_finite(vec, f"the vector added to the residual stream ({where})", layer)  # also: overflow in the cast
        vec = vec[:, None, :] if vec.ndim == 2 else vec
        out = (hidden if out is None else out).clone()
        if a.positions is None:
            out += vec
        else:
            pos = torch.as_tensor(list(a.positions), device=hidden.device)
            if (pos >= hidden.shape[1]).any():
                raise PlipyError(f"residual add at positions {list(a.positions)}: sequence has {hidden.shape[1]}")
            out[:, pos] += vec if vec.ndim == 1 else vec
    cap = plan.capture.get(key)
    if cap is not None:
        h = hidden if out is None else out
        h = h if cap.positions is None else h[:, list(cap.positions)]
        record.resid[key] = h.detach().clone()
    return out
