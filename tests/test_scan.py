"""The layer scan on SmolLM2 and the bundled corpus, checked against HF eager and scipy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch

import plipy
from plipy.cli import main
from plipy.corpus import load_corpus, token_positions
from plipy.errors import PlipyError
from tiny_models import variant


@pytest.fixture(scope="module")
def result(smollm):
    return plipy.scan(smollm, load_corpus(), resamples=2000)


def test_attention_equals_hf_eager_output_attentions(smollm, result):
    eager = variant(smollm.model, "eager")
    corpus = load_corpus()
    for s in result["samples"][::3]:
        sp = token_positions(corpus.sample(s["id"]), smollm.tokenizer)
        with torch.inference_mode():
            att = eager(torch.tensor([sp.input_ids]), output_attentions=True).attentions
        m, targets = sp.marker_token, sp.target_tokens
        for layer in (0, 7, 29):
            row = att[layer][0, :, m].double()  # [heads, keys]
            assert abs(s["attention"][layer] - row[:, targets].mean().item()) <= 1e-5
            assert abs(s["first_token_share"][layer] - row[:, 0].mean().item()) <= 1e-5
            assert np.allclose(s["attention_per_head"][layer], row[:, targets].mean(1).numpy(), atol=1e-5)
        assert s["uniform_null"] == 1 / (m + 1)
        assert s["excess"][3] == pytest.approx(s["attention"][3] * (m + 1))


def test_layer_statistics_equal_scipy(result):
    ga, gb = result["groups_compared"]
    assert (ga, gb) == ("python_doctest", "rust_test")
    for row in result["layers"][::5]:
        i = result["layers_scanned"].index(row["layer"])
        a = [s["attention"][i] for s in result["samples"] if s["group"] == ga]
        b = [s["attention"][i] for s in result["samples"] if s["group"] == gb]
        ref = scipy.stats.ttest_ind(a, b, equal_var=False)
        assert row["t"] == pytest.approx(ref.statistic, rel=1e-9)
        assert row["p"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert row["groups"][ga]["n"] == 10 and row["groups"][gb]["n"] == 10
        assert row["groups"][ga]["std"] == pytest.approx(np.std(a, ddof=1))
        assert row["ratio"] == pytest.approx(np.mean(a) / np.mean(b))
    nulls = {g: np.mean([s["uniform_null"] for s in result["samples"] if s["group"] == g]) for g in (ga, gb)}
    assert result["null_ratio"] == pytest.approx(nulls[ga] / nulls[gb])
    holm = [r["p_holm"] for r in result["layers"]]
    assert all(h >= r["p"] for h, r in zip(holm, result["layers"], strict=True))


def test_plip_compat_block(result):
    pc = result["plip_compat"]
    assert pc["n_layers"] == 30 and pc["scanned_layers"] == list(range(30))
    assert pc["position_conversion_stats"] == {
        "total_samples": 20,
        "successful_conversions": 20,
        "failed_conversions": 0,
        "fuzzy_matches": 0,
    }
    first = pc["results"][0]
    assert set(first) == {
        "layer",
        "python_mean",
        "python_std",
        "python_n",
        "rust_mean",
        "rust_std",
        "rust_n",
        "ratio",
        "t_statistic",
        "df",
        "p_value",
    }
    assert first["python_mean"] == result["layers"][0]["groups"]["python_doctest"]["mean"]


def test_any_groups_unicode_and_causally_impossible_samples(smollm, tmp_path):
    code_a = '# héllo wörld 🙂\ndef f(x, y):\n    """\n    >>> f(1, 2)\n    """\n    return x'
    code_b = "# ñ ✓\nfn g(a: u8) {}\n#[test]\nfn t() {}"
    after = "#[derive(Debug)]\nstruct S;"
    samples = {
        "alpha": [
            {
                "id": f"a{i}",
                "code": code_a + " " * i,
                "marker_char_pos": code_a.index(">>>"),
                "marker_pattern": ">>>",
                "target_char_positions": [code_a.index("def"), code_a.index("f("), code_a.index("x,")],
            }
            for i in range(3)
        ],
        "beta": [
            {
                "id": f"b{i}",
                "code": code_b + "\n" * i,
                "marker_char_pos": code_b.index("#[test]"),
                "marker_pattern": "#[test]",
                "target_char_positions": [code_b.index("fn"), code_b.index("g(")],
            }
            for i in range(3)
        ]
        + [
            {
                "id": "b_after",
                "code": after,
                "marker_char_pos": 0,
                "marker_pattern": "#[",
                "target_char_positions": [after.index("struct"), after.index("S;")],
            }
        ],
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(samples, ensure_ascii=False))
    res = plipy.scan(smollm, load_corpus(path), layers=[0, 5], resamples=500)
    assert res["groups_compared"] == ["alpha", "beta"]
    by_id = {s["id"]: s for s in res["samples"]}
    assert by_id["b_after"]["status"] == "no-valid-targets" and "attention" not in by_id["b_after"]
    assert res["layers"][0]["groups"]["beta"]["n"] == 3  # reported, not averaged in as zeros
    assert by_id["a0"]["marker_text"].strip().startswith(">>>")


def test_parse_layers_and_heads():
    from plipy import options

    assert options.parse_layers("all", 4) == [0, 1, 2, 3]
    assert options.parse_layers(None, 3) == [0, 1, 2]
    assert options.parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert options.parse_layers([5, 2, 2], 8) == [2, 5]
    assert options.parse_layers(3, 8) == [3]
    assert options.parse_layers("plip", 30) == list(range(10, 30))
    assert options.parse_heads("none", 9) == [] and options.parse_heads("all", 9, all_as_none=True) is None
    assert options.parse_heads("all", 3) == [0, 1, 2]
    with pytest.raises(PlipyError, match="does not exist"):
        options.parse_layers("3,40", 30)
    with pytest.raises(PlipyError, match="cannot read"):
        options.parse_layers("x", 30)
    with pytest.raises(PlipyError, match="empty"):
        options.parse_layers("", 30)
    with pytest.raises(PlipyError, match=r"layer 999 does not exist: .*\(970 values out of range: 30…999\)"):
        options.parse_layers("0-999", 30)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "scan.json"
    try:
        main(["scan", "--layers", "0-3", "--out", str(out), "--plot", "--resamples", "500"])
    except SystemExit as e:  # success may also end in SystemExit(0)
        assert e.code in (0, None)
    data = json.loads(out.read_text())
    assert data["provenance"]["model"]["spec"] == "smollm2-135m"
    assert len(data["provenance"]["corpus"]["sha256"]) == 64
    assert data["layers_scanned"] == [0, 1, 2, 3]
    assert {
        "id",
        "group",
        "marker_token",
        "target_tokens",
        "attention",
        "attention_per_head",
        "first_token_share",
        "uniform_null",
    } <= set(data["samples"][0])
    for suffix in ("-layers.png", "-heads.png", "-tokens.png"):
        png = tmp_path / f"scan{suffix}"
        assert png.read_bytes()[:4] == b"\x89PNG"
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "scan.parquet")
    assert table.num_rows == 20 * 4
    assert "null ratio" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["scan", "--groups", "nope,rust_test", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown group")
    assert not (tmp_path / "x.json").exists()
