"""The engine against HF eager and SDPA on tiny random models of every supported architecture.

Tolerances are derived, not picked: each fp32 result is compared with the float64 run of the same model and must be
as close to it as HF's own fp32 run is (`fp32_bound`), so a test holds whichever SIMD kernels torch chooses; CI runs
this file under every ATEN_CPU_CAPABILITY the machine has.
"""

from __future__ import annotations

import pytest
import torch

from plipy.engine import Capture, EdgeEdit, Engine, ResidualAdd, ResidualCapture
from plipy.engine.runner import layer_windows as runner_windows
from plipy.errors import CausalEdgeError, MaskedRowError
from tiny_models import (
    ARCHS,
    EPS32,
    NO_SDPA,
    REF,
    REF_EDITS,
    SLIDING,
    batch_inputs,
    batch_reference,
    build,
    float64,
    fp32_bound,
    kl,
    register_reference,
    variant,
)

ROWS = [5, 9]  # real tokens in both sequences (the second is left-padded by 3)


@pytest.fixture(scope="module", params=ARCHS)
def trio(request):
    """(arch, eager model, plipy-engine model, engine) sharing weights."""
    arch = request.param
    eager = build(arch, "eager")
    ours = variant(eager, "eager")
    return arch, eager, ours, Engine(ours)


@pytest.fixture(scope="module")
def eager64(trio):
    """The float64 copy of the trio's eager model: the exact answer."""
    return float64(trio[1])


def _real(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()[..., None]


def _err(got: torch.Tensor, ref64: torch.Tensor, real: torch.Tensor | None = None) -> float:
    d = got.double() - ref64
    return (d if real is None else d.masked_select(real)).abs().max().item()


def test_idle_engine_matches_eager_and_sdpa(trio, eager64):
    arch, eager, ours, _ = trio
    ids, mask = batch_inputs()
    real = _real(mask)
    ref = eager(ids, attention_mask=mask).logits
    ref64 = batch_reference(eager64, ids, mask).logits
    tol = fp32_bound(ref.masked_select(real), ref64.masked_select(real))
    got = ours(ids, attention_mask=mask).logits
    assert _err(got, ref64, real) <= tol
    if arch not in NO_SDPA:
        sdpa = variant(eager, "sdpa")(ids, attention_mask=mask).logits
        assert _err(sdpa, ref64, real) <= tol
    eager_mode = variant(eager, "eager")
    Engine(eager_mode, idle="eager")
    assert torch.equal(eager_mode(ids, attention_mask=mask).logits.masked_select(real), ref.masked_select(real))


def test_captured_rows_equal_eager_output_attentions(trio, eager64):
    arch, eager, ours, engine = trio
    ids, mask = batch_inputs()
    out = eager(ids, attention_mask=mask, output_attentions=True)
    out64 = batch_reference(eager64, ids, mask, output_attentions=True)
    with engine.run(capture=Capture(rows=ROWS, scores=True, value_norms=True)) as rec:
        logits = ours(ids, attention_mask=mask).logits
    assert sorted(rec.attn) == list(range(engine.n_layers))
    for layer, (att, att64) in enumerate(zip(out.attentions, out64.attentions, strict=True)):
        got = rec.attn[layer]
        assert got.shape == (2, att.shape[1], len(ROWS), ids.shape[1])
        tol = fp32_bound(att[:, :, ROWS], att64[:, :, ROWS])
        assert _err(got, att64[:, :, ROWS]) <= tol, f"{arch} layer {layer}"
        # a row of K fp32 probabilities sums to 1 within K ulps; softmax of the same scores within a few ulps
        assert (got.sum(-1) - 1).abs().max() <= got.shape[-1] * EPS32
        assert (torch.softmax(rec.scores[layer], -1) - got).abs().max() <= 8 * EPS32
    # capturing does not change the computation
    assert (logits - ours(ids, attention_mask=mask).logits).abs().max() == 0


def test_per_item_rows_in_a_padded_batch(trio, eager64):
    """Rows given per batch item: the padded item's rows shifted by the padding give the unpadded numbers."""
    arch, eager, ours, engine = trio
    ids, mask = batch_inputs(pad=3)
    single = ids[1:, 3:]
    with engine.run(capture=Capture(rows=[[4, 9], [4 + 3, 9]])) as rec_b:
        ours(ids, attention_mask=mask)
    with engine.run(capture=Capture(rows=[1, 6])) as rec_1:
        ours(single)
    # position ids differ between a left-padded and an unpadded run unless given; compare the padded item to
    # itself run with explicit position_ids instead, which HF then treats identically
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with engine.run(capture=Capture(rows=[[4, 9], [4, 9]])) as rec_p:
        ours(ids, attention_mask=mask, position_ids=pos)
    with engine.run(capture=Capture(rows=[1, 6])) as rec_u:
        ours(single, position_ids=torch.arange(single.shape[1])[None])
    pos1 = torch.arange(single.shape[1])[None]
    att32 = eager(single, position_ids=pos1, output_attentions=True).attentions
    att64 = eager64(single, position_ids=pos1, output_attentions=True).attentions
    for layer in rec_b.attn:
        assert rec_b.attn[layer].shape == (2, rec_b.attn[layer].shape[1], 2, ids.shape[1])
        ref32, ref64 = att32[layer][0][:, [1, 6]], att64[layer][0][:, [1, 6]]
        tol = fp32_bound(ref32, ref64)
        # the padded item and the unpadded run are each as close to the exact unpadded answer as HF's fp32 run
        assert _err(rec_p.attn[layer][1, :, :, 3:], ref64) <= tol, f"{arch} layer {layer}"
        assert _err(rec_u.attn[layer][0], ref64) <= tol, f"{arch} layer {layer}"
        assert rec_p.attn[layer][1, :, :, :3].abs().max() == 0  # no weight on padding
    assert rec_1.attn


def test_edits_equal_explicit_post_softmax_reference(trio):
    arch, eager, ours, engine = trio
    register_reference()
    ref_model = variant(eager, REF)
    ids, mask = batch_inputs()
    edits = [
        (1, 9, 7, [0, 2], 3.0),
        (1, 9, 8, None, 0.0),
        (2, 9, 6, [1], 0.25),
        (2, 5, 4, None, 5.0),
    ]
    REF_EDITS.clear()
    REF_EDITS["edits"] = edits
    try:
        ref_logits, ref_probs = ref_model(ids, attention_mask=mask).logits, REF_EDITS.pop("probs")
        ref64 = batch_reference(float64(ref_model), ids, mask)
    finally:
        REF_EDITS.clear()
    ref64_logits, ref64_probs = ref64.logits, ref64.probs
    spec = [EdgeEdit(layers=[lay], edges=[(q, k)], heads=h, scale=a) for lay, q, k, h, a in edits]
    with engine.run(capture=Capture(rows=ROWS, scores=True), edits=spec) as rec:
        logits = ours(ids, attention_mask=mask).logits
    real = _real(mask)
    tol = fp32_bound(ref_logits.masked_select(real), ref64_logits.masked_select(real))
    assert _err(logits, ref64_logits, real) <= tol, arch
    for layer in (1, 2):
        tol = fp32_bound(ref_probs[layer][:, :, ROWS], ref64_probs[layer][:, :, ROWS])
        assert _err(rec.attn[layer], ref64_probs[layer][:, :, ROWS]) <= tol, f"{arch} layer {layer}"
        # the recorded scores carry log α on the edited edges: their plain softmax is the edited row
        assert (torch.softmax(rec.scores[layer], -1) - rec.attn[layer]).abs().max() <= 8 * EPS32
    assert (rec.attn[1][:, :, 1, 8] == 0).all()  # knocked out: exactly zero, every head


def test_identity_edits_change_nothing(trio):
    _, _, ours, engine = trio
    ids, mask = batch_inputs()
    base = ours(ids, attention_mask=mask).logits
    identity = [
        EdgeEdit(layers=[0, 1, 2], edges=[(9, 3), (5, 0)], scale=1.0),
        EdgeEdit(layers=[1], edges=[(9, 3)], scale=0.0, heads=[]),
        EdgeEdit(layers=[1], edges=[], scale=0.0),
    ]
    with engine.run(edits=identity):
        got = ours(ids, attention_mask=mask).logits
    assert kl(base[0, -1], got[0, -1]) == 0.0
    assert torch.equal(base, got)


def test_refusals(trio):
    arch, _, ours, engine = trio
    ids, mask = batch_inputs()
    with pytest.raises(CausalEdgeError, match="after the query"):
        with engine.run(edits=[EdgeEdit(layers=[1], edges=[(5, 6)], scale=2.0)]):
            pass
    with pytest.raises(MaskedRowError, match="every key of query row 2"):
        with engine.run(edits=[EdgeEdit(layers=[1], edges=[(2, 0), (2, 1), (2, 2)], scale=0.0)]):
            ours(ids[:1])
    if arch in SLIDING:
        # key 2 is outside the 4-token window of query 9 in sliding layers (layer 0 slides in every sliding arch)
        with pytest.raises(CausalEdgeError, match="sliding window"):
            with engine.run(edits=[EdgeEdit(layers=[0], edges=[(9, 2)], scale=2.0)]):
                ours(ids[:1])
    with pytest.raises(CausalEdgeError, match="padding"):
        with engine.run(edits=[EdgeEdit(layers=[1], edges=[(1, 9, 1)], scale=2.0)]):
            ours(ids, attention_mask=mask)


def test_generate_under_the_engine(trio):
    arch, eager, ours, engine = trio
    ids = batch_inputs()[0][:1]
    plain = eager.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), plain)
    knock = [EdgeEdit(layers=[0, 1, 2], edges=[(9, k) for k in (6, 7, 8)], scale=0.0)]  # inside any window
    with engine.run(edits=knock):
        steered = ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with engine.run(edits=knock):
        direct = ours(steered[:, :-1]).logits
    # each steered greedy token is the argmax of the steered full-sequence forward (same intervention)
    assert torch.equal(direct[0, ids.shape[1] - 1 :].argmax(-1), steered[0, ids.shape[1] :])


def test_residual_capture_and_add(trio, eager64):
    arch, eager, ours, engine = trio
    ids, mask = batch_inputs()
    out = eager(ids, attention_mask=mask, output_hidden_states=True)
    out64 = batch_reference(eager64, ids, mask, output_hidden_states=True)
    with engine.run(residual_capture=ResidualCapture(where=("pre", "post"))) as rec:
        base = ours(ids, attention_mask=mask).logits
    for layer in range(engine.n_layers):
        real = _real(mask)
        tol = fp32_bound(out.hidden_states[layer].masked_select(real), out64.hidden_states[layer].masked_select(real))
        assert _err(rec.resid[(layer, "pre")], out64.hidden_states[layer], real) <= tol, f"{arch} {layer}"
        if layer + 1 < engine.n_layers:
            assert torch.equal(rec.resid[(layer, "post")], rec.resid[(layer + 1, "pre")])
    d = rec.resid[(0, "pre")].shape[-1]
    with engine.run(residual_adds=[ResidualAdd(layer=1, vector=torch.zeros(d), positions=[4])]):
        assert torch.equal(ours(ids, attention_mask=mask).logits, base)
    vec = torch.randn(d)
    with engine.run(
        residual_adds=[ResidualAdd(layer=1, vector=vec, positions=[4])],
        residual_capture=ResidualCapture(layers=[1], where=("pre",)),
    ) as rec2:
        steered = ours(ids, attention_mask=mask).logits
    # x + v in fp32 rounds once: within an ulp of the larger magnitude
    expect = rec.resid[(1, "pre")][:, 4] + vec
    assert (rec2.resid[(1, "pre")][:, 4] - expect).abs().max() <= 2 * EPS32 * expect.abs().max()
    assert torch.equal(rec2.resid[(1, "pre")][:, 5], rec.resid[(1, "pre")][:, 5])
    assert torch.equal(steered[:, :4], base[:, :4])  # positions before the add cannot see it
    assert (steered[:, 4:] - base[:, 4:]).abs().max() > 1e-4


def test_many_row_knockouts_equal_explicit_reference(trio):
    """Knockouts of many rows (every query → one key, as `to-marker` does) go through SDPA with an edited mask; the
    result equals the float64 reference with explicitly zeroed and renormalised weights, for every head and for a
    subset, with the rows no edit touches unchanged."""
    arch, eager, ours, engine = trio
    layers = [i for i, w in enumerate(runner_windows(ours)) if w is None]
    if not layers:
        pytest.skip(f"{arch}: every layer slides (window 4), so no key is seen by 16 or more queries")
    layer = layers[-1]
    ids, mask = batch_inputs(length=40, pad=5)
    column = [(layer, q, 12, None, 0.0) for q in range(12, 40)]  # 28 rows: the whole-layer masked SDPA
    subset = [(layer, q, 20, [1, 2], 0.0) for q in range(20, 38)]  # 18 rows, 2 heads: idle SDPA + edited rows
    register_reference()
    ref_model = float64(variant(eager, REF))
    for edits in (column, subset):
        REF_EDITS.clear()
        REF_EDITS["edits"] = edits
        try:
            ref64 = batch_reference(ref_model, ids, mask)
        finally:
            REF_EDITS.clear()
        ref32 = ours(ids, attention_mask=mask).logits  # the unedited fp32 run: its error sets the scale
        base64 = batch_reference(float64(eager), ids, mask).logits
        real = _real(mask)
        spec = [
            EdgeEdit(layers=[lay], edges=[(q, k) for _, q, k, _, _ in edits], heads=edits[0][3], scale=0.0)
            for lay in {e[0] for e in edits}
        ]
        with engine.run(edits=spec) as rec:
            got = ours(ids, attention_mask=mask).logits
        if arch in NO_SDPA:  # softcapping: every layer is explicit anyway
            assert rec.paths[layer] == "full"
        else:
            assert rec.paths == {layer: "masked-sdpa"}
        tol = fp32_bound(ref32.masked_select(real), base64.masked_select(real))
        assert _err(got, ref64.logits, real) <= tol, arch
        assert (got - ref32)[:, 12:].abs().max() > 10 * tol  # the knockout does change the output
        assert torch.equal(got[:, :12], ref32[:, :12])  # queries before the first edited row: untouched
