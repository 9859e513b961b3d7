"""The Python facade: the same results as the CLI, typed results that round-trip through their files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import plipy
from conftest import corpus_subset
from plipy.cli import main
from plipy.errors import ParameterError, PlipyError


def _run_cli(argv):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), e


def _doc(path):
    """A result file without what legitimately differs between two runs: provenance and wall-clock timing."""
    data = json.loads(path.read_text())
    data.pop("provenance")
    data.pop("timing", None)
    return data


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return corpus_subset(tmp_path_factory.mktemp("corpus"), {"python_doctest": 2, "rust_test": 2})


def test_import_is_cheap_and_lazy():
    code = "import sys, plipy; assert 'torch' not in sys.modules; plipy.steer; print(callable(plipy.scan))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_scan_facade_equals_cli_and_round_trips(smollm, tmp_path, monkeypatch):
    r = plipy.scan(smollm, layers="0-2", resamples=300)
    assert isinstance(r, plipy.ScanResult) and r["layers_scanned"] == [0, 1, 2]
    df = r.to_pandas()
    assert set(df["layer"]) == {0, 1, 2} and len(df) == 3 * sum("attention" in s for s in r["samples"])
    # per-sample rows are the JSON's numbers, not recomputed ones
    first = next(s for s in r["samples"] if "attention" in s)
    assert df[(df["id"] == first["id"]) & (df["layer"] == 1)]["attention"].item() == first["attention"][1]
    text = r.summary()
    assert "Layer scan" in text and "null ratio" in text
    assert set(r.plot()) == {"layers", "heads", "tokens"}
    (tmp_path / "lib").mkdir()
    (tmp_path / "cli").mkdir()
    monkeypatch.chdir(tmp_path / "lib")
    files = r.save("scan.json", plots=True)
    assert files["plots"] == ["scan-layers.png", "scan-heads.png", "scan-tokens.png"]
    assert files["rows"] == "scan-rows.npz"
    monkeypatch.chdir(tmp_path / "cli")
    _run_cli(["scan", "--layers", "0-2", "--resamples", "300", "--out", "scan.json", "--plot"])
    assert _doc(tmp_path / "lib" / "scan.json") == _doc(tmp_path / "cli" / "scan.json")
    back = plipy.load_result(tmp_path / "lib" / "scan.json")
    assert type(back) is plipy.ScanResult and back == r
    assert back.to_pandas().equals(df)
    assert back.has_rows and back.plot("tokens") is not None  # the rows came back from scan-rows.npz
    assert "<pre>" in back._repr_html_()


def test_options_accept_ints_lists_and_grammar(smollm):
    a = plipy.scan(smollm, layers=[2, 0], heads="0-3", groups="python_doctest,rust_test", resamples=200)
    assert a["layers_scanned"] == [0, 2] and a["heads"] == [0, 1, 2, 3]
    with pytest.raises(ParameterError) as e:
        plipy.scan(smollm, layers="0-999")
    assert e.value.param == "layers" and "970 values" in str(e.value)
    with pytest.raises(ParameterError, match="resamples"):
        plipy.scan(smollm, resamples=0)
    with pytest.raises(PlipyError, match="unknown group"):
        plipy.scan("no-such-model", groups="nope,rust_test")  # checked before the model would load


def test_knockout_facade_equals_cli_and_round_trips(smollm, small, tmp_path, monkeypatch):
    k = plipy.knockout(smollm, small, layer=14, resamples=200)
    assert isinstance(k, plipy.KnockoutResult) and [r["layers"] for r in k["runs"]] == [[14]]
    assert k.provenance["config"]["runner"]["path"] == "fast"
    (tmp_path / "lib").mkdir()
    (tmp_path / "cli").mkdir()
    monkeypatch.chdir(tmp_path / "lib")
    k.save("ko.json")
    monkeypatch.chdir(tmp_path / "cli")
    _run_cli(["knockout", "--corpus", str(small.path), "--layer", "14", "--resamples", "200", "--out", "ko.json"])
    assert _doc(tmp_path / "lib" / "ko.json") == _doc(tmp_path / "cli" / "ko.json")
    back = plipy.load_result(tmp_path / "lib" / "ko.json")
    assert type(back) is plipy.KnockoutResult and back == k
    assert list(back.to_pandas()["kl"]) == [s["kl"] for s in k["runs"][0]["samples"]]
    assert set(back.plot()) == {"heatmap", "means"}
    with pytest.raises(ParameterError, match="choose one mode"):
        plipy.knockout(smollm, small, layer=3, scan_layers=True)


def test_steer_facade_equals_cli_and_round_trips(smollm, small, tmp_path, monkeypatch):
    d = plipy.steer.dose(smollm, small, layer=16, doses="0.5,1,2")
    assert isinstance(d, plipy.DoseResult) and [r["scale"] for r in d["doses"]] == [0.5, 1.0, 2.0]
    assert all(s["kl"] == 0.0 for s in d["doses"][1]["samples"])  # α = 1 is the baseline computation
    (tmp_path / "lib").mkdir()
    (tmp_path / "cli").mkdir()
    monkeypatch.chdir(tmp_path / "lib")
    d.save("dose.json")
    monkeypatch.chdir(tmp_path / "cli")
    _run_cli(
        ["steer", "dose", "--corpus", str(small.path), "--layer", "16", "--doses", "0.5,1,2", "--out", "dose.json"]
    )
    assert _doc(tmp_path / "lib" / "dose.json") == _doc(tmp_path / "cli" / "dose.json")
    assert plipy.load_result(tmp_path / "lib" / "dose.json") == d
    cal = plipy.steer.calibrate(smollm, small, layer=16)
    cal.save(tmp_path / "cal.json", plots=True)
    assert plipy.load_result(tmp_path / "cal.json") == cal and "Calibration" in cal.summary()
    assert (tmp_path / "cal-groups.png").read_bytes()[:4] == b"\x89PNG"


def test_sae_attention_facade_equals_cli_and_round_trips(smollm, tmp_path, monkeypatch):
    from plipy import sae as saes

    sae_dir = tmp_path / "sae"
    saes.save_saelens(
        saes.random_sae(576, 32, hook_name="blocks.4.hook_resid_post", seed=3), sae_dir, model_name="smollm2-135m"
    )
    rows = [
        {"prompt": "The city Paris is located in", "entity": "Paris", "entity_type": "city", "label": "known"},
        {
            "prompt": "The city Velmorath is located in",
            "entity": "Velmorath",
            "entity_type": "city",
            "label": "unknown",
        },
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    s = plipy.sae_attention(smollm, sae_dir, 5, rows, coeff=40, random=2, measures="attn_weights")
    assert isinstance(s, plipy.SaeAttentionResult) and s["layer"] == 5 and s.arrays["original"]["attn_weights"].shape
    (tmp_path / "lib").mkdir()
    (tmp_path / "cli").mkdir()
    monkeypatch.chdir(tmp_path / "lib")
    s.save("sae.json")
    monkeypatch.chdir(tmp_path / "cli")
    _run_cli(
        [
            "sae",
            "attention",
            "--sae",
            str(sae_dir),
            "--latent",
            "5",
            "--prompts",
            str(prompts),
            "--coeff",
            "40",
            "--random",
            "2",
            "--measures",
            "attn_weights",
            "--out",
            "sae.json",
        ]
    )
    assert _doc(tmp_path / "lib" / "sae.json") == _doc(tmp_path / "cli" / "sae.json")
    back = plipy.load_result(tmp_path / "lib" / "sae.json")
    assert type(back) is plipy.SaeAttentionResult and back == s
    df = back.to_pandas()
    assert len(df) == 3 * 2 * smollm.n_layers * smollm.n_heads  # (top + 2 random) × prompts × layers × heads


def test_load_result_refuses_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": 1}')
    with pytest.raises(PlipyError, match="not a plipy result"):
        plipy.load_result(p)
    with pytest.raises(PlipyError, match="no such result"):
        plipy.load_result(tmp_path / "missing.json")
