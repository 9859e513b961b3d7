"""bfloat16: the engine against HF eager in bf16 on tiny models of every architecture, and the measures in float64.

Tolerances come from bf16 rounding as HF itself incurs it: each bf16 result is compared with the float64 run of the
same weights and must be as close to it as HF's own bf16 eager run is (`bound`: 4× that error plus 2 bf16 ulps of
the largest value: one bf16 ulp is already 2^-7 relative), so nothing here depends on which SIMD kernels torch
picks.
"""

from __future__ import annotations

import pytest
import torch

from plipy.divergence import kl_divergence
from plipy.engine import Capture, EdgeEdit, Engine
from plipy.engine.runner import ConditionRunner
from plipy.engine.runner import layer_windows as runner_windows
from plipy.experiments.knockout import condition_edits
from tiny_models import (
    ARCHS,
    NO_SDPA,
    REF,
    REF_EDITS,
    batch_inputs,
    batch_reference,
    build,
    register_reference,
    variant,
)

EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 2^-7: bf16 keeps 8 significant bits
ROWS = [5, 9]


def bound(ref16: torch.Tensor, ref64: torch.Tensor, ulps: int = 2) -> float:
    """How far a bf16 computation may fall from the float64 answer: 4× HF's own bf16 error + `ulps` bf16 ulps."""
    err = (ref16.double() - ref64).abs().max().item()
    return 4 * err + ulps * EPS_BF16 * ref64.abs().max().item()


def _err(got: torch.Tensor, ref64: torch.Tensor, real: torch.Tensor | None = None) -> float:
    d = got.double() - ref64
    return (d if real is None else d.masked_select(real)).abs().max().item()


@pytest.fixture(scope="module", params=ARCHS)
def models(request, one_thread):
    """(arch, HF eager bf16, plipy bf16 with engine, float64 copy) with the same weights."""
    arch = request.param
    base = build(arch, "eager")
    eager16 = variant(base, "eager").to(torch.bfloat16)
    ours = variant(base, "eager").to(torch.bfloat16)
    return arch, eager16, ours, Engine(ours), variant(base, "eager").double()


def test_eager_mode_is_hf_eager_in_bf16(models):
    arch, eager16, ours, _, _ = models
    ids, mask = batch_inputs()
    ref = eager16(ids, attention_mask=mask).logits
    mine = variant(ours, "eager")
    Engine(mine, idle="eager")
    real = mask.bool()[..., None]
    assert torch.equal(mine(ids, attention_mask=mask).logits.masked_select(real), ref.masked_select(real)), arch
    if arch not in NO_SDPA:  # the idle engine is HF's own SDPA function
        sdpa = variant(eager16, "sdpa")(ids, attention_mask=mask).logits
        assert torch.equal(ours(ids, attention_mask=mask).logits.masked_select(real), sdpa.masked_select(real))


def test_captured_rows_in_bf16(models):
    arch, eager16, ours, engine, model64 = models
    ids, mask = batch_inputs()
    att16 = eager16(ids, attention_mask=mask, output_attentions=True).attentions
    att64 = batch_reference(model64, ids, mask, output_attentions=True).attentions
    with engine.run(capture=Capture(rows=ROWS)) as rec:
        ours(ids, attention_mask=mask)
    for layer, (a16, a64) in enumerate(zip(att16, att64, strict=True)):
        assert rec.attn[layer].dtype == torch.float32  # recorded in fp32 whatever the model's dtype
        tol = bound(a16[:, :, ROWS], a64[:, :, ROWS])
        assert _err(rec.attn[layer], a64[:, :, ROWS]) <= tol, f"{arch} layer {layer}"


def test_edits_in_bf16_equal_float64_reference(models):
    arch, eager16, ours, engine, model64 = models
    register_reference()
    ids, mask = batch_inputs()
    edits = [(1, 9, 7, [0, 2], 3.0), (1, 9, 8, None, 0.0), (2, 5, 4, None, 5.0)]
    REF_EDITS.clear()
    REF_EDITS["edits"] = edits
    try:
        ref64 = batch_reference(variant(model64, REF), ids, mask).logits
    finally:
        REF_EDITS.clear()
    real = mask.bool()[..., None]
    base16 = eager16(ids, attention_mask=mask).logits
    base64 = batch_reference(model64, ids, mask).logits
    tol = bound(base16.masked_select(real), base64.masked_select(real))
    spec = [EdgeEdit(layers=[lay], edges=[(q, k)], heads=h, scale=a) for lay, q, k, h, a in edits]
    with engine.run(edits=spec):
        got = ours(ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    assert _err(got, ref64, real) <= tol, arch
    assert _err(got, base64, real) > tol / 4  # the edits do move the logits beyond the noise


def test_fast_equals_naive_in_bf16_with_float64_kl(models):
    """The runner in bf16: KLs are float64 sums over bf16 logits; fast and naive differ only by bf16 rounding,
    bounded through |ΔKL| ≤ 2·max|Δlogits| (KL's slope in the log-probabilities is at most 1 per logit shift)."""
    arch, eager16, ours, engine, model64 = models
    ids = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(3))
    windows = runner_windows(ours)
    conds = [
        condition_edits([(q, 4) for q in range(4, 14)], [0, 2], None, windows),
        condition_edits([(9, 7), (9, 8)], [1], [1], windows),
    ]
    fast, naive = ConditionRunner(ours, engine), ConditionRunner(ours, engine, path="naive")
    assert fast.path == "fast"
    bf, bn = fast.baseline(ids), naive.baseline(ids)
    of, on = fast.run(bf, conds), naive.run(bn, conds)
    l16 = eager16(ids[None]).logits[0, -1]
    l64 = model64(ids[None]).logits[0, -1]
    tol = bound(l16, l64)
    for a, b in zip(of, on, strict=True):
        assert a.status == b.status == "ok"
        assert a.logits.dtype == torch.bfloat16
        k = kl_divergence(bf.logits, a.logits)
        assert k.dtype == torch.float64
        assert abs(float(k) - float(kl_divergence(bn.logits, b.logits))) <= 2 * (2 * tol), arch
