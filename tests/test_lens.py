"""The logit lens equals the model's own head applied to HF's `output_hidden_states` (every tiny architecture,
Gemma-2's softcap, Granite's and Cohere's logit scalings, and the real SmolLM2), its last layer equals the model's
logits, and the result, CLI and errors behave."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
import transformers as tf

from conftest import cli_exit_code
from plipy.errors import ParameterError, PlipyError
from plipy.experiments import lens as le
from plipy.models import LoadedModel
from plipy.options import parse_positions
from plipy.results import LensResult, load_result
from tiny_models import ARCHS, build, float64, fp32_bound

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n#["


def _hf_head(model: torch.nn.Module, arch: str):
    """The final norm and unembedding by HF's own attribute names, and the family's logit transform, written out
    here rather than taken from plipy's adapter."""
    norm = {"gpt2": lambda m: m.transformer.ln_f, "gpt_neox": lambda m: m.gpt_neox.final_layer_norm}.get(
        arch, lambda m: m.model.norm
    )(model)
    cap = getattr(model.config, "final_logit_softcapping", None)
    scaling = getattr(model.config, "logits_scaling", None)
    scale = getattr(model, "logit_scale", None)

    def head(h: torch.Tensor) -> torch.Tensor:
        z = model.lm_head(norm(h))
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        if scaling is not None:
            z = z / scaling
        if scale is not None:
            z = z * scale
        return z

    return head


def _reference(model: torch.nn.Module, arch: str, ids: list[int], positions: list[int]) -> list[torch.Tensor]:
    """Per layer L, lm_head(norm(hidden_states[L + 1])) at `positions`; the last layer: the model's own logits
    (HF's last hidden state already went through the final norm)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    hs = out.hidden_states
    n = len(hs) - 1
    head = _hf_head(model, arch)
    return [head(hs[layer + 1][0, positions]) for layer in range(n - 1)] + [out.logits[0, positions]]


@contextmanager
def hf_attention(model: torch.nn.Module, impl: str = "sdpa"):
    """The model on HF's own attention for a reference run (plipy's engine had installed its function)."""
    saved = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield model
    finally:
        model.set_attn_implementation(saved)


def _lm(model: torch.nn.Module, tokenizer=None) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=tokenizer, spec="tiny", name="tiny")


def _extra_models() -> dict[str, torch.nn.Module]:
    """Families whose head rescales the logits: Granite divides by logits_scaling, Cohere multiplies by
    logit_scale."""
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    out = {}
    for name, cfg in (
        ("granite", tf.GraniteConfig(**common, logits_scaling=4.0)),
        ("cohere", tf.CohereConfig(**common, logit_scale=0.25)),
    ):
        torch.manual_seed(0)
        m = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if "norm" not in pname and p.ndim >= 2:
                    p.normal_(0, 0.15)
        out[name] = m.eval().requires_grad_(False)
    return out


@pytest.mark.parametrize("arch", [*ARCHS, "granite", "cohere"])
def test_lens_equals_head_of_hf_hidden_states(arch):
    """Every layer's lens logits equal the family's head on HF's hidden state (fp32 error bounded against float64);
    probabilities to 1e-5; the last layer is the model's own logits (to rounding), and the run's own check says so."""
    model = (
        _extra_models()[arch] if arch in ("granite", "cohere") else build(arch, "sdpa" if arch != "gemma2" else "eager")
    )
    ids = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    positions = [11, 4, 0]
    ref32 = _reference(model, arch, ids, positions)
    ref64 = _reference(float64(model), arch, ids, positions)
    lp = le.run_pass(_lm(model), ids, positions)
    assert lp.check["last_layer_vs_model_logits_max_abs"] <= lp.check["tolerance"]
    for layer in range(len(ref32)):
        ours = lp.logits(layer)
        bound = fp32_bound(ref32[layer], ref64[layer])
        assert (ours.double() - ref64[layer]).abs().max() <= bound, (arch, layer)
        p_ours, p_ref = torch.softmax(ours, -1), torch.softmax(ref32[layer].float(), -1)
        assert (p_ours - p_ref).abs().max() <= 1e-5
    torch.testing.assert_close(lp.logits(len(ref32) - 1), ref32[-1].float(), rtol=0, atol=lp.check["tolerance"])
    # the model's own logits: plipy's forward computes the head on 3 rows where the reference computed 12, so
    # they agree to fp32 rounding, not bit for bit (bit-equal on the last machine's kernels, not on this one's)
    assert (lp.model_logits.double() - ref64[-1]).abs().max() <= fp32_bound(ref32[-1], ref64[-1])


def test_logit_transforms_are_named():
    assert le.logit_transform(build("gemma2"))[1] == "tanh softcap 30.0"
    extra = _extra_models()
    assert le.logit_transform(extra["granite"])[1] == "divided by logits_scaling 4.0"
    assert le.logit_transform(extra["cohere"])[1] == "multiplied by logit_scale 0.25"
    assert le.logit_transform(build("llama"))[1] == "none"


def test_unknown_head_transform_is_caught():
    """A head the lens does not know (here: logits scaled behind its back) fails the last-layer check."""
    model = build("llama", "sdpa")
    le.run_pass(_lm(model), list(range(3, 10)), [6])
    # the model's own call of its norm (on [1, seq, d]) doubles; the lens' call (on [positions, d]) does not
    model.model.norm.register_forward_hook(lambda m, a, out: out * 2.0 if out.ndim == 3 else out)
    with pytest.raises(PlipyError, match="does not reproduce"):
        le.run_pass(_lm(model), list(range(3, 10)), [6])


def test_rank_of_by_hand():
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0, 0.0]])
    assert le.rank_of(logits, torch.tensor([1, 3, 0, 2, 4])).tolist() == [[1, 1, 3, 5, 4]]


def test_positions_grammar():
    assert parse_positions("last", 5) == [4]
    assert parse_positions("all", 3) == [0, 1, 2]
    assert parse_positions("0,-1,4", 5) == [0, 4]
    assert parse_positions([2, -2], 5) == [2, 3]
    assert parse_positions("marker", 5, marker=3) == [3]
    for bad, msg in (
        ("7", "position 7 does not exist"),
        ("marker", "needs a corpus sample"),
        ("x", "cannot read"),
        ("", "is empty"),
    ):
        with pytest.raises(ParameterError, match=msg):
            parse_positions(bad, 5)


def test_lens_on_smollm_matches_hf(smollm):
    """The facade on the real model: every layer's top-k and probabilities and the tracked tokens' ranks equal
    those computed from HF's hidden states; the first layer in the top-k is where the rank first drops to ≤ k."""
    import plipy

    ids = smollm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    positions = [len(ids) - 1, len(ids) - 3]
    with hf_attention(smollm.model):
        ref = _reference(smollm.model, "llama", ids, positions)
    r = plipy.lens(smollm, TEXT, tokens=["test", 1223], top_k=5, positions=[-1, -3])
    test_id = smollm.tokenizer("test", add_special_tokens=False)["input_ids"][0]
    assert [p["position"] for p in r["positions"]] == positions
    for i, pos in enumerate(r["positions"]):
        assert [lay["layer"] for lay in pos["layers"]] == list(range(30))
        tracked = {t["id"]: t for t in pos["tracked"]}
        assert {test_id, 1223, int(ref[-1][i].argmax())} <= set(tracked)
        assert "next-token" in {s for t in pos["tracked"] for s in t["source"]} or i == 0
        for layer, lay in enumerate(pos["layers"]):
            z = ref[layer][i].float()
            p = torch.softmax(z, -1)
            assert [t["id"] for t in lay["top"]] == z.topk(5).indices.tolist()
            assert max(abs(t["prob"] - float(p[t["id"]])) for t in lay["top"]) <= 1e-5
            for tid, t in tracked.items():
                assert t["ranks"][layer] == 1 + int((z > z[tid]).sum())
                assert abs(t["probs"][layer] - float(p[tid])) <= 1e-5
        for t in tracked.values():
            hand = next((layer for layer, rank in enumerate(t["ranks"]) if rank <= 5), None)
            assert t["first_layer_in_top_k"] == hand
        final = next(t for t in pos["tracked"] if "final-top1" in t["source"])
        assert final["ranks"][-1] == 1 and final["first_layer_in_top_k"] is not None
    assert r["check"]["last_layer_vs_model_logits_max_abs"] == 0.0  # same ops on the same rows


def test_lens_result_views_and_round_trip(smollm, tmp_path):
    import plipy

    r = plipy.lens(smollm, TEXT, positions="all", top_k=3, layers="0,15,29")
    df = r.to_pandas()
    n_pos = len(r["positions"])
    assert set(df["layer"]) == {0, 15, 29} and df["position"].nunique() == n_pos
    assert (df[df["in_top_k"] & df["tracked"].isna()].groupby(["position", "layer"]).size() <= 3).all()
    text = r.summary()
    assert "first layer in top-3" in text  # the compact table (many positions)
    figs = r.plot()
    assert set(figs) == {"grid", "tracked"}
    files = r.save(tmp_path / "lens.json", plots=True)
    assert load_result(files["json"]) == r and isinstance(load_result(files["json"]), LensResult)
    assert len(files["plots"]) == 2


def test_lens_of_a_corpus_sample_at_its_marker(smollm):
    import plipy

    r = plipy.lens(smollm, sample="py_simple_add", positions="marker", top_k=3)
    assert r["source"]["sample"] == "py_simple_add" and r["source"]["marker_token"] == 10
    assert r["positions"][0]["position"] == 10 and r["positions"][0]["token"] == " >>>"
    assert "Tracked tokens at position 10" in r.summary()


def test_lens_errors(smollm):
    import plipy

    with pytest.raises(ParameterError, match="not both or neither"):
        plipy.lens(smollm)
    with pytest.raises(ParameterError, match="is 3 tokens"):
        plipy.lens(smollm, TEXT, tokens=[" assert_eq"])
    with pytest.raises(ParameterError, match="token id 999999 does not exist"):
        plipy.lens(smollm, TEXT, tokens=[999999])
    with pytest.raises(ParameterError, match="top_k"):
        plipy.lens(smollm, TEXT, top_k=0)


def test_cli_lens_and_errors(tmp_path, capsys, monkeypatch, smollm):
    monkeypatch.setattr("plipy.models.load_model", lambda *a, **k: smollm)  # no reload per call
    out = tmp_path / "l.json"
    assert cli_exit_code(["lens", TEXT, "--token", "test", "--top-k", "4", "--layers", "28,29", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    lay = doc["positions"][0]["layers"][0]
    assert set(lay) == {"layer", "top"} and set(lay["top"][0]) == {"id", "token", "prob"} and len(lay["top"]) == 4
    assert doc["provenance"]["kind"] == "lens"
    assert "Logit lens at position" in capsys.readouterr().out
    assert (
        cli_exit_code(
            [
                "lens",
                "run",
                "--sample",
                "py_simple_add",
                "--positions",
                "marker",
                "--layers",
                "29",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    for argv, msg in (
        (["lens", "x", "--sample", "py_simple_add"], "give one of TEXT"),
        (["lens", "--file", str(tmp_path / "none.txt")], "no such file"),
        (["lens", TEXT, "--positions", "99"], "--positions: position 99 does not exist"),
        (["lens", TEXT, "--token", " assert_eq"], "--token/--token-id: ' assert_eq' is 3 tokens"),
    ):
        assert cli_exit_code(argv) == 2
        assert msg in capsys.readouterr().err


# -- on the runtime: resume, parameters ----------------------------------------------------------------------------


class Interrupt(Exception):
    """Stands for a kill: raised from the progress bar once some units are on disk."""


def interrupted_then_resumed(fn, *args, after: int = 2, **kw):
    """`fn(*args, **kw)` interrupted at its `after`-th finished unit, then run again (it resumes); and one
    uninterrupted run with nothing kept. Returns (resumed result, reference, the resumed run's progress labels)."""
    steps: list[str] = []

    def interrupting(desc: str, total: int):
        def step(*a, **k) -> None:
            steps.append(desc)
            if len(steps) == after:
                raise Interrupt

        return step

    with pytest.raises(Interrupt):
        fn(*args, progress=interrupting, **kw)
    labels: list[str] = []

    def watching(desc: str, total: int):
        labels.append(desc)
        return lambda *a, **k: None

    got = fn(*args, progress=watching, **kw)
    ref = fn(*args, resume=False, **kw)
    return got, ref, labels


def same_document(a, b) -> None:
    """Two results' documents, provenance aside: equal keys in the same order, equal values."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("provenance"), db.pop("provenance")
    assert json.dumps(da) == json.dumps(db)


def tiny_model_spec(tmp_path_factory) -> str:
    """A tiny random Llama saved as a model folder: loaded by spec, it has a weights hash, so its runs resume."""
    from conftest import tiny_llama_dir
    from plipy.models import load_tokenizer

    return str(tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), load_tokenizer("smollm2-135m")[0]))


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    return tiny_model_spec(tmp_path_factory)


def test_an_interrupted_lens_resumes_to_the_same_document(tiny_spec):
    import plipy

    got, ref, labels = interrupted_then_resumed(plipy.lens, tiny_spec, TEXT, positions="all", tokens=[" test"])
    assert labels == ["logit lens (4 resumed)"]  # one batch of 4 layers was on disk
    same_document(got, ref)
    assert got.rows() == ref.rows()


def test_top_k_tokens_and_positions_are_checked(tiny_spec, tmp_path, capsys):
    import plipy

    missing = "no-such-model-anywhere"  # these fail before any model loads
    for kw, msg in (
        ({"tokens": [True]}, "expected token ids or non-empty strings"),
        ({"tokens": [-1]}, "ids start at 0"),
        ({"positions": "x"}, "cannot read 'x'"),
        ({"positions": "marker"}, "needs a corpus sample"),
        ({"top_k": 0}, "≥ 1"),
        ({"layers": "3-1"}, "is empty"),
    ):
        with pytest.raises(ParameterError, match=msg):
            plipy.lens(missing, TEXT, **kw)
    with pytest.raises(ParameterError, match=r"top_k: must be at most the vocabulary size \(49,152 tokens\)"):
        plipy.lens(tiny_spec, TEXT, top_k=99999999)
    out = tmp_path / "l.json"
    assert cli_exit_code(["lens", TEXT, "-m", tiny_spec, "--top-k", "99999999", "--out", str(out)]) == 2
    assert "error: --top-k: must be at most the vocabulary size" in capsys.readouterr().err and not out.exists()
