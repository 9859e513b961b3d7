"""Left-padded batches equal one-by-one runs within fp32 rounding, on several architectures and the real model.

The bound: every batched item is within `fp32_bound` of the float64 answer for that sequence alone (4× the error
HF's own fp32 run makes on it, plus 16 ulps), exactly as its one-by-one run is; so batched and one-by-one differ
by at most twice that. Padding itself contributes nothing: padded keys get weight exactly 0, and each item gets its
own positions (0 at its first real token).
"""

from __future__ import annotations

import pytest
import torch

import plipy
from conftest import corpus_subset
from plipy.corpus import token_positions
from plipy.divergence import kl_divergence
from plipy.engine import Capture, Engine
from plipy.engine.batch import MAX_BATCH_TOKENS, pad_left, plan_batches
from plipy.engine.runner import ConditionRunner
from plipy.experiments import generate as gen
from plipy.experiments import knockout as ko
from plipy.runtime.driver import RunOptions, execute
from tiny_models import build, float64, fp32_bound, variant

ARCHS3 = ["llama", "gpt2", "gemma3"]  # RoPE + GQA, absolute positions, sliding windows + global layers
SEQS = [[5, 17, 33, 9, 60, 2, 71, 14, 90, 3, 44, 8], [21, 7, 99, 13, 42, 6], [64, 3, 18, 27, 50, 11, 77, 31, 9]]
ROWS = [[9], [4], [6]]


def _err(got: torch.Tensor, ref64: torch.Tensor) -> float:
    return (got.double() - ref64).abs().max().item()


# -- planning and padding --------------------------------------------------------------------------------------------


def test_plan_batches_is_deterministic_and_bounded():
    lengths = [30, 5, 12, 5, 700, 44, 12, 9000, 3]
    batches = plan_batches(lengths, 3, max_tokens=1000)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each index once
    assert all(len(b) <= 3 for b in batches)
    assert all(len(b) * max(lengths[i] for i in b) <= 1000 or len(b) == 1 for b in batches)
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)  # similar lengths share a batch
    assert batches == plan_batches(lengths, 3, max_tokens=1000)
    assert plan_batches([10] * 5, 16) == [[0, 1, 2, 3, 4]] and MAX_BATCH_TOKENS >= 8192


def test_pad_left_positions_match_generate():
    p = pad_left(SEQS, pad_id=0)
    assert p.ids.shape == (3, 12) and p.pads == [0, 6, 3]
    assert p.ids[1, :6].tolist() == [0] * 6 and p.ids[1, 6:].tolist() == SEQS[1]
    assert p.positions[1].tolist() == [0] * 6 + list(range(6)) and p.positions[0].tolist() == list(range(12))
    assert p.shift(ROWS) == [[9], [10], [9]]
    assert pad_left([[1, 2], [3, 4]], 0).forward_kwargs() == {}  # nothing padded: run as plain inputs


# -- the runner's batched baselines on tiny models ----------------------------------------------------------------


@pytest.fixture(scope="module", params=ARCHS3)
def tiny(request, one_thread):
    arch = request.param
    eager = build(arch, "eager")
    ours = variant(eager, "sdpa")
    return arch, eager, ours, Engine(ours), float64(eager)


def test_batched_baselines_equal_one_by_one(tiny):
    arch, eager, ours, engine, model64 = tiny
    runner = ConditionRunner(ours, engine)
    batched = runner.baselines(SEQS, rows=ROWS)
    for seq, rows, b in zip(SEQS, ROWS, batched, strict=True):
        ids = torch.tensor([seq])
        alone = runner.baseline(seq, capture=Capture(rows=rows))
        out32 = eager(ids, output_attentions=True, output_hidden_states=True)
        out64 = model64(ids, output_attentions=True, output_hidden_states=True)
        tol = fp32_bound(out32.logits[0, -1], out64.logits[0, -1])
        assert b.input_ids.tolist() == [seq]
        assert _err(b.logits, out64.logits[0, -1]) <= tol, arch
        assert _err(alone.logits, out64.logits[0, -1]) <= tol, arch
        for layer, att in enumerate(out64.attentions):
            ref = att[0][:, rows]
            tol = fp32_bound(out32.attentions[layer][0][:, rows], ref)
            assert b.attn[layer].shape == ref.shape
            assert _err(b.attn[layer], ref) <= tol, f"{arch} layer {layer}"
        for layer, h in enumerate(out64.hidden_states[1:-1]):  # resid_post of every layer but the last (normed)
            tol = fp32_bound(out32.hidden_states[layer + 1], h)
            assert _err(b.resid[layer], h) <= tol, f"{arch} resid {layer}"
        for (kb, vb), (ka, va) in zip(b.kv, alone.kv, strict=True):
            assert kb.shape == ka.shape and vb.shape == va.shape  # the padding is cut off


def test_conditions_on_batched_baselines(tiny):
    """Knockouts run from a batched baseline give the KL the one-by-one baseline gives, within the logits'
    rounding: |ΔKL| ≤ 2·max|Δlogits| (KL moves by at most one unit per unit shift of a logit, twice over)."""
    arch, eager, ours, engine, model64 = tiny
    runner = ConditionRunner(ours, engine, max_batch=4)
    windows = ko.layer_windows(ours)
    for seq, base in zip(SEQS, runner.baselines(SEQS), strict=True):
        q = len(seq) - 1
        conds = [ko.condition_edits([(q, q - 1), (q, q - 2)], [layer], None, windows) for layer in range(3)]
        alone = runner.baseline(seq)
        ids = torch.tensor([seq])
        tol = fp32_bound(eager(ids).logits[0, -1], model64(ids).logits[0, -1])
        for a, b in zip(runner.run(base, conds), runner.run(alone, conds), strict=True):
            assert a.status == b.status == "ok"
            ka, kb = float(kl_divergence(base.logits, a.logits)), float(kl_divergence(alone.logits, b.logits))
            assert abs(ka - kb) <= 2 * 2 * 2 * tol, arch
        assert float(kl_divergence(base.logits, runner.run(base, [[]])[0].logits)) == 0.0  # identity: exactly 0


# -- experiments on the real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_subset(tmp_path_factory.mktemp("batch"), {"python_doctest": 3, "rust_test": 3})


@pytest.fixture(scope="module")
def smollm64(smollm):
    return float64(variant(smollm.model, "eager"))


def test_scan_batched_equals_one_by_one(smollm, smollm64, corpus):
    one = plipy.scan(smollm, corpus, resamples=200, batch_size=1, resume=False)
    many = plipy.scan(smollm, corpus, resamples=200, batch_size=4, resume=False)
    assert one["provenance"]["config"]["batch_size"] == 1 and many["provenance"]["config"]["batch_size"] == 4
    eager = variant(smollm.model, "eager")
    for s1, s4 in zip(one["samples"], many["samples"], strict=True):
        sp = token_positions(corpus.sample(s1["id"]), smollm.tokenizer)
        ids = torch.tensor([sp.input_ids])
        with torch.inference_mode():
            a32 = torch.stack(eager(ids, output_attentions=True).attentions)[:, 0, :, sp.marker_token]
            a64 = torch.stack(smollm64(ids, output_attentions=True).attentions)[:, 0, :, sp.marker_token]
        tol = fp32_bound(a32, a64)  # [layers, heads, keys]: the marker rows
        ref = a64[:, :, sp.target_tokens].mean(-1)  # per-head target mean
        for s in (s1, s4):
            assert _err(torch.tensor(s["attention_per_head"]), ref) <= tol
        assert abs(s1["uniform_null"] - s4["uniform_null"]) == 0


def test_dose_and_knockout_batched_equal_one_by_one(smollm, corpus):
    """Dose and knockout from batched baselines: the same statuses, attention rows within the scan's rounding, and
    KL within 2·max|Δlogits| of the one-by-one run (max|Δlogits| from the fp32 error on these very samples)."""
    kw = dict(layers=[14], doses=[0.5, 1.0, 3.0], resume=False)
    d1 = plipy.steer.dose(smollm, corpus, **kw, batch_size=1)
    d3 = plipy.steer.dose(smollm, corpus, **kw, batch_size=3)
    ids = [torch.tensor([token_positions(s, smollm.tokenizer).input_ids]) for s in corpus.samples(["rust_test"])]
    eager, eager64 = variant(smollm.model, "eager"), float64(variant(smollm.model, "eager"))
    with torch.inference_mode():
        tol = max(fp32_bound(eager(x).logits[0, -1], eager64(x).logits[0, -1]) for x in ids)
    for r1, r3 in zip(d1["doses"], d3["doses"], strict=True):
        for a, b in zip(r1["samples"], r3["samples"], strict=True):
            assert a["status"] == b["status"] == "ok"
            assert abs(a["kl"] - b["kl"]) <= 2 * 2 * 2 * tol
            if r1["scale"] == 1.0:
                assert a["kl"] == b["kl"] == 0.0
    cond = [ko.Condition([14], "14"), ko.Condition([3, 4], "3-4")]
    k1 = execute(ko.Knockout(corpus, cond, n_resamples=200), smollm, RunOptions(resume=False, batch_size=1))
    k4 = execute(ko.Knockout(corpus, cond, n_resamples=200), smollm, RunOptions(resume=False, batch_size=4))
    for r1, r4 in zip(k1["runs"], k4["runs"], strict=True):
        for a, b in zip(r1["samples"], r4["samples"], strict=True):
            assert (a["id"], a["status"]) == (b["id"], b["status"])
            if a["status"] == "ok":
                assert abs(a["kl"] - b["kl"]) <= 2 * 2 * 2 * tol


def test_generate_batched_equals_one_by_one_greedy(smollm):
    """Greedy batched generation gives each prompt its one-by-one continuation, unless the two part at a near-tie
    (top-2 logits of the one-by-one run closer than twice the fp32 rounding bound), where either token is greedy."""
    from plipy.engine import EdgeEdit

    prompts, _ = gen.load_prompts()
    cfg = dict(scale=3.0, max_tokens=10)
    items = []
    for p in prompts[:4]:
        ids, edge, _ = gen.prompt_edge(smollm.tokenizer, p["prompt"], p["id"], "fn ", "#[test]")
        items.append((ids, edge))
    engine = Engine(smollm.model)
    batched = gen.generate_pairs(smollm, engine, items, [14], **cfg)
    eager, eager64 = variant(smollm.model, "eager"), float64(variant(smollm.model, "eager"))
    for (ids, edge), pair in zip(items, batched, strict=True):
        alone = gen.generate_pairs(smollm, engine, [(ids, edge)], [14], **cfg)[0]
        for steer, got, ref in zip((False, True), pair, alone, strict=True):
            if got == ref:
                continue
            j = next(i for i, (x, y) in enumerate(zip(got, ref, strict=False)) if x != y)
            x = torch.tensor([ids + ref[:j]])
            edits = [EdgeEdit([14], [edge], 3.0)] if steer else []
            with torch.inference_mode(), engine.run(edits=edits):
                top = smollm.model(x).logits[0, -1].topk(2).values
                tol = fp32_bound(eager(x).logits[0, -1], eager64(x).logits[0, -1])
            assert float(top[0] - top[1]) <= 2 * tol, f"parted at token {j} without a near-tie"
