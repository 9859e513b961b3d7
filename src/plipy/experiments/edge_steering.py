"""Edge steering, what calibrate, dose and generate share: scale the marker → target attention edges by α.

Mechanism (notes §7.1, fact 9): on the chosen heads and layers the post-softmax weight of each edge marker → target
is multiplied by α and the marker's row renormalised — in the engine exactly a `log α` pre-softmax bias
(`EdgeEdit(scale=α)`). A target token that occurs twice is one edge (scaled once); the attention metric keeps it
twice, as the scan does.

Here: the steerable samples and their edges, PLIP's attention metric, its exact steered value in closed form
(`achieved_fn`) and the α that reaches a given value (`scale_for_attention`, `scale_for_group`). The experiments are
`plipy.experiments.calibrate`, `.dose` and `.generate`. An edge whose key comes after its query (PLIP-rs'
generation experiment steered such edges: a no-op) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from plipy.corpus import Corpus, SamplePositions, token_positions
from plipy.engine import EdgeEdit
from plipy.errors import CausalEdgeError, PlipyError

if TYPE_CHECKING:
    from plipy.models import LoadedModel

DOSES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)  # PLIP-rs' DOSE_LEVELS


class SteerCausalError(CausalEdgeError):
    """A steering edge whose key comes after its query: the causal mask already gives it weight 0."""


# -- samples and edges ---------------------------------------------------------------------------------------------


@dataclass
class SteerSample:
    """One corpus sample ready to steer: marker → distinct exact targets, and the targets the metric averages."""

    positions: SamplePositions
    status: str  # ok | failed | causal-invalid | target-on-marker | no-targets
    edges: list[tuple[int, int]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # duplicates kept (the metric's mean over targets)
    note: str | None = None

    @property
    def id(self) -> str:
        return self.positions.sample.id

    @property
    def marker(self) -> int:
        """The marker's token: every sample that steers (status ok) has one."""
        m = self.positions.marker_token
        assert m is not None, f"sample {self.id!r} has no marker token"
        return m

    @property
    def group(self) -> str:
        return self.positions.sample.group


def _tok(sp: SamplePositions, i: int) -> str:
    return repr(sp.sample.code[sp.offsets[i][0] : sp.offsets[i][1]]) if sp.offsets[i] != (0, 0) else "<bos>"


def steer_sample(sp: SamplePositions) -> SteerSample:
    """Edges of one sample: marker → each exact target token. Targets after the marker make it causal-invalid."""
    m = sp.marker_token
    if m is None or sp.marker_match != "exact":
        return SteerSample(sp, "failed", note="the marker has no exact token (PLIP's steering uses the exact rule)")
    late = [
        (t, i)
        for i, (t, after) in enumerate(zip(sp.target_tokens, sp.after_marker, strict=True))
        if after and t is not None  # a target after the marker always has a token
    ]
    if late:
        t, i = late[0]
        note = (
            f"sample {sp.sample.id!r}: edge from query token {m} ({_tok(sp, m)}, the marker) to key token {t} "
            f"({_tok(sp, t)}, target {i}) is causally masked — the key comes after the query, so there is no "
            f"attention to steer ({len(late)} of {len(sp.target_tokens)} targets are after the marker)"
        )
        return SteerSample(sp, "causal-invalid", note=note)
    if any(sp.on_marker):
        i = sp.on_marker.index(True)
        note = (
            f"sample {sp.sample.id!r}: target {i} converts to the marker's own token {m} ({_tok(sp, m)}): "
            "steering it would scale the marker's self-attention, not an edge to a target"
        )
        return SteerSample(sp, "target-on-marker", note=note)
    targets = [
        t for t, how in zip(sp.target_tokens, sp.target_matches, strict=True) if t is not None and how == "exact"
    ]
    if not targets:
        return SteerSample(sp, "no-targets", note="no target converts to an exact token")
    return SteerSample(sp, "ok", edges=[(m, t) for t in sorted(set(targets))], targets=targets)


def prepare_check_groups(corpus: Corpus, groups: Sequence[str]) -> None:
    """Fail on unknown groups (before a model is loaded)."""
    unknown = [g for g in groups if g not in corpus.group_names]
    if unknown:
        raise PlipyError(f"unknown group(s) {', '.join(unknown)}; the corpus has: {', '.join(corpus.group_names)}")


def prepare(
    lm: LoadedModel, corpus: Corpus, groups: Sequence[str], bos: bool = False, skip_invalid: bool = False
) -> list[SteerSample]:
    """Steerable samples of the groups. A causally invalid sample is an error unless `skip_invalid`."""
    prepare_check_groups(corpus, groups)
    out = [
        steer_sample(token_positions(s, lm.tokenizer, bos=bos, max_length=lm.max_positions))
        for s in corpus.samples(groups)
    ]
    bad = [s for s in out if s.status in ("causal-invalid", "target-on-marker")]
    if bad and not skip_invalid:
        more = f" (and {len(bad) - 1} more sample(s))" if len(bad) > 1 else ""
        raise SteerCausalError(f"{bad[0].note}{more}; --skip-invalid leaves such samples out")
    if not any(s.status == "ok" for s in out):
        reasons = sorted({f"{s.status} ({s.note})" for s in out})
        raise PlipyError("no steerable sample in " + ", ".join(groups) + ": " + "; ".join(reasons[:3]))
    return out


def excluded(samples: Sequence[SteerSample]) -> list[dict[str, Any]]:
    """The samples left out, with why."""
    return [{"id": s.id, "group": s.group, "status": s.status, "note": s.note} for s in samples if s.status != "ok"]


def edge_edits(s: SteerSample, layers: Sequence[int], alpha: float, heads: Sequence[int] | None) -> list[EdgeEdit]:
    """The one edit that steers a sample's edges by α on `layers` (and `heads`; None = all)."""
    return [EdgeEdit(layers=list(layers), edges=list(s.edges), scale=float(alpha), heads=heads)]


# -- the metric and its exact steered value ------------------------------------------------------------------------


def attention_metric(rows: torch.Tensor, targets: Sequence[int]) -> float:
    """PLIP's metric on one marker row `[heads, keys]`: mean over targets (duplicates kept) of the head mean."""
    return float(rows.double()[:, list(targets)].mean())


def steered_rows(
    rows: torch.Tensor, keys: Sequence[int], alpha: float, heads: Sequence[int] | None = None
) -> torch.Tensor:
    """The explicit post-softmax edit of a marker row `[heads, keys]` (float64): ×α on `keys`, renormalise."""
    p = rows.double().clone()
    hs = list(range(p.shape[0])) if heads is None else list(heads)
    factor = torch.ones_like(p)
    factor[torch.tensor(hs)[:, None], torch.tensor(list(keys))[None, :]] = alpha
    p = p * factor
    return torch.where(factor.ne(1).any(-1, keepdim=True), p / p.sum(-1, keepdim=True), p)


def achieved_fn(
    rows: torch.Tensor, targets: Sequence[int], keys: Sequence[int], heads: Sequence[int] | None
) -> tuple[Callable[[float], float], float, float]:
    """A(α) on one pre-edit row in closed form, and its limits A(0), A(∞).

    Per head h with target mass P_h (distinct keys) the edited weights are α·p / (1 − P_h + α·P_h), so
    A(α) = mean_h α·W_h / (1 − P_h + α·P_h) with W_h the target-mean weight (duplicates kept; the 1 is the row's
    actual sum); unsteered heads keep W_h. Increasing in α."""
    p = rows.double()
    n = p.shape[0]
    steer = torch.zeros(n, dtype=torch.bool)
    steer[list(range(n)) if heads is None else list(heads)] = True
    big_p = p[:, list(keys)].sum(-1)
    total = p.sum(-1)  # 1 up to rounding; the edit renormalises by the actual sum, so use it
    w = p[:, list(targets)].mean(-1)

    def f(alpha: float) -> float:
        moved = alpha * w / (total - big_p + alpha * big_p)
        return float(torch.where(steer, moved, w).mean())

    lim_inf = torch.where(steer & (big_p > 0), w / big_p.clamp_min(1e-300), w)
    lo = torch.where(steer & (big_p < total), torch.zeros_like(w), w)
    return f, float(lo.mean()), float(lim_inf.mean())


def scale_for_attention(
    rows: torch.Tensor, targets: Sequence[int], keys: Sequence[int], v: float, heads: Sequence[int] | None = None
) -> tuple[float | None, str | None]:
    """The α ≥ 0 whose steered metric on this pre-edit row equals v (bisection in log α on the closed form).

    For one head this is the closed form α = v(1−P)/(W − vP); head means need the search. Returns (α, None) or
    (None, why) when v is outside what scaling can reach."""
    f, lo, hi = achieved_fn(rows, targets, keys, heads)
    base = f(1.0)
    if not lo < v < hi:
        if abs(v - base) <= 1e-15:
            return 1.0, None
        return None, f"v = {v:g} is outside the reachable range ({lo:.6g}, {hi:.6g}) of this sample"
    a, b = -1.0, 1.0  # log α bracket, widened until it holds v
    while f(math.exp(a)) > v:
        a *= 2
        if a < -700:
            return None, f"v = {v:g} needs α below e^-700"
    while f(math.exp(b)) < v:
        b *= 2
        if b > 700:
            return None, f"v = {v:g} needs α above e^700"
    for _ in range(200):
        mid = (a + b) / 2
        if f(math.exp(mid)) < v:
            a = mid
        else:
            b = mid
        if b - a < 1e-13:
            break
    return math.exp((a + b) / 2), None


def scale_for_group(
    rows: Sequence[torch.Tensor], targets: Sequence[Sequence[int]], keys: Sequence[Sequence[int]], v: float
) -> float | None:
    """The one α (all heads) whose steered group mean of the metric equals v (bisection in log α), or None."""
    fs = [achieved_fn(r, t, k, None) for r, t, k in zip(rows, targets, keys, strict=True)]

    def g(alpha: float) -> float:
        return float(np.mean([f(alpha) for f, _, _ in fs]))

    lo, hi = float(np.mean([x[1] for x in fs])), float(np.mean([x[2] for x in fs]))
    if not lo < v < hi:
        return None
    a, b = -1.0, 1.0
    while g(math.exp(a)) > v and a > -700:
        a *= 2
    while g(math.exp(b)) < v and b < 700:
        b *= 2
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if g(math.exp(mid)) < v else (a, mid)
        if b - a < 1e-13:
            break
    return math.exp((a + b) / 2)
