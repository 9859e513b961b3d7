"""Single-head knockout (`--heads 3`), as PLIP-rs' attention_ablation demo did: in every mode and with every edge
set, on tiny random models of several architectures, plipy's KL equals an independent float64 reference (eager
attention written from scratch that zeroes head 3's post-softmax edge weights and renormalises its rows)."""

from __future__ import annotations

import math

import pytest
import torch

import plipy
from conftest import corpus_subset
from plipy.experiments import knockout as ko
from plipy.models import load_tokenizer, wrap_model
from plipy.report.knockout import heads_label
from tiny_models import REF, REF_EDITS, build, float64, fp32_bound, register_reference, variant

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["llama", "qwen2", "gemma", "gpt2", "starcoder2"]  # GQA, MQA, Conv1D heads, a sliding window
MODES = [
    ("layer", {}),
    ("layers", {"layers": "0,2"}),
    ("scan_layers", {"scan_layers": True}),
    ("scan_windows", {"scan_windows": True, "center": 1, "max_radius": 1}),
    ("slide_window", {"slide_window": 2}),
]
HEAD = 3


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    tok, _ = load_tokenizer("smollm2-135m")
    corpus = corpus_subset(tmp_path_factory.mktemp("c"), {"python_doctest": 2, "rust_test": 2, "rust_baseline": 1})
    return tok, corpus


def _last_logits(model: torch.nn.Module, ids: list[int], edits: list) -> torch.Tensor:
    REF_EDITS.clear()
    REF_EDITS["edits"] = edits
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].double()
    finally:
        REF_EDITS.clear()


def _kl(a: torch.Tensor, b: torch.Tensor) -> float:
    p, q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return float((p.exp() * (p - q)).sum())


def _kl_bound(b32: torch.Tensor, b64: torch.Tensor, k32: torch.Tensor, k64: torch.Tensor) -> float:
    """How far KL from fp32 logits may fall from the float64 KL. To first order, logit errors δa (baseline) and δb
    (knockout) move KL(p‖q) by Σ p(log p/q − KL)·δa + Σ (q − p)·δb, so |ΔKL| ≤ max|δa|·Σ p|log p/q − KL| +
    max|δb|·Σ|q − p|; max|δ| is `fp32_bound` (from HF's own fp32 error on these inputs). Twice that, plus 1e-12."""
    lp, lq = torch.log_softmax(b64, -1), torch.log_softmax(k64, -1)
    p, q = lp.exp(), lq.exp()
    kl = float((p * (lp - lq)).sum())
    s_a = float((p * ((lp - lq) - kl).abs()).sum())
    s_b = float((q - p).abs().sum())
    return 2 * (fp32_bound(b32, b64) * s_a + fp32_bound(k32, k64) * s_b) + 1e-12


@pytest.mark.parametrize("arch", ARCHS)
def test_single_head_every_mode_and_edge_set(arch, setting):
    tok, corpus = setting
    # starcoder2: a window of 24 keeps some edges of the ~30-100-token samples and drops others
    extra = {"sliding_window": 24} if arch == "starcoder2" else {}
    model = build(arch, "sdpa" if arch != "starcoder2" else "eager", vocab_size=len(tok), **extra)
    register_reference()
    ref32, ref64 = variant(model, REF), variant(float64(model), REF)
    lm = wrap_model(model, tok, spec=f"tiny-{arch}")
    by_id = {s.id: s for s in corpus.samples()}
    checked, effects, statuses = 0, 0, set()
    for mode, kw in MODES:
        for edges in ko.EDGE_KINDS:
            r = plipy.knockout(lm, corpus, heads=str(HEAD), edges=edges, include_baselines=True, resamples=50, **kw)
            assert r["heads"] == [HEAD] and r["mode"] == mode.replace("_", "-")
            edge_sets = {s["id"]: s["edges"] for s in r["samples"]}
            for run in r["runs"]:
                for s in run["samples"]:
                    statuses.add(s["status"])
                    if s["status"] != "ok":
                        continue
                    ids = plipy.token_positions(by_id[s["id"]], tok).input_ids
                    edits = [(layer, q, k, [HEAD], 0.0) for layer in run["layers"] for q, k in edge_sets[s["id"]]]
                    b32, b64 = _last_logits(ref32, ids, []), _last_logits(ref64, ids, [])
                    k32, k64 = _last_logits(ref32, ids, edits), _last_logits(ref64, ids, edits)
                    want = _kl(b64, k64)
                    assert abs(s["kl"] - want) <= _kl_bound(b32, b64, k32, k64), (
                        arch,
                        mode,
                        edges,
                        s["id"],
                        run["label"],
                    )
                    checked += 1
                    effects += want > 10 * _kl_bound(b32, b64, k32, k64)
    assert checked >= 60 and effects >= checked // 4  # knockouts of one head do move the distribution
    assert "row-fully-masked" in statuses  # to-marker on rust_baseline (marker = token 0), in head 3 alone


def test_the_head_matters(setting):
    """Head 3 alone differs from head 2 alone and from every head: the restriction reaches the model."""
    tok, corpus = setting
    lm = wrap_model(build("llama", "sdpa", vocab_size=len(tok)), tok, spec="tiny-llama")
    kls = {
        h: [
            s["kl"]
            for s in plipy.knockout(lm, corpus, layer=1, heads=h, edges="from-marker", resamples=50)["runs"][0][
                "samples"
            ]
        ]
        for h in ("3", "2", "all")
    }
    assert all(not math.isclose(a, b, rel_tol=1e-3) for a, b in zip(kls["3"], kls["2"], strict=True))
    assert all(a < b for a, b in zip(kls["3"], kls["all"], strict=True))


def test_heads_label():
    assert (
        heads_label([3]) == "head 3" and heads_label([0, 3]) == "heads 0,3" and heads_label(list(range(9))) == "9 heads"
    )


def test_cli_single_head(monkeypatch, smollm, setting, tmp_path, capsys):
    """`plipy knockout --heads 3 --edges from-marker`: PLIP-rs' attention_ablation --ablate-test-marker --head 3."""
    from plipy import cli

    _, corpus = setting
    monkeypatch.setattr("plipy.models.load_model", lambda *a, **k: smollm)
    out = tmp_path / "k.json"
    with pytest.raises(SystemExit) as e:
        cli.main(
            [
                "knockout",
                "--corpus",
                str(corpus.path),
                "--layer",
                "16",
                "--heads",
                "3",
                "--edges",
                "from-marker",
                "--resamples",
                "50",
                "--out",
                str(out),
            ]
        )
        raise SystemExit(0)
    assert e.value.code == 0
    assert "Knockout (from-marker, head 3)" in capsys.readouterr().out
    doc = plipy.load_result(out)
    assert doc["heads"] == [3] and doc["runs"][0]["heads"] == [3]
    assert [s["status"] for s in doc["runs"][0]["samples"]] == ["ok"] * 4
