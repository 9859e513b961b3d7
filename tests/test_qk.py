"""`plipy.qk`: attention scores split into query-side × key-side components.

Exactness is checked against an independent float64 recomputation: HF's own modules in a float64 copy of the model,
with an attention function written here that records q·kᵀ·scaling as HF hands it over (the decomposition code is not
used). The terms (computed from the fp32 run) must land within `fp32_bound` of it — 4× HF's own fp32 error on the
same score plus 16 ulps — on tiny random models of every family plipy decomposes (GQA included), Gemma-2 (softcap:
the pre-softcap score) and Gemma-3 (q/k norms), and on SmolLM2.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import plipy
from plipy.engine import qk as eq
from plipy.errors import ParameterError, PlipyError
from tiny_models import ARCHS, COMMON, EPS32, build, float64, fp32_bound

T = 10
QUERY, KEYS = 9, [0, 4, 7, 9]
RAW: dict[int, torch.Tensor] = {}
KNOCK: dict[int, list[tuple[int, int]]] = {}  # layer → (query, key) edges the recorder removes (-inf), all heads
RECORDER = "plipy_test_raw_scores"
EPS64 = torch.finfo(torch.float64).eps


def _recorder(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention that keeps each layer's raw q·kᵀ·scaling (before softcap and mask)."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    RAW[module.layer_idx] = w.detach().clone()
    if kwargs.get("softcap") is not None:
        w = torch.tanh(w / kwargs["softcap"]) * kwargs["softcap"]
    if attention_mask is not None:
        w = w + attention_mask
    for q, k in KNOCK.get(module.layer_idx, []):
        w[..., q, k] = -torch.inf
    p = torch.softmax(w, -1, dtype=w.dtype)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), p


AttentionInterface.register(RECORDER, _recorder)
AttentionMaskInterface.register(RECORDER, eager_mask)

# Families whose table row has a quirk the tiny set lacks: Qwen3's q/k norms per head, OLMo-2's over every head (and
# no pre-norm), EXAONE-4 (no pre-norm, q/k norms), Granite's attention and residual multipliers, Phi's LayerNorm q/k
# norms and partial rotary, SmolLM3's layers without RoPE.
EXTRA = {
    "qwen3": lambda: tf.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16),
    "olmo2": lambda: tf.Olmo2Config(**COMMON, num_key_value_heads=2),
    "exaone4": lambda: tf.Exaone4Config(**COMMON, num_key_value_heads=2),
    "granite": lambda: tf.GraniteConfig(
        **COMMON, num_key_value_heads=2, residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.3
    ),
    "phi": lambda: tf.PhiConfig(**COMMON, qk_layernorm=True),
    "smollm3": lambda: tf.SmolLM3Config(**COMMON, num_key_value_heads=2, no_rope_layer_interval=2, pad_token_id=0),
    # Llama's attention layout under other names: accepted, so checked here too
    "mistral": lambda: tf.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
    "mixtral": lambda: tf.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        **COMMON, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32
    ),
}


def _extra(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    # eager experts (MoE families): the grouped matmul kernel has no float64, which the reference copy runs in
    model = tf.AutoModelForCausalLM.from_config(
        EXTRA[name](), attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n and p.ndim >= 2:
                p.normal_(0, 0.15)
    return model.eval().requires_grad_(False)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(seed))


def _raw_scores(
    model: torch.nn.Module,
    ids: torch.Tensor,
    dtype: torch.dtype,
    add: tuple[int, list[int], torch.Tensor] | None = None,
    knock: dict[int, list[tuple[int, int]]] | None = None,
) -> dict[int, torch.Tensor]:
    """HF's own q·kᵀ·scaling of every layer, from a copy of the model in `dtype` (independent of plipy). `add`:
    (layer, positions, vector) added to the residual entering that layer; `knock`: edges removed per layer."""
    m = float64(model).to(dtype)
    m.set_attn_implementation(RECORDER)
    if add is not None:
        at, positions, vec = add

        def steer(module, args, kwargs):
            h = args[0].clone() if args else kwargs["hidden_states"].clone()
            h[:, positions] += vec.to(h.dtype)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        m.model.layers[at].register_forward_pre_hook(steer, with_kwargs=True)
    RAW.clear()
    KNOCK.clear()
    KNOCK.update(knock or {})
    try:
        with torch.no_grad():
            m(ids)
    finally:
        KNOCK.clear()
    return {k: v[0].double() for k, v in RAW.items()}


def _decompose(model, ids, layer, per_head=False, sae=None, **run):
    """(terms per key [heads, A, B], observed scores [heads, keys], the map) at QUERY → KEYS."""
    cap = eq.capture(model, ids, layer, [QUERY, *KEYS], per_head=per_head, **run)
    m = eq.qk_map(model, layer)

    def side(pos, s):
        i = cap.row(pos)
        rope = None if cap.rope is None else (cap.rope[0][i], cap.rope[1][i])
        if sae is None:
            names, parts = cap.names, cap.components[:, i]
        else:
            from plipy.experiments.qk import sae_parts

            names, parts = sae_parts(sae, cap.resid[i])
        return eq.project(m, s, names, parts, cap.resid[i], rope)

    _, q = side(QUERY, "q")
    terms = {k: eq.terms(m, q, side(k, "k")[1], range(m.n_heads)) for k in KEYS}
    return terms, cap.scores[:, cap.row(QUERY)].double(), m, cap


def _check_family(model: torch.nn.Module, name: str) -> None:
    ids = _ids()
    raw64, raw32 = _raw_scores(model, ids, torch.float64), _raw_scores(model, ids, torch.float32)
    n = len(raw64)
    for layer in range(n):
        for per_head in (False, True) if layer == n - 1 else (False,):
            terms, observed, m, cap = _decompose(model, ids, layer, per_head)
            assert torch.allclose(cap.components.sum(0), cap.resid, rtol=0, atol=1e-12)
            for k, t in terms.items():
                ref, ref32 = raw64[layer][:, QUERY, k], raw32[layer][:, QUERY, k]
                got = t.sum((1, 2))
                bound = fp32_bound(ref32, ref)
                assert (got - ref).abs().max() <= bound, (name, layer, per_head, k)
                seen = observed[:, k]
                if torch.isfinite(seen).all():  # keys outside a sliding window are masked (-inf)
                    assert (eq.softcap(m, got) - seen).abs().max() <= bound + 16 * EPS32 * seen.abs().max(), name


@pytest.mark.parametrize("arch", ARCHS)
def test_terms_sum_to_the_score(arch, one_thread):
    """Every layer (and per-head components at the last): Σ terms = the float64 score within the fp32 bound."""
    _check_family(build(arch, "eager"), arch)


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_terms_sum_to_the_score_quirks(name, one_thread):
    _check_family(_extra(name), name)


def test_gemma2_softcap_and_gemma3_qk_norms_are_described(one_thread):
    """Gemma-2: the terms sum to the pre-softcap score (the map says the cap); Gemma-3: q/k RMSNorms frozen."""
    g2 = eq.qk_map(build("gemma2", "eager"), 1)
    assert g2.softcap == 50.0 and g2.describe()["softcap"] == 50.0
    assert g2.scaling == 16**-0.5  # query_pre_attn_scalar
    g3 = eq.qk_map(build("gemma3", "eager"), 2)
    assert g3.describe()["qk_norm"] == "rmsnorm per head" and g3.q_norm.gain is not None
    assert torch.equal(g3.q_norm.gain, build("gemma3", "eager").model.layers[2].self_attn.q_norm.weight.double() + 1)


def test_refused_families_say_why(one_thread):
    torch.manual_seed(0)
    helium = tf.AutoModelForCausalLM.from_config(tf.HeliumConfig(**COMMON, num_key_value_heads=2))
    assert "interleaved" in eq.supported(helium)
    with pytest.raises(PlipyError, match="interleaved"):
        eq.qk_map(helium, 0)


def test_sae_features_and_error_sum_to_the_same_score(one_thread):
    """The residual as active latents + decoder bias + error: the feature × feature terms sum to the score."""
    from plipy.sae import random_sae

    model = build("llama", "eager")
    ids = _ids()
    raw64, raw32 = _raw_scores(model, ids, torch.float64), _raw_scores(model, ids, torch.float32)
    sae = random_sae(64, 256, hook_name="blocks.2.hook_resid_pre", seed=3)
    sae.b_dec = torch.randn(64, generator=torch.Generator().manual_seed(4)) * 0.1  # a bias term that matters
    by_sae, _, _, _ = _decompose(model, ids, 2, sae=sae)
    by_comp, _, _, _ = _decompose(model, ids, 2)
    for k in KEYS:
        ref = raw64[2][:, QUERY, k]
        bound = fp32_bound(raw32[2][:, QUERY, k], ref)
        assert (by_sae[k].sum((1, 2)) - ref).abs().max() <= bound
        assert (by_sae[k].sum((1, 2)) - by_comp[k].sum((1, 2))).abs().max() <= 1e-9 * (1 + ref.abs().max())
        assert by_sae[k].shape[1] > 3  # active latents, then sae_bias, sae_error


# -- the experiment, the API and the CLI on a tiny Llama with SmolLM2's tokenizer ---------------------------------


@pytest.fixture(scope="module")
def tiny(smollm, tmp_path_factory):
    """A tiny random Llama (4 layers, GQA) with SmolLM2's tokenizer, as a LoadedModel."""
    from plipy.models import wrap_model

    cfg = tf.LlamaConfig(
        vocab_size=len(smollm.tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.ndim >= 2:
                p.normal_(0, 0.15)
    return wrap_model(model.eval(), smollm.tokenizer)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from conftest import corpus_subset

    return corpus_subset(tmp_path_factory.mktemp("qk"), {"python_doctest": 3, "rust_test": 3})


def _check_against_hf(tiny, corpus, r, run="", add_at=None, knock_layers=()):
    """Each input's mean raw score per head (what its terms sum to) against HF's float64 mean over its keys, within
    the fp32 bound; `run="intervened"` checks the intervened run (steering vector `add_at` = (layer, vector) at the
    targets, or query → key edges removed in `knock_layers`)."""
    from plipy.corpus import token_positions

    for s, sample in zip(r["samples"], corpus.samples(r["groups"]), strict=True):
        sp = token_positions(sample, tiny.tokenizer)
        assert s["id"] == sample.id and s["query_token"] == sp.marker_token
        got = s[run] if run else s
        q, keys = s["query_token"], got["keys"]
        # the keys by the rule, from the corpus' own positions: the targets before the marker, duplicates kept
        assert keys == [t for t in sp.target_tokens if t is not None and t < sp.marker_token], s["id"]
        ids = torch.tensor([sp.input_ids])
        add = None if add_at is None else (add_at[0], sorted(set(keys)), add_at[1])
        knock = {layer: [(q, k) for k in sorted(set(keys))] for layer in knock_layers}
        raw = {dt: _raw_scores(tiny.model, ids, dt, add, knock)[r["layer"]] for dt in (torch.float64, torch.float32)}
        ref64, ref32 = raw[torch.float64][r["heads"]][:, q, keys], raw[torch.float32][r["heads"]][:, q, keys]
        bound = fp32_bound(ref32, ref64)  # per key; a mean of keys each within it is within it too
        observed = torch.tensor(got["per_key"]["observed"], dtype=torch.float64)  # the fp32 run's own scores
        assert (observed - ref64).abs().max() <= bound, s["id"]
        assert (torch.tensor(got["raw_score"], dtype=torch.float64) - ref64.mean(1)).abs().max() <= bound, s["id"]


def _table_sums(r, column="contribution"):
    """Per input and head, the table's rows summed, and the float64 rounding bound of that sum (n·eps·Σ|terms|)."""
    df = r.to_pandas()
    g = df.assign(a=df[column].abs()).groupby(["sample", "head"], sort=False)
    return g[column].sum(), g.size() * EPS64 * g["a"].sum()


def test_result_is_exact_and_complete(tiny, small, one_thread):
    r = plipy.qk(tiny, small, layer=3, heads="0-1", progress=False, top=5)
    _check_against_hf(tiny, small, r)
    assert r["check"]["rounding_ratio_max"] < 64 * EPS32  # the fp32 residual's parts: a few roundings each
    assert r.head_keys() == ["H0", "H1", "mean"]
    sums, bound = _table_sums(r)
    for s in r["samples"]:  # the table's rows of an input sum, per head, to its mean raw score
        for i, h in enumerate(r["heads"]):
            assert abs(sums[(s["id"], h)] - s["raw_score"][i]) <= bound[(s["id"], h)] + EPS64 * abs(s["raw_score"][i])
    contrast = r.block("mean", "contrast")
    assert contrast["score"]["diff"] == pytest.approx(
        r.block("mean", "groups", "python_doctest")["score"]["mean"]
        - r.block("mean", "groups", "rust_test")["score"]["mean"]
    )
    assert set(r.plot()) == {"heatmap", "pairs", "sides", "stability"}
    assert "exact: the terms sum" in r.summary()


def test_per_head_components_split_the_same_score(tiny, small, one_thread):
    a = plipy.qk(tiny, small, layer=2, heads=[1], progress=False)
    b = plipy.qk(tiny, small, layer=2, heads=[1], per_head_components=True, progress=False)
    qa = set(a.columns["query_component"])
    qb = set(b.columns["query_component"])
    assert "L1.attn" in qa and {"L1H0", "L1H3"} <= qb and "L1.attn" not in qb
    _check_against_hf(tiny, small, b)
    for sa, sb in zip(a["samples"], b["samples"], strict=True):  # two float64 sums of the same fp32 parts
        assert sa["raw_score"] == pytest.approx(sb["raw_score"], rel=1e-12, abs=1e-12)


def test_identity_interventions_give_zero_differences(tiny, small, one_thread):
    from plipy.sae import random_sae

    r = plipy.qk(tiny, small, layer=3, heads=[0], knockout="0-2", knockout_heads="none", progress=False)
    assert r["intervention"]["kind"] == "knockout"
    assert (r.columns["difference"] == 0).all()
    sae = random_sae(64, 128, hook_name="blocks.1.hook_resid_pre")
    s = plipy.qk(tiny, small, layer=3, heads=[0], steer=5, steer_sae=sae, steer_coeff=0, progress=False)
    assert (s.columns["difference"] == 0).all()
    moved = plipy.qk(tiny, small, layer=3, heads=[0], steer=5, steer_sae=sae, steer_coeff=4.0, progress=False)
    _check_against_hf(tiny, small, moved, "intervened", add_at=(1, 4.0 * sae.W_dec[5].double()))
    assert (moved.columns["difference"] != 0).any()
    sums, bound = _table_sums(moved, "difference")
    for s in moved["samples"]:  # the difference's rows sum to the change of the score
        change = s["intervened"]["raw_score"][0] - s["raw_score"][0]
        scale = abs(s["intervened"]["raw_score"][0]) + abs(s["raw_score"][0])
        assert abs(sums[(s["id"], 0)] - change) <= 2 * bound[(s["id"], 0)] + 2 * EPS64 * scale
    assert "steer" in set(moved.columns["query_component"])  # the added vector is a component of the steered run
    cut = plipy.qk(tiny, small, layer=3, heads=[0, 3], knockout="0-2", progress=False)
    assert (cut.columns["difference"] != 0).any()
    _check_against_hf(tiny, small, cut, "intervened", knock_layers=(0, 1, 2))


def test_sae_basis_and_entity_prompts(tiny, one_thread):
    from plipy.sae import random_sae

    prompts = [
        {"prompt": "The city Paris is located in", "entity": "Paris", "label": "known"},
        {"prompt": "The city Zorblax is located in", "entity": "Zorblax", "label": "unknown"},
        {"prompt": "The movie Titanic was released in", "entity": "Titanic", "label": "known"},
        {"prompt": "The movie Quarnix was released in", "entity": "Quarnix", "label": "unknown"},
    ]
    sae = random_sae(64, 128, hook_name="blocks.1.hook_resid_post")  # = the residual entering layer 2
    r = plipy.qk(tiny, prompts=prompts, sae=sae, heads=[2], progress=False)
    assert r["layer"] == 2 and r["basis"] == "sae" and r["groups"] == ["known", "unknown"]
    for s in r["samples"]:  # against HF's float64 score of the same tokens (BOS prepended: prompts' default)
        ids = torch.tensor([[tiny.tokenizer.bos_token_id, *tiny.tokenizer(s["prompt"]).input_ids]])
        assert ids.shape[1] == s["n_tokens"]
        q, keys = s["query_token"], s["keys"]
        ref64 = _raw_scores(tiny.model, ids, torch.float64)[2][[2]][:, q, keys].mean(1)
        ref32 = _raw_scores(tiny.model, ids, torch.float32)[2][[2]][:, q, keys].mean(1)
        assert abs(s["raw_score"][0] - ref64.item()) <= fp32_bound(ref32, ref64)
    s = r["samples"][0]
    assert s["query_token"] == s["n_tokens"] - 1 and s["key_tokens"]
    names = set(r.columns["query_component"])
    assert {"sae_bias", "sae_error"} <= names and any(n.startswith("F") for n in names)


def test_save_load_and_html(tiny, small, tmp_path, one_thread):
    r = plipy.qk(tiny, small, layer=1, heads=[0], progress=False)
    for fmt in ("csv", "parquet"):
        files = r.save(tmp_path / f"qk-{fmt}.json", table_format=fmt)
        assert plipy.load_result(files["json"]) == r
    page = r.to_html()
    assert "Contributions to the score" in page and "Stability" in page


def test_cli(tiny, small, tmp_path, monkeypatch, one_thread):
    from conftest import cli_exit_code
    from plipy.api import front

    monkeypatch.setattr(front, "as_model", lambda *a, **k: tiny)
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps(json.loads(small.path.read_text())))
    out = tmp_path / "qk.json"
    code = cli_exit_code(["qk", "--corpus", str(corpus), "--layer", "2", "--heads", "1", "--out", str(out), "--plot"])
    assert code == 0 and out.is_file() and (tmp_path / "qk-heatmap.png").is_file()
    assert plipy.load_result(out)["layer"] == 2


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"heads": "none"}, "heads"),
        ({"top": 0}, "top"),
        ({"layer": -1}, "layer"),
        ({"batch_size": 4}, "batch_size"),
        ({"layer": 3, "scan": "x.json"}, "scan"),
        ({"knockout": "1", "steer": 3}, "knockout"),
        ({"knockout": "a-b"}, "knockout"),
        ({"steer": 3}, "steer_sae"),
        ({"steer_pos": "marker"}, "steer"),
        ({"groups": "python_doctest,python_doctest"}, "groups"),
        ({"prompts": [{"prompt": "The city Paris", "entity": "Paris"}], "corpus": "x"}, "prompts"),
    ],
)
def test_bad_parameters_are_refused_before_the_model_loads(kwargs, param, monkeypatch):
    from plipy.api import front

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(front, "as_model", no_model)
    with pytest.raises(ParameterError) as e:
        plipy.qk("no-such-model", **kwargs)
    assert e.value.param == param


def test_bad_steering_and_scan_files_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    from plipy.api import front
    from plipy.sae import random_sae

    monkeypatch.setattr(front, "as_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    sae = random_sae(64, 32, hook_name="blocks.1.hook_resid_pre")
    with pytest.raises(ParameterError, match="latent 99") as e:
        plipy.qk("x", steer=99, steer_sae=sae)
    assert e.value.param == "steer"
    with pytest.raises(ParameterError) as e:
        plipy.qk("x", steer=3, steer_sae=sae, steer_coeff="norm")
    assert e.value.param == "steer_coeff"
    with pytest.raises(ParameterError) as e:
        plipy.qk("x", steer=3, steer_sae=sae, steer_pos="entity_last")  # a prompts position on a corpus
    assert e.value.param == "steer_pos"
    nohook = random_sae(64, 32)
    with pytest.raises(ParameterError, match="names no hook") as e:
        plipy.qk("x", sae=nohook)
    with pytest.raises(PlipyError, match="unknown group"):
        plipy.qk("x", groups="python_doctest,nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ParameterError) as e:
        plipy.qk("x", scan=bad)
    assert e.value.param == "scan"


def test_bounds_that_need_the_model(tiny, small, one_thread):
    from plipy.sae import random_sae

    with pytest.raises(ParameterError, match="cannot change the scores of layer 2") as e:
        plipy.qk(tiny, small, layer=2, knockout="2-3", progress=False)
    assert e.value.param == "knockout"
    with pytest.raises(ParameterError, match="not the residual entering layer 3"):
        plipy.qk(tiny, small, layer=3, sae=random_sae(64, 32, hook_name="blocks.1.hook_resid_pre"), progress=False)
    with pytest.raises(ParameterError, match="after layer 1"):
        plipy.qk(tiny, small, layer=1, steer=0, steer_sae=random_sae(64, 32, hook_name="blocks.3.hook_resid_pre"))
    with pytest.raises(ParameterError, match="layer 7 does not exist"):
        plipy.qk(tiny, small, layer=7, progress=False)


# -- SmolLM2 ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_terms_sum_to_the_float64_score(smollm):
    """The real model, one corpus sample, its marker → targets at layer 13: Σ terms against HF's float64 score."""
    from plipy.corpus import load_corpus, token_positions

    sp = token_positions(load_corpus().groups["python_doctest"][0], smollm.tokenizer)
    ids = torch.tensor([sp.input_ids])
    keys = sorted({t for t, a in zip(sp.target_tokens, sp.after_marker, strict=True) if t is not None and not a})
    layer, q = 13, sp.marker_token
    raw64, raw32 = _raw_scores(smollm.model, ids, torch.float64), _raw_scores(smollm.model, ids, torch.float32)
    for per_head in (False, True):
        cap = eq.capture(smollm.model, ids, layer, [q, *keys], per_head=per_head)
        m = eq.qk_map(smollm.model, layer)
        iq = cap.row(q)
        _, qv = eq.project(m, "q", cap.names, cap.components[:, iq], cap.resid[iq], (cap.rope[0][iq], cap.rope[1][iq]))
        for k in keys:
            ik = cap.row(k)
            rope = (cap.rope[0][ik], cap.rope[1][ik])
            _, kv = eq.project(m, "k", cap.names, cap.components[:, ik], cap.resid[ik], rope)
            got = eq.terms(m, qv, kv, range(m.n_heads)).sum((1, 2))
            ref = raw64[layer][:, q, k]
            assert (got - ref).abs().max() <= fp32_bound(raw32[layer][:, q, k], ref), (per_head, k)
            assert (got - cap.scores[:, iq, k].double()).abs().max() <= fp32_bound(raw32[layer][:, q, k], ref)
