"""Linear probes: plipy's accuracies equal scikit-learn called directly on residuals taken by plain forward hooks;
on hand-made data the answers are known (separable → 1.0 with a shuffled control near chance; no signal → the
majority baseline exactly); data loading, errors and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import cli_exit_code, corpus_subset
from plipy.errors import ParameterError, PlipyError
from plipy.experiments import probe as pr
from plipy.models import load_tokenizer
from plipy.results import ProbeResult, load_result
from test_lens import hf_attention
from tiny_models import build


def _hooked_residuals(model, layers_module, ids: list[int], pos: int) -> list[np.ndarray]:
    """Every decoder layer's output at `pos`, by plain torch forward hooks (not plipy's engine)."""
    got: dict[int, np.ndarray] = {}
    hooks = [
        layer.register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out)[0, pos].double().numpy()
            )
        )
        for i, layer in enumerate(layers_module)
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return [got[i] for i in range(len(layers_module))]


@pytest.mark.slow
def test_probe_equals_sklearn_on_hooked_residuals(smollm, tmp_path):
    """Same features (HF forward hooks), same estimator and folds: identical fold accuracies and permutation p."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score, permutation_test_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import plipy

    corpus = corpus_subset(tmp_path, {"python_doctest": 6, "rust_test": 6})
    samples = corpus.samples(["python_doctest", "rust_test"])
    layers = [0, 14, 29]
    X = {layer: [] for layer in layers}
    with hf_attention(smollm.model):
        for s in samples:
            ids = smollm.tokenizer(s.code, add_special_tokens=False)["input_ids"]
            res = _hooked_residuals(smollm.model, smollm.model.model.layers, ids, len(ids) - 1)
            for layer in layers:
                X[layer].append(res[layer])
    y = np.array([0 if s.group == "python_doctest" else 1 for s in samples])
    r = plipy.probe(smollm, corpus, layers=layers, folds=3, permutations=5, seed=3)
    assert r["classes"] == ["python_doctest", "rust_test"] and r["counts"] == {"python_doctest": 6, "rust_test": 6}
    assert r["majority_baseline"] == 0.5 and r["folds"] == 3 and r["n_features"] == 576
    cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=3)
    est = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    for rec in r["layers"]:
        Xl = np.stack(X[rec["layer"]])
        folds = cross_val_score(est, Xl, y, cv=cv)
        assert rec["fold_accuracies"] == folds.tolist() and rec["accuracy"] == folds.mean()
        _, perm, p = permutation_test_score(est, Xl, y, cv=cv, n_permutations=5, random_state=3)
        assert rec["p_perm"] == p and rec["shuffled_mean"] == perm.mean()


@pytest.mark.parametrize(
    ("arch", "layers_of"),
    [("llama", lambda m: m.model.layers), ("gpt2", lambda m: m.transformer.h), ("gemma", lambda m: m.model.layers)],
)
def test_probe_equals_sklearn_on_tiny_models(arch, layers_of, tiny_tok, tmp_path):
    """Random tiny models of three families: the same equality with scikit-learn on hooked residuals."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import plipy
    from plipy.models import wrap_model

    model = build(arch, "sdpa", vocab_size=len(tiny_tok))
    corpus = corpus_subset(tmp_path, {"python_doctest": 6, "rust_test": 6})
    samples = corpus.samples()
    feats = []
    for s in samples:
        sp = plipy.token_positions(s, tiny_tok)
        feats.append(_hooked_residuals(model, layers_of(model), sp.input_ids, sp.marker_token))
    y = np.array([s.group == "rust_test" for s in samples], dtype=int)
    r = plipy.probe(
        wrap_model(model, tiny_tok, spec=f"tiny-{arch}"), corpus, feature="marker", folds=3, permutations=0, C=0.5
    )
    cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    est = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000))
    for rec in r["layers"]:
        Xl = np.stack([f[rec["layer"]] for f in feats])
        assert rec["fold_accuracies"] == cross_val_score(est, Xl, y, cv=cv).tolist()


def test_separable_data_is_perfect_and_the_control_is_near_chance():
    """Two far-apart clusters: every fold is right; shuffled labels average near 1/2 and p is its floor."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    X = rng.normal(size=(40, 6))
    X[y == 1, 0] += 10.0
    out = pr.probe_layer(X, y, folds=5, permutations=40, C=1.0, max_iter=1000, seed=0)
    assert out["fold_accuracies"] == [1.0] * 5 and out["accuracy"] == 1.0
    assert abs(out["shuffled_mean"] - 0.5) < 0.15
    assert out["p_perm"] == pytest.approx(1 / 41) and out["converged"]


def test_no_signal_gives_the_majority_baseline_exactly():
    """Identical features for every sample: the probe can only learn the class prior, so each test fold is predicted
    as the training majority: accuracy = 12/18 = the majority baseline (3 stratified folds of 4+2)."""
    y = np.array([0] * 12 + [1] * 6)
    X = np.ones((18, 3))
    out = pr.probe_layer(X, y, folds=3, permutations=0, C=1.0, max_iter=1000, seed=0)
    assert out["fold_accuracies"] == [4 / 6] * 3 and out["accuracy"] == pytest.approx(12 / 18)
    assert "shuffled_mean" not in out


def test_check_classes():
    assert pr.check_classes(["a", "b", "a", "b", "a"], 5) == (["a", "b"], 2)
    with pytest.raises(PlipyError, match="at least two classes"):
        pr.check_classes(["a", "a"], 5)
    with pytest.raises(PlipyError, match="class 'b' has 1 sample"):
        pr.check_classes(["a", "a", "b"], 5)


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer("smollm2-135m")[0]


@pytest.fixture(scope="module")
def tiny_lm(tiny_tok):
    tok = tiny_tok
    from plipy.models import LoadedModel

    return LoadedModel(
        model=build("qwen2", "sdpa", vocab_size=len(tok)), tokenizer=tok, spec="tiny-qwen2", name="tiny-qwen2"
    )


def test_labelled_snippets_and_marker_feature(tiny_lm, tmp_path):
    import plipy

    rows = [{"code": f"def f{i}(x):\n    return x + {i}\n", "language": "python"} for i in range(6)]
    rows += [{"code": f"fn f{i}(x: i32) -> i32 {{ x + {i} }}\n", "language": "rust"} for i in range(6)]
    f = tmp_path / "snippets.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    r = plipy.probe(tiny_lm, f, permutations=3, folds=3)
    assert r["counts"] == {"python": 6, "rust": 6} and r["folds"] == 3 and len(r["layers"]) == 3
    assert r["provenance"]["config"]["data"]["kind"] == "labelled-snippets"
    assert r["samples"][0]["position"] == r["samples"][0]["n_tokens"] - 1
    with pytest.raises(ParameterError, match="needs a corpus with marker positions"):
        plipy.probe(tiny_lm, f, feature="marker")
    # the corpus with markers; prefix labels merge the baselines into their language
    m = plipy.probe(
        tiny_lm,
        feature="marker",
        label="prefix",
        permutations=0,
        layers=[2],
        groups="python_doctest,rust_test,python_baseline,rust_baseline",
    )
    assert m["counts"] == {"python": 15, "rust": 15} and m["layers"][0]["layer"] == 2
    smp = {s["id"]: s for s in m["samples"]}
    assert smp["py_simple_add"]["token"].strip() == ">>>"
    assert "shuffled" not in m.summary()


def test_result_views_and_round_trip(tiny_lm, tmp_path):
    import plipy

    r = plipy.probe(tiny_lm, permutations=4, folds=4)
    df = r.to_pandas()
    assert list(df["layer"]) == [0, 1, 2] and (df["majority_baseline"] == 0.5).all()
    assert "majority-class baseline 50.0%" in r.summary() and "any labelling of a training set" in r.summary()
    files = r.save(tmp_path / "p.json", plots=True)
    assert load_result(files["json"]) == r and isinstance(load_result(files["json"]), ProbeResult)
    assert files["plots"] == [str(tmp_path / "p-accuracy.png")]


def test_errors_before_the_model_loads(tmp_path):
    import plipy

    missing = "no-such-model-anywhere"  # would fail to load: the data error must come first
    with pytest.raises(PlipyError, match="unknown group"):
        plipy.probe(missing, groups="python_doctest,nope")
    with pytest.raises(ParameterError, match="feature"):
        plipy.probe(missing, feature="first")
    with pytest.raises(ParameterError, match="folds"):
        plipy.probe(missing, folds=1)
    with pytest.raises(ParameterError, match="label"):
        plipy.probe(missing, label="language")
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"samples": [{"code": "x", "label": "a"}, {"code": "y", "label": "a"}]}))
    with pytest.raises(PlipyError, match="at least two classes"):
        plipy.probe(missing, one)


def test_cli_probe(tmp_path, capsys, monkeypatch, smollm):
    monkeypatch.setattr("plipy.models.load_model", lambda *a, **k: smollm)  # no reload per call
    out = tmp_path / "p.json"
    small = corpus_subset(tmp_path, {"python_doctest": 4, "rust_test": 4}).path
    assert (
        cli_exit_code(
            [
                "probe",
                "--corpus",
                str(small),
                "--layers",
                "0,29",
                "--folds",
                "4",
                "--permutations",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert [r["layer"] for r in doc["layers"]] == [0, 29] and doc["provenance"]["kind"] == "probe"
    assert "Linear probe on the last token" in capsys.readouterr().out
    assert cli_exit_code(["probe", "--feature", "nope"]) == 2
    assert "error: --feature: must be one of last, marker" in capsys.readouterr().err


@pytest.mark.parametrize("phase", ["residuals", "probes"])
def test_an_interrupted_probe_resumes_to_the_same_document(phase, tiny_spec, tmp_path):
    """Interrupted among the residuals (phase 1) or among the fits (phase 2), run again: the same document."""
    import plipy
    from test_lens import interrupted_then_resumed, same_document

    corpus = corpus_subset(tmp_path, {"python_doctest": 4, "rust_test": 4})
    after = 2 if phase == "residuals" else 8 + 2  # the fits start once the 8 samples' residuals are done
    got, ref, labels = interrupted_then_resumed(
        plipy.probe, tiny_spec, corpus, feature="marker", folds=2, permutations=3, after=after
    )
    # the residuals of an interrupted first phase are kept; a finished first phase drops its units (its result
    # is recomputed, bit for bit, and the fits' own units are keyed by those numbers)
    assert labels == (
        ["residuals (2 resumed)", "probes"] if phase == "residuals" else ["residuals", "probes (2 resumed)"]
    )
    same_document(got, ref)
    assert got.rows() == ref.rows()


def test_probe_counts_and_C_are_bounded_before_the_model_loads():
    import plipy

    missing = "no-such-model-anywhere"
    for kw, msg in (
        ({"permutations": 10**7}, "permutations: must be at most 1,000,000"),
        ({"permutations": -1}, "permutations"),
        ({"folds": 10**12}, "folds: must be at most"),
        ({"C": float("inf")}, "C: must be a positive finite number"),
        ({"C": float("nan")}, "C: must be a positive finite number"),
        ({"C": 0}, "C: must be a positive finite number"),
        ({"seed": -1}, "seed"),
        ({"layers": ""}, "layers: is empty"),
    ):
        with pytest.raises(ParameterError, match=msg):
            plipy.probe(missing, **kw)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    from test_lens import tiny_model_spec

    return tiny_model_spec(tmp_path_factory)
