"""`plipy.trace`: TransformerLens-named activations against HF itself, on tiny random models of every family and on
SmolLM2.

References are independent of plipy: HF eager's `output_hidden_states` / `output_attentions`, the model's own
modules re-run in float64. Tolerances are derived (`fp32_bound`: 4× HF's own fp32 error on the same quantity + 16
ulps, or a rounding bound written from the quantities), never picked.
"""

from __future__ import annotations

import copy

import pytest
import torch

import plipy
from plipy.engine.cache import KINDS, TraceSpec, estimate
from plipy.errors import ParameterError, PlipyError
from tiny_models import ARCHS, COMMON, EPS32, build, float64, fp32_bound, variant

T = 10
SANDWICH = {"gemma2", "gemma3"}  # a norm on each sublayer's output before the residual add
# (attention module, output projection) by family, written here rather than taken from plipy's adapter
O_PROJ = {"gpt2": ("attn", "c_proj"), "gpt_neox": ("attention", "dense")}


def _ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, T), generator=g)


@pytest.fixture(scope="module", params=ARCHS)
def traced(request, one_thread):
    """(arch, eager fp32 model, HF fp32 outputs, HF float64 outputs, full trace) on one unpadded batch."""
    arch = request.param
    eager = build(arch, "eager")
    ids = _ids()
    out32 = eager(ids, output_hidden_states=True, output_attentions=True)
    out64 = float64(eager)(ids, output_hidden_states=True, output_attentions=True)
    logits, cache = plipy.trace(variant(eager, "eager"), ids)
    return arch, eager, ids, out32, out64, logits, cache


def _err(got: torch.Tensor, ref64: torch.Tensor) -> float:
    return (got.double() - ref64).abs().max().item()


def test_logits_and_names(traced):
    arch, eager, ids, out32, out64, logits, cache = traced
    n = eager.config.get_text_config().num_hidden_layers
    assert logits.shape == out32.logits.shape
    assert _err(logits, out64.logits) <= fp32_bound(out32.logits, out64.logits), arch
    assert cache.names()[0] == "hook_embed"
    assert cache.names()[1:10] == [
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_v",
        "blocks.0.attn.hook_attn_scores",
        "blocks.0.attn.hook_pattern",
        "blocks.0.attn.hook_z",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_mlp_out",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
    ]
    assert len(cache) == 1 + 8 * n
    assert all(t.device.type == "cpu" for t in cache.values())


def test_residuals_equal_hf_hidden_states(traced):
    """resid_pre[L] = hidden_states[L], resid_post[L] = hidden_states[L+1]; HF's last one is after the final norm."""
    arch, eager, ids, out32, out64, logits, cache = traced
    hs32, hs64 = out32.hidden_states, out64.hidden_states
    n = len(hs32) - 1
    for layer in range(n):
        pre = cache[f"blocks.{layer}.hook_resid_pre"]
        assert pre.shape == hs32[layer].shape
        assert _err(pre, hs64[layer]) <= fp32_bound(hs32[layer], hs64[layer]), f"{arch} layer {layer}"
        post = cache[f"blocks.{layer}.hook_resid_post"]
        if layer + 1 < n:
            assert torch.equal(post, cache[f"blocks.{layer + 1}.hook_resid_pre"])  # one tensor, two names
            assert _err(post, hs64[layer + 1]) <= fp32_bound(hs32[layer + 1], hs64[layer + 1]), f"{arch} {layer}"
    final = _final_norm(eager)
    assert _err(final(cache[f"blocks.{n - 1}.hook_resid_post"]), hs64[n]) <= fp32_bound(hs32[n], hs64[n]), arch
    assert cache.stack("hook_resid_post").shape == (n, *hs32[0].shape)


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
        if m is not None:
            return m
    raise AssertionError(f"no final norm in {type(model).__name__}")


def test_pattern_equals_eager_output_attentions(traced):
    arch, eager, ids, out32, out64, logits, cache = traced
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # key after query
    for layer, (att32, att64) in enumerate(zip(out32.attentions, out64.attentions, strict=True)):
        got = cache["pattern", layer]
        assert got.shape == att32.shape == (2, att32.shape[1], T, T)
        assert _err(got, att64) <= fp32_bound(att32, att64), f"{arch} layer {layer}"
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        # TL's convention: masked entries are -inf (causality here; the sliding window masks more)
        assert torch.isneginf(scores[..., causal]).all()
        assert torch.equal(torch.isneginf(scores), att64 == 0)
        assert (torch.softmax(scores, -1) - got).abs().max() <= 8 * EPS32


def _attention_parts(model: torch.nn.Module, arch: str, layer: int) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(output projection, post-attention norm or None) of one layer, found without plipy's adapter."""
    attn_name, proj_name = O_PROJ.get(arch, ("self_attn", "o_proj"))
    layers = model.transformer.h if arch == "gpt2" else model.gpt_neox.layers if arch == "gpt_neox" else None
    block = (layers if layers is not None else model.model.layers)[layer]
    post = block.post_attention_layernorm if arch in SANDWICH else None
    return getattr(getattr(block, attn_name), proj_name), post


def test_attn_out_is_o_proj_of_z(traced):
    """hook_attn_out = o_proj(hook_z) (then the post-attention norm, for sandwich-norm families), in float64."""
    arch, eager, ids, out32, out64, logits, cache = traced
    n_heads = cache["pattern", 0].shape[1]
    for layer in range(len(out32.attentions)):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        assert z.shape == (2, T, n_heads, z.shape[-1])
        proj, post = _attention_parts(eager, arch, layer)
        ref32 = proj(z.flatten(-2))
        ref64 = copy.deepcopy(proj).double()(z.flatten(-2).double())
        if post is not None:
            ref32, ref64 = post(ref32), copy.deepcopy(post).double()(ref64)
        assert _err(cache[f"blocks.{layer}.hook_attn_out"], ref64) <= fp32_bound(ref32, ref64), f"{arch} {layer}"


def test_z_is_pattern_times_values(traced):
    """z[b, q, h] = Σ_k pattern[b, h, q, k] · v[b, k, h // group]: ties hook_v to the model's own attention output.
    Both sides are T-term fp32 sums of probabilities (Σ = 1) times values: within 2(T + 16) ulps of max |v|."""
    arch, eager, ids, out32, out64, logits, cache = traced
    for layer in range(len(out32.attentions)):
        v = cache[f"blocks.{layer}.attn.hook_v"].double()  # [batch, pos, kv_head, d]
        p = cache["pattern", layer].double()
        group = p.shape[1] // v.shape[2]
        assert v.shape[:2] == (2, T)
        z = torch.einsum("bhqk,bkhd->bqhd", p, v.repeat_interleave(group, dim=2))
        tol = 2 * (T + 16) * EPS32 * v.abs().max().item()
        assert _err(cache[f"blocks.{layer}.attn.hook_z"], z) <= tol, f"{arch} layer {layer}"


def test_sublayer_outputs_add_up_to_the_residual(traced):
    """resid_post − resid_pre = attn_out + mlp_out: the block's two fp32 additions round by at most one ulp of
    |pre| + |attn_out| + |mlp_out| each (parallel blocks as well)."""
    arch, eager, ids, out32, out64, logits, cache = traced
    for layer in range(len(out32.attentions)):
        pre, post = cache[f"blocks.{layer}.hook_resid_pre"].double(), cache[f"blocks.{layer}.hook_resid_post"].double()
        a, m = cache[f"blocks.{layer}.hook_attn_out"].double(), cache[f"blocks.{layer}.hook_mlp_out"].double()
        bound = 2 * EPS32 * (pre.abs() + a.abs() + m.abs())
        assert ((post - pre - (a + m)).abs() <= bound).all(), f"{arch} layer {layer}"


def test_embed_is_the_embedding_module_output(traced):
    arch, eager, ids, out32, out64, logits, cache = traced
    assert torch.equal(cache["hook_embed"], eager.get_input_embeddings()(ids))
    if arch != "gpt2":  # GPT-2 adds its position embeddings after the token embedding
        assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])


def test_rows_and_heads_subsets_are_slices_of_the_full_capture(traced):
    arch, eager, ids, out32, out64, logits, cache = traced
    n_heads = cache["pattern", 0].shape[1]
    heads = [n_heads - 1, 0]
    _, sub = plipy.trace(variant(eager, "eager"), ids, rows=[-1, 3], heads=heads, layers="1-2")
    rows, hs = [T - 1, 3], sorted(heads)
    assert sub.rows == rows and sub.heads == hs
    assert sorted({int(n.split(".")[1]) for n in sub.names() if n.startswith("blocks.")}) == [1, 2]
    for layer in (1, 2):
        for name in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            assert torch.equal(sub[f"blocks.{layer}.{name}"], cache[f"blocks.{layer}.{name}"][:, rows])
        assert torch.equal(sub["z", layer], cache["z", layer][:, rows][:, :, hs])
        assert torch.equal(sub["v", layer], cache["v", layer])  # keys: every position, every kv head
        for kind in ("pattern", "attn_scores"):
            got, full = sub[kind, layer], cache[kind, layer][:, hs][:, :, rows]
            # the chosen rows are computed alone: a differently shaped matmul may round differently; both are
            # within fp32_bound of the float64 answer, so within twice it of each other
            ref32, ref64 = out32.attentions[layer][:, hs][:, :, rows], out64.attentions[layer][:, hs][:, :, rows]
            finite = torch.isfinite(full)
            assert torch.equal(torch.isfinite(got), finite)
            assert (got[finite] - full[finite]).abs().max() <= 2 * fp32_bound(ref32, ref64) + 8 * EPS32 * (
                full[finite].abs().max()
            ), f"{arch} {kind} {layer}"
    assert torch.equal(sub["hook_embed"], cache["hook_embed"][:, rows])


def test_estimate_is_the_cache_size(traced):
    arch, eager, ids, out32, out64, logits, cache = traced
    n = len(out32.attentions)
    full = TraceSpec.build([(k, None) for k in KINDS], list(range(n)))
    parts = estimate(full, eager, 2, T)
    assert sum(v for k, v in parts.items() if k != "working") == cache.nbytes
    _, sub = plipy.trace(variant(eager, "eager"), ids, names=["pattern", "z", "blocks.0.hook_resid_post"], rows="last")
    spec = TraceSpec.build(
        [("hook_pattern", None), ("hook_z", None), ("hook_resid_post", 0)], list(range(n)), rows=(9,)
    )
    assert sum(v for k, v in estimate(spec, eager, 2, T).items() if k != "working") == sub.nbytes


def test_cache_mapping(traced):
    arch, eager, ids, out32, out64, logits, cache = traced
    assert cache["blocks.1.attn.hook_pattern"] is cache["pattern", 1] is cache["hook_pattern", 1]
    assert "blocks.1.attn.hook_pattern" in cache and "blocks.1.attn.hook_nothing" not in cache
    with pytest.raises(KeyError, match=r"'blocks\.99\.hook_resid_post' was not captured; this cache holds hook_embed"):
        cache["blocks.99.hook_resid_post"]
    with pytest.raises(TypeError):
        cache["hook_embed"] = torch.zeros(1)  # read-only
    moved = cache.to("cpu")
    assert moved.names() == cache.names() and moved.nbytes == cache.nbytes
    assert cache.layers("hook_v") == list(range(len(out32.attentions)))
    assert cache.stack("pattern").shape[0] == len(out32.attentions)


# Families whose table row has a quirk the tiny set above lacks: Granite scales each sublayer's output
# (residual_multiplier), OLMo-2 normalises it after the sublayer (no pre-norm), Mixtral's MLP is a mixture of experts.
QUIRKS = {
    "granite": lambda tf: tf.GraniteConfig(
        **COMMON, num_key_value_heads=2, residual_multiplier=0.5, embedding_multiplier=2.0
    ),
    "olmo2": lambda tf: tf.Olmo2Config(**COMMON, num_key_value_heads=2),
    "mixtral": lambda tf: tf.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("family", sorted(QUIRKS))
def test_family_quirks(family, one_thread):
    """Residuals against HF's hidden states and the residual decomposition on the families with quirks."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = QUIRKS[family](tf)
    # experts in plain matmuls: the grouped kernel has no float64, which the reference needs
    model = tf.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.ndim >= 2:
                p.normal_(0, 0.15)
    model.eval()
    ids = _ids()
    out32 = model(ids, output_hidden_states=True, output_attentions=True)
    out64 = float64(model)(ids, output_hidden_states=True, output_attentions=True)
    _, cache = plipy.trace(variant(model, "eager"), ids)
    for layer in range(COMMON["num_hidden_layers"]):
        hs32, hs64 = out32.hidden_states[layer], out64.hidden_states[layer]
        assert _err(cache["resid_pre", layer], hs64) <= fp32_bound(hs32, hs64), f"{family} {layer}"
        att32, att64 = out32.attentions[layer], out64.attentions[layer]
        assert _err(cache["pattern", layer], att64) <= fp32_bound(att32, att64), f"{family} {layer}"
        pre, post = cache["resid_pre", layer].double(), cache["resid_post", layer].double()
        a, m = cache["attn_out", layer].double(), cache["mlp_out", layer].double()
        assert ((post - pre - (a + m)).abs() <= 2 * EPS32 * (pre.abs() + a.abs() + m.abs())).all(), f"{family} {layer}"


def test_text_input_and_bos(tmp_path, one_thread):
    """A text goes through the tokenizer as plipy's experiments feed it (no special tokens; BOS when asked)."""
    from conftest import tiny_llama_dir
    from plipy.models import load_tokenizer

    tok, _ = load_tokenizer("smollm2-135m")
    lm = plipy.load_model(str(tiny_llama_dir(tmp_path / "m", tok)), dtype="float32", device="cpu")
    text = "def add(a, b):"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    logits, cache = plipy.trace(lm, text, names=["hook_pattern"], rows="last")
    assert logits.shape[:2] == (1, n)
    assert cache["blocks.3.attn.hook_pattern"].shape == (1, lm.n_heads, 1, n)
    assert cache.rows == [n - 1]
    _, with_bos = plipy.trace(lm, text, names="blocks.0.hook_resid_pre", bos=True)
    assert with_bos.names() == ["blocks.0.hook_resid_pre"] and with_bos.rows == list(range(n + 1))


def test_memory_refusal_before_any_forward(one_thread):
    model = build("llama", "eager")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(PlipyError, match=r"above max_bytes=1000 B: ask fewer names, layers or heads, rows='last'"):
        plipy.trace(model, _ids(), max_bytes=1000)
    assert not calls
    spec = TraceSpec.build([("hook_pattern", None)], [0, 1, 2])
    need = sum(estimate(spec, model, 2, T).values())
    plipy.trace(model, _ids(), names="hook_pattern", max_bytes=need)  # exactly at the limit: runs
    assert calls


def test_bad_parameters_before_the_model_loads():
    with pytest.raises(ParameterError, match="unknown hook name 'hook_resid_mid'.*hook_pattern") as e:
        plipy.trace("no/such-model", "x", names=["hook_resid_mid"])
    assert e.value.param == "names"
    for bad in ("blocks.2.hook_pattern", "blocks.x.hook_resid_pre", "blocks.0.hook_embed", ""):
        with pytest.raises(ParameterError, match="unknown hook name"):
            plipy.trace("no/such-model", "x", names=[bad])
    with pytest.raises(ParameterError, match="rows"):
        plipy.trace("no/such-model", "x", rows="first")
    with pytest.raises(ParameterError, match="max_bytes"):
        plipy.trace("no/such-model", "x", max_bytes=0)
    with pytest.raises(ParameterError, match="layers"):
        plipy.trace("no/such-model", "x", layers="3-1")
    with pytest.raises(ParameterError, match="text"):
        plipy.trace("no/such-model", [])
    with pytest.raises(ParameterError, match="bos"):
        plipy.trace("no/such-model", [1, 2], bos=True)


def test_bounds_that_need_the_model(one_thread):
    model = build("llama", "eager")
    with pytest.raises(ParameterError, match="names: layer 3 does not exist: the model has 3 layers"):
        plipy.trace(model, _ids(), names=["blocks.3.hook_resid_post"])
    with pytest.raises(ParameterError, match="heads: head 4 does not exist"):
        plipy.trace(model, _ids(), heads=[4])
    with pytest.raises(ParameterError, match="heads: names no head"):
        plipy.trace(model, _ids(), heads="none", names=["pattern"])
    with pytest.raises(ParameterError, match="rows: position 10 does not exist"):
        plipy.trace(model, _ids(), rows=[10])
    with pytest.raises(ParameterError, match="token ids must lie in 0…127"):
        plipy.trace(model, [0, 128])


def test_unknown_family_is_refused_by_name(one_thread):
    """Patterns and residuals work for any family; z and the sublayer outputs need the family's table row."""
    model = build("llama", "eager")
    model.config.model_type = "mystery"
    with pytest.raises(PlipyError, match=r"hook_z\): plipy has no adapter for the 'mystery' family"):
        plipy.trace(model, _ids(), names=["hook_z"])
    with pytest.raises(PlipyError, match="'mystery' family"):
        plipy.trace(model, _ids(), names=["hook_mlp_out"])
    _, cache = plipy.trace(model, _ids(), names=["pattern", "resid_post"])
    assert len(cache) == 6


@pytest.mark.slow
def test_smollm2_against_hf_eager(smollm):
    """The real model: residuals and full patterns against HF eager, fp32 vs the float64 answer; the doc example."""
    ref = copy.deepcopy(smollm.model)
    ref.set_attn_implementation("eager")
    ids = torch.tensor([smollm.tokenizer("def add(a, b):\n    return a + b", add_special_tokens=False)["input_ids"]])
    out32 = ref(ids, output_hidden_states=True, output_attentions=True)
    ref64 = ref.double()
    out64 = ref64(ids, output_hidden_states=True, output_attentions=True)
    del ref, ref64
    logits, cache = plipy.trace(smollm, ids, names=["hook_resid_post", "hook_pattern"])
    n = smollm.n_layers
    assert _err(logits, out64.logits) <= fp32_bound(out32.logits, out64.logits)
    for layer in range(n - 1):
        hs32, hs64 = out32.hidden_states[layer + 1], out64.hidden_states[layer + 1]
        assert _err(cache["resid_post", layer], hs64) <= fp32_bound(hs32, hs64), layer
    for layer in range(n):
        att32, att64 = out32.attentions[layer], out64.attentions[layer]
        assert _err(cache["pattern", layer], att64) <= fp32_bound(att32, att64), layer
    final = smollm.arch.final_norm()
    assert _err(final(cache["resid_post", n - 1]), out64.hidden_states[n]) <= fp32_bound(
        out32.hidden_states[n], out64.hidden_states[n]
    )
    # docs/trace.md's example, on the loaded model: the last token's row of every layer
    lp, last = plipy.trace(smollm, "def add(a, b):", names=["hook_pattern"], rows="last")
    k = lp.shape[1]
    assert last.names() == [f"blocks.{i}.attn.hook_pattern" for i in range(n)]
    assert last["blocks.3.attn.hook_pattern"].shape == (1, smollm.n_heads, 1, k)
    assert (last.stack("pattern").sum(-1) - 1).abs().max() <= k * EPS32
