"""Test-marker emergence equals PLIP-rs' rule computed by brute force on HF's hidden states (decode every top-k
token, test `expected in token`), prompt files are validated, and the CLI runs the built-in set."""

from __future__ import annotations

import json

import pytest
import torch

from plipy import cli
from plipy.errors import ParameterError, PlipyError
from plipy.experiments import emergence as em
from plipy.results import EmergenceResult, load_result
from test_lens import _reference, hf_attention


def test_builtin_prompts_are_plip_rs_set():
    prompts, where = em.load_prompts()
    assert where == "built-in:emergence_prompts.json" and len(prompts) == 8
    first = prompts[0]
    assert first["id"] == "rust_after_fn_attr" and first["prompt"].endswith("\n\n#[")
    assert first["expect"] == ["test", "cfg", "derive", "allow", "inline", "must"]
    assert [p["id"] for p in prompts if p["prompt"] == "#[te"] == ["rust_complete_test"]


def test_emergence_equals_plip_rule_on_hf_hidden_states(smollm):
    """For each layer, PLIP-rs' test: does any of the top-k tokens (decoded) contain the string? The first such
    layer must be plipy's `first_layer_in_top_k`; the best match's rank and probability come from the full logits."""
    import plipy

    k = 20
    items = [
        {
            "id": "attr",
            "prompt": "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n#[",
            "expect": ["test", "cfg", "should_panic"],
        },
        {
            "id": "doc",
            "prompt": 'def add(a, b):\n    """Add two numbers.\n\n    >>> add(2, 3)\n    ',
            "expect": ["5", ">>>"],
        },
    ]
    refs = {}
    with hf_attention(smollm.model):
        for it in items:
            ids = smollm.tokenizer(it["prompt"], add_special_tokens=False)["input_ids"]
            refs[it["id"]] = [z[0].float() for z in _reference(smollm.model, "llama", ids, [len(ids) - 1])]
    r = plipy.emergence(smollm, items, top_k=k)
    tok = smollm.tokenizer
    for p in r["prompts"]:
        ref = refs[p["id"]]
        for e in p["expected"]:
            s = e["string"]
            hand = next(
                (layer for layer, z in enumerate(ref) if any(s in tok.decode([t]) for t in z.topk(k).indices.tolist())),
                None,
            )
            assert e["first_layer_in_top_k"] == hand, (p["id"], s)
            if s == "should_panic":
                assert e["n_vocab_matches"] == 0 and e["ranks"] == [] and "no vocabulary entry" in e["note"]
                continue
            matches = torch.tensor([i for i in range(len(tok)) if s in tok.decode([i])])
            assert e["n_vocab_matches"] == len(matches)
            for layer, z in enumerate(ref):
                best = matches[z[matches].argmax()]
                assert e["ranks"][layer] == 1 + int((z > z[best]).sum())
                prob = torch.softmax(z, -1)
                assert abs(e["probs"][layer] - float(prob[best])) <= 1e-5
                assert abs(e["masses"][layer] - float(prob[matches].sum())) <= 1e-5
            if hand is not None:
                assert e["at_first_layer"]["rank"] <= k and s in e["at_first_layer"]["token"]
    assert r["prompts"][0]["earliest_layer"] == min(
        e["first_layer_in_top_k"] for e in r["prompts"][0]["expected"] if e["first_layer_in_top_k"] is not None
    )


def test_prompt_files(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"id": "a", "prompt": "#[", "expect": "test"}\n\n{"prompt": "x", "expect": ["y", "z"]}\n')
    prompts, _ = em.load_prompts(good)
    assert prompts[0]["expect"] == ["test"] and prompts[1]["id"] == "1"
    one = tmp_path / "one.jsonl"  # one line of JSON Lines is also one JSON object: still one prompt
    one.write_text('{"id": "a", "prompt": "#[", "expect": "test"}\n')
    assert [p["id"] for p in em.load_prompts(one)[0]] == ["a"]
    for body, msg in (
        ('{"prompts": [{"id": "a", "prompt": "x"}]}', "'a': \"expect\" must be"),
        ('[{"id": "a", "prompt": "x", "expect": ["y"]}, {"id": "a", "prompt": "z", "expect": ["y"]}]', "duplicate id"),
        ('[{"id": "a", "prompt": "", "expect": ["y"]}]', 'has no "prompt" string'),
        ("{not json", "invalid JSON"),
        ("[]", "expected"),
    ):
        f = tmp_path / "bad.json"
        f.write_text(body)
        with pytest.raises(PlipyError, match=msg):
            em.load_prompts(f)
    with pytest.raises(PlipyError, match="not found"):
        em.load_prompts(tmp_path / "missing.json")


def _run(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
        raise SystemExit(0)
    return e.value.code


@pytest.mark.slow
def test_cli_emergence_builtin(tmp_path, capsys, monkeypatch, smollm):
    monkeypatch.setattr("plipy.models.load_model", lambda *a, **k: smollm)  # no reload per call
    out = tmp_path / "e.json"
    assert _run(["lens", "emergence", "--top-k", "50", "--out", str(out), "--plot"]) == 0
    text = capsys.readouterr().out
    assert "Test-marker emergence" in text and "rust_after_fn_attr: earliest layer" in text
    r = load_result(out)
    assert isinstance(r, EmergenceResult) and len(r["prompts"]) == 8 and r["top_k"] == 50
    df = r.to_pandas()
    assert set(df.columns) >= {"prompt", "expected", "layer", "rank", "best_token", "prob", "mass", "in_top_k"}
    assert (df["in_top_k"] == (df["rank"] <= 50)).all()
    assert (tmp_path / "e-ranks.png").is_file()


def test_cli_emergence_prompt_file(tmp_path, capsys, monkeypatch, smollm):
    monkeypatch.setattr("plipy.models.load_model", lambda *a, **k: smollm)  # no reload per call
    f = tmp_path / "p.json"
    f.write_text(
        json.dumps(
            {
                "prompts": [
                    {"id": "tm", "language": "rust", "prompt": "#[cfg(test)]\nmod tests {\n    #[", "expect": ["test"]}
                ]
            }
        )
    )
    out = tmp_path / "e.json"
    assert _run(["lens", "emergence", "--prompts", str(f), "--layers", "20-29", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["layers_shown"] == list(range(20, 30)) and len(doc["prompts"][0]["expected"][0]["ranks"]) == 10
    capsys.readouterr()
    f.write_text('[{"id": "a"}]')
    assert _run(["lens", "emergence", "--prompts", str(f)]) == 2
    assert "error: " in capsys.readouterr().err


@pytest.fixture(scope="module")
def vocab():
    from plipy.models import load_tokenizer

    tok, _ = load_tokenizer("smollm2-135m")
    return tok, [tok.decode([i]) for i in range(len(tok))]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_emergence_on_tiny_models(arch, vocab):
    """Random tiny models (Gemma-2 with its logit softcap, GPT-2): the same brute-force check on HF's hidden states."""
    import plipy
    from plipy.models import wrap_model
    from tiny_models import build

    tok, texts = vocab
    model = build(arch, "eager" if arch == "gemma2" else "sdpa", vocab_size=len(tok))
    items = [{"id": "a", "prompt": "#[cfg(test)]\nmod tests {\n    #[", "expect": ["test", "x", "("]}]
    ids = tok(items[0]["prompt"], add_special_tokens=False)["input_ids"]
    ref = [z[0].float() for z in _reference(model, arch, ids, [len(ids) - 1])]
    k = 500
    r = plipy.emergence(wrap_model(model, tok, spec=f"tiny-{arch}"), items, top_k=k)
    for e in r["prompts"][0]["expected"]:
        s = e["string"]
        matches = torch.tensor([i for i, t in enumerate(texts) if s in t])
        hand = next((layer for layer, z in enumerate(ref) if any(s in texts[t] for t in z.topk(k).indices)), None)
        assert e["first_layer_in_top_k"] == hand
        for layer, z in enumerate(ref):
            best = matches[z[matches].argmax()]
            assert e["ranks"][layer] == 1 + int((z > z[best]).sum())
    assert any(e["first_layer_in_top_k"] is not None for e in r["prompts"][0]["expected"])


def test_an_interrupted_emergence_resumes_to_the_same_document(tiny_spec):
    import plipy
    from test_lens import interrupted_then_resumed, same_document

    got, ref, labels = interrupted_then_resumed(plipy.emergence, tiny_spec, top_k=20)
    assert labels == ["emergence (2 resumed)"]  # one prompt per batch: two were on disk
    same_document(got, ref)
    with pytest.raises(ParameterError, match="top_k: must be at most the vocabulary size"):
        plipy.emergence(tiny_spec, top_k=10**6)
    with pytest.raises(ParameterError, match="top_k"):
        plipy.emergence("no-such-model-anywhere", top_k=0)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    from test_lens import tiny_model_spec

    return tiny_model_spec(tmp_path_factory)
