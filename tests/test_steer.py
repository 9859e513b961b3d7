"""Attention steering on SmolLM2: exact identity at α = 1, agreement with an explicit post-softmax reference, exact
target attention, causal refusal, --skip-invalid, steered generation, and the CLI end to end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import scipy.stats
import torch

import plipy
from conftest import corpus_subset
from plipy import cli
from plipy.corpus import load_corpus, token_positions
from plipy.divergence import kl_divergence
from plipy.engine import EdgeEdit, Engine
from plipy.engine.runner import ConditionRunner
from plipy.errors import PlipyError
from plipy.experiments import edge_steering as es
from plipy.experiments import generate as gen
from tiny_models import REF, REF_EDITS, build, register_reference, variant

PICK = {"python_doctest": 2, "rust_test": 2, "rust_baseline": 1}  # rust_baseline: every target after the marker


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return corpus_subset(tmp_path_factory.mktemp("corpus"), PICK)


@pytest.fixture(scope="module")
def runner(smollm):
    return ConditionRunner(smollm.model, Engine(smollm.model))


# -- the closed form -------------------------------------------------------------------------------------------------


def test_closed_form_and_solver():
    """One head, one target: the steered share is αp/(αp+1−p) and the α reaching v is v(1−p)/(p(1−v))."""
    row = torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)
    p, v = 0.2, 0.6
    alpha, why = es.scale_for_attention(row, [1], [1], v)
    assert why is None and alpha == pytest.approx(v * (1 - p) / (p * (1 - v)), rel=1e-10)
    assert es.attention_metric(es.steered_rows(row, [1], alpha), [1]) == pytest.approx(v, abs=1e-12)
    # several heads, a duplicated target (metric counts it twice, the edge scales it once)
    rows = torch.softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(0)), -1)
    targets, keys = [0, 2, 2, 5], [0, 2, 5]
    alpha, _ = es.scale_for_attention(rows, targets, keys, 0.3)
    assert es.attention_metric(es.steered_rows(rows, keys, alpha), targets) == pytest.approx(0.3, abs=1e-12)
    alpha, _ = es.scale_for_attention(rows, targets, keys, 0.2, heads=[1, 3])
    assert es.attention_metric(es.steered_rows(rows, keys, alpha, heads=[1, 3]), targets) == pytest.approx(0.2)
    assert es.scale_for_attention(rows, targets, keys, 0.9)[0] is None  # above the α → ∞ limit (≈ 1/3 here)


def test_fisher_matches_plip():
    """PLIP-rs' one-sided Fisher p for 7/50 (baseline) vs 10/50 (steered) is 0.2977."""
    p = scipy.stats.fisher_exact([[10, 40], [7, 43]], alternative="greater")[1]
    assert p == pytest.approx(0.2977, abs=1e-4)
    assert gen.fisher_one_sided(7, 10, 50) == p


def test_runner_capture_fast_equals_naive():
    """The runner's optional capture: post-edit rows per condition, identical on both paths (staircase items
    not yet edited at a layer and rows before the first edited query come from the baseline)."""
    from plipy.engine import Capture, EdgeEdit

    model = build("llama")
    engine = Engine(model)
    ids = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(5))
    conds = [
        [EdgeEdit([2], [(9, 2), (9, 4)], scale=3.0)],
        [EdgeEdit([0, 1], [(9, 0)], scale=0.5)],
        [EdgeEdit([1], [(9, 3)], scale=1.0)],
        [EdgeEdit([1], [(10, 3)], scale=2.0, heads=[1])],
    ]
    for rows in ([9], [9, 11], [2, 9]):  # [2, 9]: a row before the edits' query → those conditions run in full
        cap = Capture(rows=rows, layers=[0, 1, 2])
        got = {}
        for path in ("fast", "naive"):
            r = ConditionRunner(model, engine, path=path, max_batch=4)
            base = r.baseline(ids, capture=cap)
            got[path] = base, r.run(base, conds, capture=cap)
        (bf, of), (bn, on) = got["fast"], got["naive"]
        assert [o.status for o in of] == ["ok", "ok", "identity", "ok"]
        for layer in (0, 1, 2):
            assert torch.equal(bf.attn[layer], bn.attn[layer])
            for a, b in zip(of, on, strict=True):
                assert (a.attn[layer] - b.attn[layer]).abs().max() <= 1e-6
        assert torch.equal(of[2].attn[1], bf.attn[1])  # identity: the baseline rows
        assert torch.equal(of[0].attn[1], bf.attn[1])  # below its first edited layer: unchanged
        assert not torch.allclose(of[0].attn[2], bf.attn[2])


# -- dose: identity, reference, fast == naive --------------------------------------------------------------------


def test_scale_one_is_exact_identity(smollm, small_corpus, runner):
    """Every steerable sample of the bundled corpus: α = 1 gives KL 0.0 and the baseline attention, exactly."""
    res = plipy.steer.dose(
        smollm,
        load_corpus(),
        groups=["python_doctest", "rust_test", "python_baseline"],
        layers=[27],
        doses=[1.0],
        runner=runner,
    )
    (one,) = res["doses"]
    assert one["n"] == 25 and one["mean_kl"] == 0.0
    base = {s["id"]: s["attention_baseline"] for s in res["samples"]}
    assert all(s["kl"] == 0.0 and s["attention_achieved"] == base[s["id"]] for s in one["samples"])
    res = plipy.steer.dose(smollm, small_corpus, groups=["rust_test"], layers=[27], doses=[1.0, 2.0], runner=runner)
    one, two = res["doses"]
    assert one["scale"] == 1.0 and one["n"] == 2 and one["mean_kl"] == 0.0
    base = {s["id"]: s["attention_baseline"] for s in res["samples"]}
    for s in one["samples"]:
        assert s["kl"] == 0.0 and s["attention_achieved"] == base[s["id"]] and not s["top1_changed"]
    assert all(s["kl"] > 0 and s["attention_achieved"] > base[s["id"]] for s in two["samples"])
    assert set(res["doses"][0]) >= {"scale", "samples", "mean_kl", "std_kl", "mean_attention_achieved", "n"}


def test_agrees_with_explicit_post_softmax_reference(smollm, small_corpus):
    """An independent eager attention (tests/tiny_models.py) edits the post-softmax row in float64: ×α on the
    edges, renormalise. KL within 1e-6 and attention achieved within 1e-5, one and several layers, both paths."""
    register_reference()
    ref = variant(variant(smollm.model, "eager"), REF)
    ours = variant(smollm.model, "sdpa")
    engine = Engine(ours, idle="eager")  # eager maths in every layer, as the reference
    cases = [([14], [0.5, 3.0], None), ([14, 16], [4.0], None), ([20], [6.0], [0, 4])]
    samples = {s.id: s for s in small_corpus.samples()}
    memo: dict = {}  # reference results, shared by the two paths

    def reference(sid, edits):
        if (sid, edits) not in memo:
            ids = torch.tensor([token_positions(samples[sid], smollm.tokenizer).input_ids])
            REF_EDITS.clear()
            REF_EDITS["edits"] = [(layer, q, k, None if h is None else list(h), a) for layer, q, k, h, a in edits]
            try:
                with torch.inference_mode():
                    memo[sid, edits] = ref(ids).logits[0, -1], REF_EDITS["probs"]
            finally:
                REF_EDITS.clear()
        return memo[sid, edits]

    checked = 0
    for path in ("fast", "naive"):
        runner = ConditionRunner(ours, engine, path=path)
        for layers, doses, heads in cases:
            res = plipy.steer.dose(
                smollm,
                small_corpus,
                groups=["python_doctest", "rust_test"],
                layers=layers,
                doses=doses,
                heads=heads,
                runner=runner,
            )
            assert res["provenance"]["config"]["runner"]["path"] == path
            recs = {s["id"]: s for s in res["samples"]}
            for run in res["doses"]:
                for s in run["samples"]:
                    m, targets = recs[s["id"]]["marker_token"], recs[s["id"]]["targets"]
                    base, _ = reference(s["id"], ())
                    steered, probs = reference(
                        s["id"],
                        tuple(
                            (layer, m, k, None if heads is None else tuple(heads), run["scale"])
                            for layer in layers
                            for k in sorted(set(targets))
                        ),
                    )
                    want = [float(probs[layer][0, :, m, targets].double().mean()) for layer in layers]
                    assert s["attention_achieved_per_layer"] == pytest.approx(want, abs=1e-5)
                    assert abs(s["attention_achieved"] - sum(want) / len(want)) <= 1e-5
                    assert abs(s["kl"] - float(kl_divergence(base, steered))) <= 1e-6
                    checked += 1
    assert checked == 2 * 4 * 4


def test_target_attention_is_reached(smollm, small_corpus, runner):
    res = plipy.steer.dose(
        smollm, small_corpus, groups=["rust_test"], layers=[26], doses=[], target_attention=0.05, runner=runner
    )
    rows = res["target"]["samples"]
    assert len(rows) == 2 and res["doses"] == []
    for r in rows:
        assert r["status"] == "ok" and abs(r["attention_achieved"] - 0.05) <= 1e-4 and r["kl"] > 0
    base = {s["id"]: s["attention_baseline"] for s in res["samples"]}
    assert all((r["scale"] < 1) == (base[r["id"]] > 0.05) for r in rows)
    res = plipy.steer.dose(
        smollm, small_corpus, groups=["rust_test"], layers=[26], doses=[], target_attention=0.9, runner=runner
    )
    assert [r["status"] for r in res["target"]["samples"]] == ["unreachable"] * 2 and res["target"]["n"] == 0
    with pytest.raises(PlipyError, match="single layer"):
        plipy.steer.dose(smollm, small_corpus, layers=[3, 4], target_attention=0.1, runner=runner)


# -- causality -----------------------------------------------------------------------------------------------------


def test_causal_edge_is_refused_naming_sample_and_tokens(smollm, small_corpus, runner):
    with pytest.raises(es.SteerCausalError) as e:
        plipy.steer.dose(smollm, small_corpus, groups=["rust_test", "rust_baseline"], runner=runner)
    msg = str(e.value)
    assert "'rust_derive_debug'" in msg and "query token 0 ('#'" in msg and "key token 9 ('struct'" in msg
    assert "--skip-invalid" in msg


def test_skip_invalid_lists_and_leaves_out(smollm, small_corpus, runner):
    res = plipy.steer.dose(
        smollm,
        small_corpus,
        groups=["rust_test", "rust_baseline"],
        layers=[29],
        doses=[2.0],
        skip_invalid=True,
        runner=runner,
    )
    assert [(e["id"], e["status"]) for e in res["excluded"]] == [("rust_derive_debug", "causal-invalid")]
    assert [s["id"] for s in res["doses"][0]["samples"]] == ["rust_simple_add", "rust_option_return"]
    with pytest.raises(PlipyError, match="no steerable sample"):
        plipy.steer.dose(smollm, small_corpus, groups=["rust_baseline"], skip_invalid=True, runner=runner)


# -- calibration ---------------------------------------------------------------------------------------------------


def test_calibrate_scale_brings_b_to_a(smollm, small_corpus, runner):
    """The calibrated α, applied to group B by a real steered run, gives B's mean = A's mean."""
    cal = plipy.steer.calibrate(smollm, small_corpus, layer=25)
    a, b = cal["groups"]["python_doctest"]["mean"], cal["groups"]["rust_test"]["mean"]
    assert cal["ratio"] == pytest.approx(a / b) and cal["recommended_target"] == a
    res = plipy.steer.dose(
        smollm, small_corpus, groups=["rust_test"], layers=[25], doses=[cal["scale_to_a"]], runner=runner
    )
    assert abs(res["doses"][0]["mean_attention_achieved"] - a) <= 1e-5
    base = {s["id"]: s["attention_baseline"] for s in res["samples"]}
    assert {s["id"]: s["attention"] for s in cal["samples"] if s["group"] == "rust_test"} == pytest.approx(
        base, abs=1e-7
    )


# -- generation ----------------------------------------------------------------------------------------------------


def test_generate_same_path_and_refusal(smollm, tmp_path):
    prompts, _ = gen.load_prompts()
    two = prompts[:2]
    res = plipy.steer.generate(smollm, layers=[16], scale=1.0, max_tokens=6, limit=2)  # the first two prompts
    # α = 1 is the identity; the baseline is what plain HF greedy generation gives
    assert all(r["identical"] and r["change"] in ("none", "kept") for r in res["samples"])
    ids = torch.tensor([smollm.tokenizer(two[0]["prompt"], add_special_tokens=False).input_ids])
    with torch.inference_mode():
        plain = smollm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert res["samples"][0]["baseline"] == smollm.tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True)
    q, k = res["samples"][0]["edge"]
    assert k < q
    steered = plipy.steer.generate(smollm, layers=list(range(30)), scale=1e6, max_tokens=6, limit=2)
    assert [r["baseline"] for r in steered["samples"]] == [r["baseline"] for r in res["samples"]]
    assert not all(r["identical"] for r in steered["samples"])  # a huge dose on every layer changes something
    s = steered["summary"]
    assert s["fisher_exact_p"] == gen.fisher_one_sided(s["baseline_preserved"], s["steered_preserved"], 2)
    with pytest.raises(es.SteerCausalError, match=r"prompt 'add': edge from query token \d+ \(.+\) to key token \d+"):
        plipy.steer.generate(smollm, query_text="#[test]", key_text="fn ", max_tokens=2, limit=2)


@pytest.mark.parametrize("arch", ["gemma3", "starcoder2", "gemma2"])
def test_generate_on_sliding_window_models_past_the_window(arch):
    """generate()'s default cache drops keys beyond a sliding window (4 here, 8 + 6 tokens), after which the
    absolute positions of the new tokens and their keys are unknown. Edits on the prompt still apply (at prefill);
    an edit or capture that may fall on a generated token is refused; `generate_pairs` keeps every position. Each
    steered token equals a full forward with the edits (no cache at all), and the baseline plain greedy."""
    model = build(arch) if arch == "gemma2" else variant(build(arch), "sdpa")  # Gemma-2 has no SDPA path
    engine = Engine(model)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    edits = [EdgeEdit(layers=[0, 1], edges=[(3, 2), (7, 6)], scale=5.0)]  # (3, 2): query 3 = window − 1
    seq = ids[0].tolist()
    for _ in range(6):
        with torch.inference_mode(), engine.run(edits=edits):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode(), engine.run(edits=edits):
        default = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert default[0].tolist() == seq
    later = [EdgeEdit(layers=[0], edges=[(12, 11)], scale=5.0)]  # a generated token's query
    with pytest.raises(PlipyError, match="sliding-window cache"), engine.run(edits=later):
        model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    lm = SimpleNamespace(
        model=model, device=torch.device("cpu"), tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=None)
    )
    one = [EdgeEdit(layers=[0, 1], edges=[(7, 6)], scale=5.0)]  # generate_pairs steers one edge per prompt
    seq = ids[0].tolist()
    for _ in range(6):
        with torch.inference_mode(), engine.run(edits=one):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    [(base, steered)] = gen.generate_pairs(lm, engine, [(ids[0].tolist(), (7, 6))], [0, 1], max_tokens=6, scale=5.0)
    assert steered == seq[8:] and base == plain[0, 8:].tolist()


# -- CLI -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def main(monkeypatch, smollm):
    monkeypatch.setattr("plipy.models.load_model", lambda *a, **k: smollm)
    return cli.main


def _run(main, args):
    try:
        main(args)
    except SystemExit as e:  # success may return or exit 0
        assert e.code in (0, None)


def test_cli_dose_end_to_end(main, small_corpus, tmp_path, capsys):
    out = tmp_path / "steer.json"
    _run(
        main,
        [
            "steer",
            "dose",
            "--corpus",
            str(small_corpus.path),
            "--layers",
            "28,29",
            "--doses",
            "1,3",
            "--out",
            str(out),
            "--table-format",
            "csv",
        ],
    )
    data = json.loads(out.read_text())
    assert data["provenance"]["model"]["spec"] == "smollm2-135m" and data["layers"] == [28, 29]
    assert data["provenance"]["config"]["runner"]["path"] == "fast"
    assert [d["scale"] for d in data["doses"]] == [1.0, 3.0] and data["doses"][0]["mean_kl"] == 0.0
    for d in data["doses"]:
        assert d["n"] == 2 and all({"id", "kl", "attention_achieved", "status"} <= set(s) for s in d["samples"])
        assert all(len(s["attention_achieved_per_layer"]) == 2 for s in d["samples"])
    assert data["monotonicity"]["attention_increasing"] and (tmp_path / "steer.csv").exists()


def test_cli_dose_plot_and_target(main, small_corpus, tmp_path, capsys):
    out = tmp_path / "steer.json"
    _run(
        main,
        [
            "steer",
            "dose",
            "--corpus",
            str(small_corpus.path),
            "--layer",
            "29",
            "--doses",
            "1,3",
            "--target-attention",
            "0.2",
            "--plot",
            "--out",
            str(out),
        ],
    )
    data = json.loads(out.read_text())
    assert data["provenance"]["model"]["spec"] == "smollm2-135m" and data["layers"] == [29]
    assert data["provenance"]["config"]["runner"]["path"] == "fast"
    assert [d["scale"] for d in data["doses"]] == [1.0, 3.0] and data["doses"][0]["mean_kl"] == 0.0
    for d in data["doses"]:
        assert d["n"] == 2 and all({"id", "kl", "attention_achieved", "status"} <= set(s) for s in d["samples"])
    assert all(abs(s["attention_achieved"] - 0.2) <= 1e-4 for s in data["target"]["samples"])
    assert (tmp_path / "steer-dose.png").read_bytes()[:4] == b"\x89PNG"
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "steer.parquet").num_rows == 6
    assert "Steering" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--groups", "rust_test,rust_baseline"], "error: sample 'rust_derive_debug': edge from query token 0"),
        (["--layer", "30"], "error: --layer: layer 30 does not exist"),
        (["--doses", "1,x"], "error: --doses: cannot read"),
        (["--layers", "3,4", "--target-attention", "0.1"], "error: --target-attention: needs a single layer"),
    ],
)
def test_cli_dose_errors_write_nothing(main, small_corpus, tmp_path, capsys, args, message):
    out = tmp_path / "x.json"
    with pytest.raises(SystemExit) as e:
        main(["steer", "dose", "--corpus", str(small_corpus.path), "--out", str(out), *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.lstrip().startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_cli_calibrate_and_generate(main, small_corpus, tmp_path, capsys):
    cal = tmp_path / "cal.json"
    _run(main, ["steer", "calibrate", "--corpus", str(small_corpus.path), "--layer", "29", "--out", str(cal)])
    data = json.loads(cal.read_text())
    assert data["layer"] == 29 and data["groups"]["rust_test"]["n"] == 2 and math.isfinite(data["scale_to_a"])
    gen = tmp_path / "gen.json"
    _run(main, ["steer", "generate", "--limit", "1", "--max-tokens", "3", "--chat", "--layer", "16", "--out", str(gen)])
    data = json.loads(gen.read_text())
    assert data["summary"]["total"] == 1 and data["provenance"]["config"]["chat"] is True
    assert "<|im_start|>" not in data["samples"][0]["baseline"]
    assert "tests preserved" in capsys.readouterr().out
