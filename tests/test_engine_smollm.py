"""The engine on the real default model (SmolLM2-135M-Instruct) with real corpus samples.

Each fp32 result is compared with the float64 run of the same model, within `fp32_bound`: as close to it as HF's own
fp32 run is (×4) plus a few ulps, so the tests hold whichever SIMD kernels torch picks."""

from __future__ import annotations

import pytest
import torch

from plipy.corpus import load_corpus, token_positions
from plipy.engine import Capture, EdgeEdit, Engine
from tiny_models import REF, REF_EDITS, float64, fp32_bound, kl, register_reference, variant


@pytest.fixture(scope="module")
def setup(smollm):
    """(eager copy, engine model, engine, token ids, marker, targets) for a Python and a Rust sample."""
    eager = variant(smollm.model, "eager")
    ours = variant(smollm.model, "sdpa")
    engine = Engine(ours)
    # Compared with eager-based references, the eager-mode engine removes the fp32 eager/SDPA difference from
    # the layers before an edit, so what remains is the edit itself.
    ours_eager = variant(smollm.model, "sdpa")
    engine_eager = Engine(ours_eager, idle="eager")
    corpus = load_corpus()
    samples = []
    for group in ("python_doctest", "rust_test"):
        sp = token_positions(corpus.groups[group][0], smollm.tokenizer)
        samples.append((torch.tensor([sp.input_ids]), sp.marker_token, [t for t in sp.target_tokens]))
    return smollm, eager, ours, engine, samples, ours_eager, engine_eager


@pytest.fixture(scope="module")
def eager64(setup):
    """HF eager in float64: the exact answer (1 GB; built once per module)."""
    return float64(setup[1])


def _err(got, ref64):
    return (got.double() - ref64).abs().max().item()


def test_idle_engine_matches_hf_sdpa_and_eager(setup, eager64):
    """HF's own eager and SDPA each land ~6e-5 from fp64 on this model; the engine in either idle mode lands as
    close (idle="sdpa" is the default, idle="eager" the eager-based references' mode)."""
    lm, eager, ours, _, samples, ours_eager, _ = setup
    sdpa = variant(lm.model, "sdpa")
    for ids, _, _ in samples:
        ref64 = eager64(ids).logits
        assert _err(ours(ids).logits, ref64) <= fp32_bound(sdpa(ids).logits, ref64)
        assert _err(ours_eager(ids).logits, ref64) <= fp32_bound(eager(ids).logits, ref64)


def test_marker_rows_equal_eager_attentions(setup, eager64):
    _, eager, ours, engine, samples, ours_eager, engine_eager = setup
    for ids, marker, _ in samples:
        att = eager(ids, output_attentions=True).attentions
        att64 = eager64(ids, output_attentions=True).attentions
        with engine.run(capture=Capture(rows=[marker])) as rec:
            ours(ids)
        with engine_eager.run(capture=Capture(rows=[marker])) as rec_eager:
            ours_eager(ids)
        assert len(rec.attn) == 30
        for layer in range(30):
            ref64 = att64[layer][0, :, marker]
            tol = fp32_bound(att[layer][0, :, marker], ref64)
            assert _err(rec.attn[layer][0, :, 0], ref64) <= tol, layer
            assert _err(rec_eager.attn[layer][0, :, 0], ref64) <= tol, layer


def test_steering_and_knockout_equal_explicit_post_softmax(setup, eager64):
    _, eager, _, _, samples, ours, engine = setup
    register_reference()
    ref_model = variant(eager, REF)
    ref64_model = variant(eager64, REF)
    ids, marker, targets = samples[1]
    with engine.run() as _:
        base = ours(ids).logits[0, -1]
    for alpha in (0.0, 0.5, 3.0):
        REF_EDITS.clear()
        REF_EDITS["edits"] = [(14, marker, t, None, alpha) for t in targets]
        try:
            ref_logits = ref_model(ids).logits[0, -1]
            ref_row = REF_EDITS.pop("probs")[14][0, :, marker]
            ref64_logits = ref64_model(ids).logits[0, -1]
            ref64_row = REF_EDITS["probs"][14][0, :, marker]
        finally:
            REF_EDITS.clear()
        with engine.run(
            capture=Capture(rows=[marker], layers=[14]),
            edits=[EdgeEdit(layers=[14], edges=[(marker, t) for t in targets], scale=alpha)],
        ) as rec:
            logits = ours(ids).logits[0, -1]
        row = rec.attn[14][0, :, 0]
        assert _err(row, ref64_row) <= fp32_bound(ref_row, ref64_row)
        # KL moves with the logits: |ΔKL| ≤ 2·max|Δlogit| (the log-softmax is 2-Lipschitz in the max norm)
        tol = 2 * fp32_bound(ref_logits, ref64_logits)
        assert _err(logits, ref64_logits) <= tol / 2
        assert abs(kl(base, logits) - kl(base, ref64_logits)) <= tol
        if alpha == 0.0:
            assert (row[:, targets] == 0).all()
            assert kl(base, logits) > 0


def test_identity_is_exact(setup):
    _, _, ours, engine, samples, _, _ = setup
    ids, marker, targets = samples[0]
    with engine.run(capture=Capture(rows=[marker])) as base_rec:
        base = ours(ids).logits
    with engine.run(
        capture=Capture(rows=[marker]),
        edits=[EdgeEdit(layers=range(30), edges=[(marker, t) for t in targets], scale=1.0)],
    ) as rec:
        got = ours(ids).logits
    assert kl(base[0, -1], got[0, -1]) == 0.0
    assert all(torch.equal(base_rec.attn[i], rec.attn[i]) for i in range(30))
