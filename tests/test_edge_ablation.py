"""Mean and resample ablation of knockout's edges (`EdgeEdit.mass`, `plipy knockout --ablation`), against eager
attention written from scratch in this suite (`tiny_models`' reference, float64) that sets a row's edge weights to
a total and rescales the rest; the clean weights the ablations use are read from that reference's own runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import plipy
from conftest import corpus_subset
from plipy.engine import Capture, EdgeEdit, Engine
from plipy.engine.runner import ConditionRunner
from plipy.errors import CausalEdgeError, MaskedRowError, PlipyError
from plipy.experiments import knockout as ko
from plipy.models import load_tokenizer, wrap_model
from plipy.runtime.driver import RunOptions, execute
from tiny_models import REF, REF_EDITS, build, float64, fp32_bound, register_reference, variant

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["llama", "qwen2", "gemma", "gpt2", "starcoder2"]  # GQA, MQA, Conv1D heads, a sliding window
T = 14


def _ref_logits(model: torch.nn.Module, ids, masses=(), edits=()) -> tuple[torch.Tensor, dict]:
    """Last-position logits (float64) of the reference model with these mass edits, and its per-layer weights."""
    REF_EDITS.clear()
    REF_EDITS["masses"], REF_EDITS["edits"] = list(masses), list(edits)
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor([list(ids)])).logits[0, -1].double()
        return logits, dict(REF_EDITS.get("probs", {}))
    finally:
        REF_EDITS.clear()


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    arch = request.param
    extra = {"sliding_window": 6} if arch == "starcoder2" else {}
    model = build(arch, "eager" if arch == "starcoder2" else "sdpa", **extra)
    register_reference()
    ref32, ref64 = variant(model, REF), variant(float64(model), REF)
    ids = torch.randint(3, 128, (T,), generator=torch.Generator().manual_seed(5)).tolist()
    return arch, model, Engine(model), ref32, ref64, ids


def _logits(model, engine, ids, edits=(), capture=None):
    with torch.no_grad(), engine.run(edits=edits, capture=capture) as rec:
        return model(torch.tensor([ids])).logits[0, -1], rec


def test_mass_edit_equals_the_reference(tiny):
    """Per-head masses on a row's edges in two layers (the marker row → three keys; one head of a GQA group alone):
    the logits equal the float64 reference's within fp32 rounding, and differ from the unedited run."""
    arch, model, engine, ref32, ref64, ids = tiny
    n_heads = model.config.num_attention_heads
    q, keys = 11, [2, 5, 7] if arch != "starcoder2" else [7, 9]  # starcoder2: inside its window of 6
    rng = np.random.default_rng(0)
    heads = [0, 1] if n_heads > 2 else [0]
    mass = rng.uniform(0.05, 0.95, size=(2, len(heads)))
    edits = [
        EdgeEdit([layer], [(q, k) for k in keys], heads=heads, mass=torch.tensor(mass[j]).repeat(len(keys), 1))
        for j, layer in enumerate((0, 1))
    ]
    got, _ = _logits(model, engine, ids, edits)
    refs = {}
    for name, ref in (("32", ref32), ("64", ref64)):
        masses = [(layer, q, keys, heads, list(mass[j])) for j, layer in enumerate((0, 1))]
        refs[name] = _ref_logits(ref, ids, masses)[0]
    err = (got.double() - refs["64"]).abs().max().item()
    assert err <= fp32_bound(refs["32"], refs["64"]), (arch, err)
    plain = _ref_logits(ref64, ids)[0]
    assert (plain - refs["64"]).abs().max() > 100 * fp32_bound(refs["32"], refs["64"])  # the edit does something


def test_mass_zero_is_the_knockout_and_own_mass_the_identity(tiny):
    """Mass 0 is the knockout (−∞ before the softmax) within fp32 rounding of the float64 knockout; a row set to the
    mass it already carries leaves the logits bit for bit."""
    arch, model, engine, ref32, ref64, ids = tiny
    q, keys = 12, [8, 10]
    edges = [(q, k) for k in keys]
    zero, _ = _logits(model, engine, ids, [EdgeEdit([1], edges, mass=[0.0, 0.0])])
    knock, _ = _logits(model, engine, ids, [EdgeEdit([1], edges, scale=0.0)])
    r32 = _ref_logits(ref32, ids, edits=[(1, q, k, None, 0.0) for k in keys])[0]
    r64 = _ref_logits(ref64, ids, edits=[(1, q, k, None, 0.0) for k in keys])[0]
    for got in (zero, knock):
        assert (got.double() - r64).abs().max().item() <= fp32_bound(r32, r64), arch
    plain, _ = _logits(model, engine, ids)
    _, rec = _logits(model, engine, ids, capture=Capture(rows=[q], layers=[1]))
    chosen = torch.zeros(rec.attn[1].shape[-1], dtype=torch.float64)
    chosen[keys] = 1.0
    own = (rec.attn[1][0, :, 0].double() * chosen).sum(-1)  # [heads]: the row's own edge mass
    same, _ = _logits(model, engine, ids, [EdgeEdit([1], edges, mass=own.repeat(len(keys), 1))])
    assert torch.equal(same, plain), arch


def test_mass_edits_are_refused_where_they_cannot_apply():
    model = build("llama", "sdpa")
    engine = Engine(model)
    ids = list(range(3, 3 + T))
    bad = [
        (EdgeEdit([0], [(4, 2)], mass=[1.5]), PlipyError, "between 0 and 1"),
        (EdgeEdit([0], [(4, 2)], mass=[float("nan")]), PlipyError, "between 0 and 1"),
        (EdgeEdit([0], [(4, 2), (4, 3)], mass=[0.2, 0.3]), PlipyError, "one query row were given different"),
        (EdgeEdit([0], [(4, 2)], mass=torch.ones(1, 3)), PlipyError, "edge mass of shape"),
        (EdgeEdit([0], [(4, 6)], mass=[0.5]), CausalEdgeError, "causally masked"),
        # every key of row 2 is an edge: no other key can take the rest of the weight
        (EdgeEdit([0], [(2, 0), (2, 1), (2, 2)], mass=[0.5, 0.5, 0.5]), MaskedRowError, "no rescaling"),
    ]
    for edit, err, msg in bad:
        with pytest.raises(err, match=msg):
            _logits(model, engine, ids, [edit])


def test_fast_runner_equals_naive_for_mass_edits():
    """The knockout runner's cached-prefix path and its naive path both give the float64 reference's logits for
    mass edits (several layers)."""
    model = build("qwen2", "sdpa")
    engine = Engine(model)
    fast, naive = ConditionRunner(model, engine, max_batch=3), ConditionRunner(model, engine, path="naive")
    ids = torch.randint(3, 128, (T,), generator=torch.Generator().manual_seed(2)).tolist()
    conds = [
        [EdgeEdit([layer], [(10, 3), (10, 4)], mass=[m, m]) for layer in layers]
        for layers, m in (([0], 0.3), ([1, 2], 0.9), ([0, 1, 2], 0.0))
    ]
    of, on = fast.run(fast.baseline(ids), conds), naive.run(naive.baseline(ids), conds)
    assert [o.status for o in of] == ["ok"] * 3
    register_reference()
    ref32, ref64 = variant(model, REF), variant(float64(model), REF)
    n_heads = model.config.num_attention_heads
    for (layers, m), a, b in zip((([0], 0.3), ([1, 2], 0.9), ([0, 1, 2], 0.0)), of, on, strict=True):
        masses = [(layer, 10, [3, 4], None, [m] * n_heads) for layer in layers]
        r32, r64 = _ref_logits(ref32, ids, masses)[0], _ref_logits(ref64, ids, masses)[0]
        for got in (a.logits, b.logits):  # each path against the float64 reference
            assert (got.double() - r64).abs().max().item() <= fp32_bound(r32, r64), layers


# -- the knockout experiment ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    tok, _ = load_tokenizer("smollm2-135m")
    corpus = corpus_subset(tmp_path_factory.mktemp("c"), {"python_doctest": 3, "rust_test": 3})
    model = build("qwen2", "sdpa", vocab_size=len(tok))
    register_reference()
    ref32, ref64 = variant(model, REF), variant(float64(model), REF)
    return tok, corpus, wrap_model(model, tok, spec="tiny-qwen2"), ref32, ref64


def _kl(a: torch.Tensor, b: torch.Tensor) -> float:
    p, q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return float((p.exp() * (p - q)).sum())


def _kl_bound(b32, b64, k32, k64) -> float:
    """|ΔKL| from fp32 logit errors, to first order (as tests/test_knockout_heads.py derives it), doubled."""
    lp, lq = torch.log_softmax(b64, -1), torch.log_softmax(k64, -1)
    p, q = lp.exp(), lq.exp()
    kl = float((p * (lp - lq)).sum())
    s_a, s_b = float((p * ((lp - lq) - kl).abs()).sum()), float((q - p).abs().sum())
    return 2 * (fp32_bound(b32, b64) * s_a + fp32_bound(k32, k64) * s_b) + 1e-12


def _clean_masses(setting) -> dict[str, torch.Tensor]:
    """The clean marker → target weight per sample `[layers 0-1, heads]` that plipy's first pass measured."""
    tok, corpus, lm, _, _ = setting
    experiment = ko.Knockout(corpus, ko.build_conditions("layers", lm.n_layers, layers=[0, 1]))
    masses = execute(experiment.masses_phase(lm), lm, RunOptions(resume=False))
    return {sid: torch.as_tensor(m[:2, :, 0]) for sid, m in masses.items()}


def test_clean_masses_equal_the_reference(setting):
    """The first pass's clean edge masses equal the float64 reference's within fp32 rounding."""
    tok, corpus, _, ref32, ref64 = setting
    by_id = {s.id: s for s in corpus.samples()}
    for sid, got in _clean_masses(setting).items():
        sp = plipy.token_positions(by_id[sid], tok)
        keys = sorted({t for t in sp.target_tokens if t is not None and t < sp.marker_token})
        want = {}
        for name, ref in (("32", ref32), ("64", ref64)):
            _, probs = _ref_logits(ref, sp.input_ids)
            want[name] = torch.stack([probs[layer][0, :, sp.marker_token, keys].double().sum(-1) for layer in (0, 1)])
        assert (got - want["64"]).abs().max().item() <= fp32_bound(want["32"], want["64"]), sid


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_knockout_ablation_equals_the_reference(setting, kind):
    """`plipy.knockout(..., ablation=kind)` on layers 0-1: each sample's KL equals the reference's, whose marker
    rows are set to the group mean (or the donor's value) of the clean masses, per layer and head."""
    tok, corpus, lm, ref32, ref64 = setting
    r = plipy.knockout(lm, corpus, layers="0-1", ablation=kind, resamples=50, seed=3, progress=False)
    assert r["ablation"]["kind"] == kind and r["provenance"]["config"]["ablation"] == kind
    assert r.default_path().name.endswith(f"-{kind}.json")
    by_id = {s.id: s for s in corpus.samples()}
    recs = {s["id"]: s for s in r["samples"]}
    clean = _clean_masses(setting)
    checked = 0
    for s in r["runs"][0]["samples"]:
        rec = recs[s["id"]]
        if kind == "mean":
            value = torch.stack([clean[i] for i in recs if recs[i]["group"] == rec["group"]]).mean(0)
            means = r["ablation"]["means"][rec["group"]]
            got_mean = torch.tensor([means[str(layer)] for layer in (0, 1)], dtype=torch.float64)
            assert torch.allclose(got_mean, value, rtol=1e-12, atol=0)
        else:
            assert rec["donor"] != rec["id"] and recs[rec["donor"]]["group"] == rec["group"]
            value = clean[rec["donor"]]
        sp = plipy.token_positions(by_id[s["id"]], tok)
        ids, m = sp.input_ids, sp.marker_token
        keys = sorted({t for t in sp.target_tokens if t is not None and t < m})  # the edges by the rule
        assert rec["edges"] == [[m, k] for k in keys], s["id"]
        edits = [(layer, m, keys, None, value[layer].tolist()) for layer in (0, 1)]
        b32, b64 = _ref_logits(ref32, ids)[0], _ref_logits(ref64, ids)[0]
        k32, k64 = _ref_logits(ref32, ids, edits)[0], _ref_logits(ref64, ids, edits)[0]
        assert abs(s["kl"] - _kl(b64, k64)) <= _kl_bound(b32, b64, k32, k64), s["id"]
        checked += 1
    assert checked == 6


def test_zero_ablation_is_the_knockout(setting):
    """`ablation="zero"` is plain knockout: the same numbers, the same document (no `ablation` block)."""
    _, corpus, lm, _, _ = setting
    a = plipy.knockout(lm, corpus, layer=1, resamples=50, progress=False, fresh=True)
    b = plipy.knockout(lm, corpus, layer=1, ablation="zero", resamples=50, progress=False, fresh=True)
    assert "ablation" not in b and [s["kl"] for s in a["runs"][0]["samples"]] == [
        s["kl"] for s in b["runs"][0]["samples"]
    ]
    with pytest.raises(PlipyError, match="ablation"):
        plipy.knockout(lm, corpus, layer=1, ablation="median", progress=False)


def test_cli_mean_ablation(monkeypatch, setting, tmp_path, capsys):
    from plipy import cli

    _, corpus, lm, _, _ = setting
    monkeypatch.setattr("plipy.models.load_model", lambda *a, **k: lm)
    out = tmp_path / "k.json"
    with pytest.raises(SystemExit) as e:
        cli.main(
            ["knockout", "--corpus", str(corpus.path), "--layer", "1", "--ablation", "mean", "--resamples", "50"]
            + ["--out", str(out)]
        )
        raise SystemExit(0)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "Mean ablation of the edges (marker-to-targets" in text and "KL(base ‖ mean)" in text
    assert "mean ablation: each edited row's total weight" in " ".join(text.split())
    doc = plipy.load_result(out)
    api = plipy.knockout(lm, corpus, layer=1, ablation="mean", resamples=50, progress=False, fresh=True)
    assert doc["ablation"] == api["ablation"]  # the flag reached the api as given
    assert [s["kl"] for s in doc["runs"][0]["samples"]] == [s["kl"] for s in api["runs"][0]["samples"]]
