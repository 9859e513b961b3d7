"""How far an intervention moved the next-token distribution: KL, PLIP's truncated KL, entropy, changed tokens.

Everything is computed in float64 from logits over the full vocabulary, so a KL of 1e-9 nats is a real number and
not float32 noise. Used by knockout and (with the same definitions) steering.
"""

from __future__ import annotations

from typing import Any

import torch

from plipy.finite import require_finite

PLIP_FLOOR = 1e-10  # PLIP-rs sums only KL terms with p > 1e-10 and q > 1e-10


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.detach().to(torch.float64), dim=-1)


def kl_divergence(base_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_base ‖ P_other) in nats over the last dimension, every term, float64 (`[..., V]` → `[...]`).

    Terms with p = 0 contribute 0; a token with p > 0 and q = 0 makes the KL +inf, as it should."""
    lp, lq = _log_probs(base_logits), _log_probs(other_logits)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(-1)


def kl_plip(base_logits: torch.Tensor, other_logits: torch.Tensor, floor: float = PLIP_FLOOR) -> torch.Tensor:
    """PLIP-rs' KL: only terms with p > floor and q > floor (in float64 here; PLIP summed in float32)."""
    lp, lq = _log_probs(base_logits), _log_probs(other_logits)
    p, q = lp.exp(), lq.exp()
    keep = (p > floor) & (q > floor)
    return torch.where(keep, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) in nats, float64 (`[..., V]` → `[...]`)."""
    lp = _log_probs(logits)
    p = lp.exp()
    return -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)


def top_changed(
    base_logits: torch.Tensor, other_logits: torch.Tensor, k: int = 5, tokenizer: Any = None
) -> list[dict[str, Any]]:
    """The k tokens whose probability changed most (|p − q|, largest first), with both probabilities."""
    p = _log_probs(base_logits).exp()
    q = _log_probs(other_logits).exp()
    diff = q - p
    idx = diff.abs().topk(min(k, diff.numel())).indices.tolist()
    return [
        {
            "token_id": i,
            "token": _decode(tokenizer, i),
            "p_base": float(p[i]),
            "p_intervened": float(q[i]),
            "diff": float(diff[i]),
        }
        for i in idx
    ]


def _decode(tokenizer: Any, i: int) -> str | None:
    if tokenizer is None:
        return None
    # PLIP-rs escaped newlines and tabs so tables stay on one line
    return tokenizer.decode([i]).replace("\n", "\\n").replace("\t", "\\t")


def compare_logits(
    base_logits: torch.Tensor, other_logits: torch.Tensor, tokenizer: Any = None, k: int = 5
) -> dict[str, Any]:
    """Every per-sample measure of one intervention on one next-token distribution (`[V]` logits each).
    NaN or inf logits are refused (NonFiniteError): a KL made from them would be a made-up number."""
    require_finite(base_logits, "the baseline's next-token logits")
    require_finite(other_logits, "the intervened next-token logits")
    lp, lq = _log_probs(base_logits.reshape(-1)), _log_probs(other_logits.reshape(-1))  # once, not per measure
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros_like(p)
    kl = torch.where(p > 0, p * (lp - lq), zero)
    keep = (p > PLIP_FLOOR) & (q > PLIP_FLOOR)
    h_base = float(-torch.where(p > 0, p * lp, zero).sum())
    h_other = float(-torch.where(q > 0, q * lq, zero).sum())
    top_b, top_o = int(lp.argmax()), int(lq.argmax())
    diff = q - p
    idx = diff.abs().topk(min(k, diff.numel())).indices.tolist()
    return {
        "kl": float(kl.sum()),
        "kl_plip": float(torch.where(keep, kl, zero).sum()),
        "entropy_base": h_base,
        "entropy_intervened": h_other,
        "entropy_change": h_other - h_base,
        "top1_base": top_b,
        "top1_intervened": top_o,
        "top1_base_token": _decode(tokenizer, top_b),
        "top1_intervened_token": _decode(tokenizer, top_o),
        "top1_changed": top_b != top_o,
        "top_changed": [
            {
                "token_id": i,
                "token": _decode(tokenizer, i),
                "p_base": float(p[i]),
                "p_intervened": float(q[i]),
                "diff": float(diff[i]),
            }
            for i in idx
        ],
    }
