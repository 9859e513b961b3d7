"""How an SAE latent is added to the residual stream: a number, `norm` or `mean` times its direction, with
optional ablation of other latents at the same positions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from plipy.engine import ResidualAdd
from plipy.errors import NonFiniteError, ParameterError, PlipyError
from plipy.sae.model import SAE


@dataclass
class Steering:
    """How a latent is added: `coeff` a number, "norm" (× the residual's norm at that position) or "mean"
    (× `mean_act`); `direction` the decoder row (upstream) or the encoder column; `ablate` latents whose
    (normalised) decoder direction is projected out first."""

    latent: int
    coeff: float | str = 100.0
    direction: str = "decoder"
    ablate: tuple[int, ...] = ()
    mean_act: float | None = None


FLOAT32_MAX = 3.4028234663852886e38


def parse_coeff(text: str | float) -> float | str:
    """`100`, `-20.5`, `norm` or `mean` (the grammar of `coeff`)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = str(text).strip().lower()
        if t in ("norm", "mean"):
            return t
        try:
            value = float(t)
        except ValueError:
            raise ParameterError("coeff", f"coefficient must be a number, 'norm' or 'mean', got {text!r}") from None
    if not math.isfinite(value):  # nan/inf would make every steered measure meaningless
        raise ParameterError("coeff", f"coefficient must be a finite number, got {text!r}")
    if abs(value) > FLOAT32_MAX:  # the steering vector is float32: it would be inf
        raise ParameterError(
            "coeff", f"coefficient {text!r} is beyond float32's range (±{FLOAT32_MAX:.4g}): the vector is inf"
        )
    return value


def needs_residual(s: Steering) -> bool:
    """`norm` and ablation depend on the residual itself (read from the original forward at the same point)."""
    return s.coeff == "norm" or bool(s.ablate)


def steering_adds(
    sae: SAE, layer: int, steering: Steering, positions: Sequence[Sequence[int]], resid: torch.Tensor | None = None
) -> list[ResidualAdd]:
    """ResidualAdds at the input of `layer` for one batch; `positions[b]` are absolute (padded) positions of item b.

    One add per absolute position with a `[batch, d]` vector (zero rows for items not steered there: x + 0 is x),
    since a ResidualAdd's positions are shared by the batch. `resid` (`[batch, seq, d]`, the un-steered residual at
    that point) is needed for `norm` and ablation. Skipped on single-token generation steps, as upstream.
    """
    d = sae.direction(steering.latent, steering.direction).float()
    if not bool(torch.isfinite(d).all()):
        where = f"SAE {sae.source}"
        raise NonFiniteError(f"the {steering.direction} direction of latent {steering.latent}", where=where)
    coeff = steering.coeff
    if coeff == "mean":
        if steering.mean_act is None:
            raise PlipyError(f"coefficient 'mean' needs the mean activation of latent {steering.latent}")
        coeff = float(steering.mean_act)
    if coeff == 0 and not steering.ablate:
        return []  # nothing added: the steered forward is the original one, bit for bit
    if needs_residual(steering) and resid is None:
        raise PlipyError("'norm' coefficients and ablation need the residual at the steering point")
    units = [sae.direction(a, "decoder").double() for a in steering.ablate]
    units = [u / u.norm() for u in units]
    batch = len(positions)
    per_pos: dict[int, torch.Tensor] = {}
    for b, ps in enumerate(positions):
        for p in ps:
            vec = torch.zeros(sae.d_in, dtype=torch.float32)
            if units:
                assert resid is not None  # checked above: ablation needs the residual
                x = resid[b, p].double().cpu()
                y = x.clone()
                for u in units:  # one after the other, as stacked upstream hooks do
                    y = y - (y @ u) * u
                vec += (y - x).float()
            if coeff == "norm":
                assert resid is not None  # checked above: 'norm' needs the residual
                vec += d.cpu() * resid[b, p].float().norm().cpu()
            else:
                vec += float(coeff) * d.cpu()
            if not bool(torch.isfinite(vec).all()):  # a finite coefficient × direction can still overflow float32
                raise NonFiniteError(f"the steering vector of latent {steering.latent} (coefficient {coeff})", item=b)
            per_pos.setdefault(int(p), torch.zeros(batch, sae.d_in))[b] = vec
    return [
        ResidualAdd(layer, v, positions=[p], where="pre", skip_single_token=True) for p, v in sorted(per_pos.items())
    ]
