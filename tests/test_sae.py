"""SAE loading and `plipy sae attention`: the four measures against an explicit eager reference, exactness of
coefficient 0 and of left-padded batches, end-to-end runs on SmolLM2 with SAEs written here, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import plipy
from plipy import options
from plipy import sae as sa
from plipy import sae as saes
from plipy.engine import Engine, ResidualAdd
from plipy.errors import PlipyError
from plipy.results.sae_attention import difference
from plipy.sae import inputs as si
from tiny_models import build, variant

MEASURES = sa.MEASURES

# ---------------------------------------------------------------------------------------------- the reference


def _blocks(model, arch):
    if arch == "gpt2":
        return model.transformer.h
    if arch == "gpt_neox":
        return model.gpt_neox.layers
    return model.model.layers


def _attn(block, arch):
    return block.attention if arch == "gpt_neox" else block.attn if arch == "gpt2" else block.self_attn


def _value_heads(out, arch, n_heads, n_kv):
    """Per-head value vectors [b, S, kv, d] from the recorded projection output."""
    b, s, _ = out.shape
    if arch == "gpt2":
        d_model = out.shape[-1] // 3
        return out[..., 2 * d_model :].reshape(b, s, n_heads, -1)
    if arch == "gpt_neox":
        qkv = out.reshape(b, s, n_heads, -1)
        d = qkv.shape[-1] // 3
        return qkv[..., 2 * d :]
    return out.reshape(b, s, n_kv, -1)


def _w_o_head(attn, arch, h, d):
    """W_O^h as [d, d_model] read directly from the module's weight."""
    if arch == "gpt2":
        return attn.c_proj.weight[h * d : (h + 1) * d].double()  # Conv1D: [in, out]
    proj = attn.dense if arch == "gpt_neox" else attn.o_proj
    return proj.weight[:, h * d : (h + 1) * d].T.double()


def reference(model, arch, ids, mask, steer_pos, adds=None, ovw_p=1, **forward_kw):
    """The four measures [b, layers, heads] from an eager copy: output_attentions + recorded value projections +
    module weights, written without plipy. `adds` = (layer, {(b, p): vector}) applied by a plain pre-hook;
    `forward_kw` goes to the forward (e.g. `logits_to_keep=1` for a large vocabulary)."""
    blocks = _blocks(model, arch)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    vals, outs, hooks = {}, {}, []
    for i, blk in enumerate(blocks):
        attn = _attn(blk, arch)
        proj = attn.c_attn if arch == "gpt2" else attn.query_key_value if arch == "gpt_neox" else attn.v_proj
        hooks.append(proj.register_forward_hook(lambda m, a, o, i=i: vals.__setitem__(i, o.detach())))
        hooks.append(attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0].detach())))
    if adds is not None:
        layer, vecs = adds

        def pre(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            for (b, p), v in vecs.items():
                h[b, p] = h[b, p] + (v(h[b, p]) if callable(v) else v)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        hooks.append(blocks[layer].register_forward_pre_hook(pre, with_kwargs=True))
    pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, output_attentions=True, **forward_kw)
    finally:
        for hk in hooks:
            hk.remove()
    b_n, seq = ids.shape
    q = seq - 1
    out = {m: np.zeros((b_n, len(blocks), n_heads)) for m in MEASURES}
    for li, blk in enumerate(blocks):
        attn_mod = _attn(blk, arch)
        v = _value_heads(vals[li], arch, n_heads, n_kv).double()
        d = v.shape[-1]
        bias = getattr(
            attn_mod.c_proj if arch == "gpt2" else attn_mod.dense if arch == "gpt_neox" else attn_mod.o_proj,
            "bias",
            None,
        )
        for b in range(b_n):
            total = torch.zeros(cfg.hidden_size, dtype=torch.float64)
            for h in range(n_heads):
                a = res.attentions[li][b, h, q].double()
                vk = v[b, :, h // (n_heads // v.shape[2])]  # [S, d]
                w = _w_o_head(attn_mod, arch, h, d)
                f = (a[:, None] * vk) @ w  # row k: f_qk = a_qk v_k W_O^h, [S, D]
                o = f.sum(0)
                total += o
                ps = steer_pos[b]
                out["attn_weights"][b, li, h] = sum(float(a[k]) for k in ps)
                out["value_weighted"][b, li, h] = sum(float((a[k] * vk[k]).norm()) for k in ps)
                out["output_value_weighted"][b, li, h] = sum(float(f[k].norm(p=ovw_p)) for k in ps)
                out["distance_based"][b, li, h] = sum(
                    float(torch.clamp(o.norm() - F.pairwise_distance(f[k][None], o[None])[0], min=1e-5)) for k in ps
                )
            # The per-head W_O slicing must rebuild the attention module's own output at the last position.
            if bias is not None:
                total += bias.double()
            assert torch.allclose(total, outs[li][b, q].double(), atol=1e-4, rtol=1e-4)
    return out


def _ours(model, batch, adds=(), ovw="l1", idle="eager"):
    eng = Engine(model, idle=idle)
    n_heads = model.config.num_attention_heads
    w_o = {la: sa.head_output_weights(model, la, n_heads) for la in range(eng.n_layers)}
    return sa.forward_measures(eng, model, batch, w_o, MEASURES, ovw, adds)[0]


def _close(ours, ref, ulps=16):
    """Within `ulps` fp32 ulps of each measure's largest value. Both sides combine fp32 attention weights and
    fp32 value/output projections computed by different kernels (ours vs HF's): their rounding differs by a few
    ulps of the values involved (≈3 measured on GPT-2's Conv1D, 0 elsewhere), whatever SIMD kernels torch picks."""
    eps = np.finfo(np.float32).eps
    for m in MEASURES:
        err = np.abs(ours[m] - ref[m]).max()
        tol = ulps * eps * max(np.abs(ref[m]).max(), 1e-3)
        assert err <= tol, f"{m}: max error {err} > {tol}"


# ---------------------------------------------------------------------------------------------- tiny models


def _tiny_batch(seed=0):
    """Two prompts of 10 and 7 tokens; the second is left-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    return [
        si.Tokenized(torch.randint(3, 128, (10,), generator=g).tolist(), [3, 4, 5]),
        si.Tokenized(torch.randint(3, 128, (7,), generator=g).tolist(), [2, 3]),
    ]


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gpt2", "gpt_neox", "gemma"])
@pytest.mark.parametrize("pos_type", ["entity", "entity_last_to_end"])
def test_measures_equal_explicit_eager_reference_tiny(arch, pos_type):
    """GQA (qwen2 4q/2kv, gemma MQA), Gemma-2 softcap + sliding window, GPT-2 Conv1D W_O, NeoX fused qkv."""
    model = build(arch)
    eager, ours = variant(model, "eager"), variant(model, "eager")  # the engine swaps in its own attention
    items = _tiny_batch()
    batch = sa.make_batch(items, pos_type, pad_id=0)
    hidden = model.config.hidden_size
    sae = saes.random_sae(hidden, 16, hook_name="blocks.0.hook_resid_post", seed=1)
    layer = 1
    adds = sa.steering_adds(sae, layer, sa.Steering(latent=5, coeff=4.0), batch.steer_positions)
    # original
    ref = reference(eager, arch, batch.ids, batch.mask, batch.steer_positions)
    _close(_ours(ours, batch), ref)
    # steered: the reference adds 4·W_dec[5] with its own hook
    vec = 4.0 * sae.W_dec[5]
    ref_s = reference(
        eager,
        arch,
        batch.ids,
        batch.mask,
        batch.steer_positions,
        adds=(layer, {(b, p): vec for b, ps in enumerate(batch.steer_positions) for p in ps}),
    )
    got_s = _ours(ours, batch, adds)
    _close(got_s, ref_s)
    diff = got_s["attn_weights"] - _ours(ours, batch)["attn_weights"]
    assert np.abs(diff[:, :layer]).max() == 0.0  # layers before the steering point cannot move
    assert np.abs(diff[:, layer:]).max() > 1e-4  # and the steered ones do


def test_l2_and_norm_mode_tiny():
    model = build("llama")
    eager, ours = variant(model, "eager"), variant(model, "sdpa")
    batch = sa.make_batch(_tiny_batch(3), "entity_to_end", pad_id=0)
    sae = saes.random_sae(model.config.hidden_size, 8, hook_name="blocks.1.hook_resid_pre", seed=2)
    eng = Engine(ours, idle="eager")
    w_o = {la: sa.head_output_weights(ours, la, 4) for la in range(3)}
    _, resid = sa.forward_measures(eng, ours, batch, w_o, MEASURES, "l2", resid_layer=1)
    adds = sa.steering_adds(sae, 1, sa.Steering(latent=2, coeff="norm", ablate=(3,)), batch.steer_positions, resid)
    got = sa.forward_measures(eng, ours, batch, w_o, MEASURES, "l2", adds)[0]
    d, u = sae.W_dec[2], sae.W_dec[3] / sae.W_dec[3].norm()

    def edit(x):  # ablate latent 3 (projection), then add W_dec[2] × ‖x‖ (norm of the un-edited residual)
        return -(x @ u) * u + d * x.norm()

    vecs = {(b, p): edit for b, ps in enumerate(batch.steer_positions) for p in ps}
    _close(got, reference(eager, "llama", batch.ids, batch.mask, batch.steer_positions, adds=(1, vecs), ovw_p=2))


def test_coefficient_zero_is_exact_and_padding_is_transparent_tiny():
    model = variant(build("qwen2"), "sdpa")
    items = _tiny_batch(5)
    sae = saes.random_sae(model.config.hidden_size, 8, seed=3)
    batch = sa.make_batch(items, "entity", pad_id=0)
    base = _ours(model, batch)
    # a zero vector really added (not skipped) changes nothing, bit for bit
    zero = [ResidualAdd(1, torch.zeros(2, 64), positions=[p], where="pre") for p in range(batch.ids.shape[1])]
    for m, v in _ours(model, batch, zero).items():
        assert np.array_equal(v, base[m])
    assert sa.steering_adds(sae, 1, sa.Steering(latent=1, coeff=0.0), batch.steer_positions) == []
    # batched (left-padded) = one by one
    for i, it in enumerate(items):
        single = _ours(model, sa.make_batch([it], "entity", pad_id=0))
        for m in MEASURES:
            # fp32 rounding differs between batch shapes (thread-dependent kernels): relative tolerance
            np.testing.assert_allclose(single[m][0], base[m][i], rtol=1e-4, atol=1e-5)


def test_generate_is_steered_and_skips_cached_steps_tiny():
    model = variant(build("llama"), "sdpa")
    eng = Engine(model)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    sae = saes.random_sae(64, 8, seed=4)
    plain = model.generate(ids, max_new_tokens=5, do_sample=False)
    adds = sa.steering_adds(sae, 1, sa.Steering(latent=0, coeff=50.0), [[5]])
    with eng.run(residual_adds=adds):
        steered = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert not torch.equal(plain, steered)
    with eng.run(residual_adds=sa.steering_adds(sae, 1, sa.Steering(latent=0, coeff=0.0), [[5]])):
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), plain)


# ---------------------------------------------------------------------------------------------- SAE files


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_saelens_roundtrip_and_encode(tmp_path, arch):
    sae = saes.random_sae(32, 48, hook_name="blocks.3.hook_resid_post", architecture=arch, seed=1, k=5)
    sae.b_enc = torch.randn(48) * 0.1
    sae.b_dec = torch.randn(32) * 0.1
    saes.save_saelens(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    back = saes.load_sae(tmp_path / "sae")
    assert back.architecture == arch and back.hook_point() == (3, "post") and saes.steer_layer((3, "post")) == 4
    x = torch.randn(7, 32)
    acts = back.encode(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if arch == "standard":
        assert torch.allclose(acts, torch.relu(pre))
    elif arch == "jumprelu":
        assert torch.allclose(acts, pre * (pre > sae.threshold) * (pre > 0))
    else:
        assert ((acts > 0).sum(-1) <= 5).all()
    assert back.norm_summary()["unit_norm"]


def test_gemma_scope_npz_and_pre6_config(tmp_path):
    sae = saes.random_sae(16, 24, seed=2)
    d = tmp_path / "layer_7" / "width_16k" / "average_l0_70"
    d.mkdir(parents=True)
    saes.save_npz(sae, d / "params.npz")
    back = saes.load_sae(d)
    assert back.hook_name == "blocks.7.hook_resid_post" and not back.apply_b_dec_to_input
    assert back.architecture == "jumprelu" and torch.equal(back.W_dec, sae.W_dec)
    # an old (pre-6.0) SAELens config: flat keys, TopK via activation_fn_str
    old = tmp_path / "old"
    saes.save_saelens(sae, old)
    (old / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": 16,
                "d_sae": 24,
                "hook_point": "blocks.2.hook_resid_pre",
                "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": 3},
            }
        )
    )
    back = saes.load_sae(old)
    assert back.architecture == "topk" and back.k == 3 and back.hook_point() == (2, "pre")


def test_sae_errors(tmp_path):
    sae = saes.random_sae(16, 24, seed=2)
    with pytest.raises(PlipyError, match="latent 24 is out of range.*24 latents"):
        sae.check_latent(24)
    with pytest.raises(PlipyError, match="d_in=16.*576"):
        saes.check_model(sae, 576)
    with pytest.raises(PlipyError, match="not a residual-stream hook"):
        saes.parse_hook("blocks.3.hook_mlp_out")
    with pytest.raises(PlipyError, match="no such file"):
        saes.load_sae(tmp_path / "nope")
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        with pytest.raises(PlipyError, match=r"plipy\[saelens\]"):
            saes.load_saelens_release("gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_105")


def test_saelens_release_through_the_package_api(monkeypatch):
    """The sae-lens 6.x objects are converted (faked here: tests are offline and the extra is optional)."""
    import sys
    import types

    ref = saes.random_sae(12, 20, seed=3)

    class Cfg:
        @staticmethod
        def architecture():
            return "jumprelu"

        def to_dict(self):
            return {
                "d_in": 12,
                "d_sae": 20,
                "apply_b_dec_to_input": False,
                "metadata": {"hook_name": "blocks.6.hook_resid_post"},
            }

    class FakeSAE(torch.nn.Module):
        cfg = Cfg()

        @classmethod
        def from_pretrained(cls, release, sae_id, device="cpu"):
            m = cls()
            for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
                m.register_buffer(k, getattr(ref, k).clone())
            return m

    monkeypatch.setitem(sys.modules, "sae_lens", types.SimpleNamespace(SAE=FakeSAE))
    got = saes.load_saelens_release("some-release", "layer_6/width_16k")
    assert got.source == "saelens:some-release/layer_6/width_16k" and got.hook_point() == (6, "post")
    assert got.architecture == "jumprelu" and not got.apply_b_dec_to_input
    assert torch.equal(got.W_dec, ref.W_dec) and torch.equal(got.threshold, ref.threshold)


def test_inputs_and_latent_files(tmp_path):
    ps = si.template_prompts([{"entity": "Lionel Messi", "entity_type": "player", "label": "known"}])
    assert [p.prompt for p in ps] == [
        "The player Lionel Messi was born in the city of",
        "The player Lionel Messi was born in the year",
        "The player Lionel Messi has played for",
    ]
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"prompt": "Who is Zork Blarg?", "entity": "Zork Blarg", "entity_type": "player", '
        '"label": "unknown"}\n{"entity": "Paris", "entity_type": "city", "label": "known"}\n'
    )
    items = si.load_prompts(f)
    assert len(items) == 4 and items[1].prompt == "The city Paris is located in"
    lf = tmp_path / "L5.json"
    lf.write_text(
        json.dumps(
            {
                "known": {"0": {"layer": 5, "latent_idx": 3.0, "mean_features_acts": 9.0}},
                "unknown": {"0": {"layer": 5, "latent_idx": 7.0, "mean_features_acts": 2.5}},
            }
        )
    )
    assert si.read_latent_means(lf, layer=5) == {7: 2.5}
    assert si.read_latent_means(lf, layer=5, section="known") == {3: 9.0}
    cf = tmp_path / "scores.json"
    cf.write_text(json.dumps({"L5F1.0": 0.0, "L5F2.0": 0.3, "L6F3.0": 0.0, "L5F4.0": 0}))
    assert si.read_candidates(cf, layer=5) == [1, 4]
    assert si.positions_for([2, 3], 6, "entity_to_end") == [2, 3, 4, 5]
    assert si.positions_for([2, 3], 6, "entity_last_to_end") == [3, 4, 5]
    assert options.parse_layer_heads("L2H1,l0h3", 3, 4) == [(2, 1), (0, 3)]


# ---------------------------------------------------------------------------------------------- SmolLM2


PROMPTS = [
    ("The player Lionel Messi has played for", "Lionel Messi", "player", "known"),
    ("The movie Titanic is directed by", "Titanic", "movie", "known"),
    ("The city Paris is located in", "Paris", "city", "known"),
    ("The song Bohemian Rhapsody is sung by", "Bohemian Rhapsody", "song", "known"),
    ("The player Zorvak Plinth has played for", "Zorvak Plinth", "player", "unknown"),
    ("The movie The Glass Ferret of Umbridge is directed by", "The Glass Ferret of Umbridge", "movie", "unknown"),
    ("The city Velmorath is located in", "Velmorath", "city", "unknown"),
    ("The song Quiet Turnips Falling is sung by", "Quiet Turnips Falling", "song", "unknown"),
]


def _items(n=len(PROMPTS)):
    return [si.EntityPrompt(p, e, t, lab) for p, e, t, lab in PROMPTS[:n]]


@pytest.fixture(scope="module")
def smol_sae(tmp_path_factory):
    """A small random SAE for SmolLM2 (d_in 576) written in SAELens format and read back."""
    d = tmp_path_factory.mktemp("sae") / "smollm-L4"
    sae = saes.random_sae(576, 64, hook_name="blocks.4.hook_resid_post", seed=7)
    saes.save_saelens(sae, d, model_name="smollm2-135m")
    return saes.load_sae(d)


def test_smollm_measures_equal_eager_reference(smollm, smol_sae):
    eager, ours = variant(smollm.model, "eager"), variant(smollm.model, "sdpa")
    toks = [si.tokenize_prompt(p, smollm.tokenizer, index=i) for i, p in enumerate(_items()[3:5])]
    batch = sa.make_batch(toks, "entity", pad_id=smollm.tokenizer.pad_token_id)
    assert batch.mask[0].sum() != batch.mask[1].sum()  # really padded
    ref = reference(eager, "llama", batch.ids, batch.mask, batch.steer_positions)
    _close(_ours(ours, batch), ref)
    adds = sa.steering_adds(smol_sae, 5, sa.Steering(latent=3, coeff=60.0), batch.steer_positions)
    vec = 60.0 * smol_sae.W_dec[3]
    ref_s = reference(
        eager,
        "llama",
        batch.ids,
        batch.mask,
        batch.steer_positions,
        adds=(5, {(b, p): vec for b, ps in enumerate(batch.steer_positions) for p in ps}),
    )
    _close(_ours(ours, batch, adds), ref_s)


def _cfg(**kw):
    """`plipy.sae_attention` keywords: latent 3, coefficient 60, 2 random latents, 4 prompts per batch, seed 0."""
    base = dict(latent=3, coeff=60.0, random=2, batch_size=4, seed=0)
    return {**base, **kw}


def _run(lm, sae, items, cfg, **kw):
    cfg = dict(cfg)
    return plipy.sae_attention(lm, sae, cfg.pop("latent"), items, **cfg, **kw)


def _same_up_to_fp32(a, b):
    """Batched vs one-by-one runs differ only by fp32 rounding of different matmul shapes (~1e-6 relative in the
    residual stream after 30 layers): attention weights to 1e-5 absolute, the norm-scaled measures relative to
    their magnitude."""
    for m in MEASURES:
        tol = 1e-5 if m == "attn_weights" else 1e-4 * np.abs(b[m]).max()
        assert np.abs(a[m] - b[m]).max() <= tol, m


def test_smollm_end_to_end_batched_zero_and_resume(smollm, smol_sae, tmp_path, monkeypatch):
    monkeypatch.setenv("PLIPY_RUNS", str(tmp_path / "runs"))
    items = _items()
    res = _run(smollm, smol_sae, items, _cfg())
    arr = res.arrays
    n, L, H = arr["original"]["attn_weights"].shape
    assert (n, L, H) == (8, 30, 9) and res["layer"] == 5 and len(res["random_latents"]) == 2
    assert res["heads"][0] == "L5H0" and len(res["heads"]) == 25 * 9
    for m in MEASURES:
        d = difference(arr, 3, m)
        assert np.abs(d[:, :5]).max() == 0 and np.abs(d[:, 5:]).max() > 0
        for lab in ("known", "unknown"):
            g = res["measures"][m]["by_label"][lab]
            assert g["K"] == 2 and 0 <= g["k_significant"] <= 2 and g["n_prompts"] == 4
            assert all(0 <= t["p"] <= 1 for t in g["random"])
    assert res["measures"]["attn_weights"]["by_label"]["known"]["expected"] == "decrease"
    assert res["provenance"]["config"]["random_latents"] == res["random_latents"]
    # batched (left-padded, 4 per batch) = one by one
    arr1 = _run(smollm, smol_sae, items[:2], _cfg(batch_size=1, random=0)).arrays
    _same_up_to_fp32({m: arr1["original"][m] for m in MEASURES}, {m: arr["original"][m][:2] for m in MEASURES})
    _same_up_to_fp32(arr1["steered"][3], {m: arr["steered"][3][m][:2] for m in MEASURES})

    # an interrupted run resumes from its finished batches (the runtime's checkpoint) with the same numbers
    class Stop(Exception):
        pass

    def stop_after_first_batch(desc, total):
        done = []

        def step():
            done.append(1)
            if len(done) == 4:
                raise Stop

        return step

    with pytest.raises(Stop):
        _run(smollm, smol_sae, items, _cfg(), progress=stop_after_first_batch)
    again = _run(smollm, smol_sae, items, _cfg())
    assert again.provenance["timing"]["resumed_units"] == 4
    for m in MEASURES:
        assert np.array_equal(again.arrays["steered"][3][m], arr["steered"][3][m])
    assert again.to_dict() | {"provenance": None} == res.to_dict() | {"provenance": None}
    # a different run never takes another run's units
    with pytest.raises(Stop):
        _run(smollm, smol_sae, items, _cfg(), progress=stop_after_first_batch)
    other = _run(smollm, smol_sae, items, _cfg(coeff=10.0))
    assert other.provenance["timing"]["resumed_units"] == 0
    # coefficient 0: difference exactly 0 everywhere
    arr0 = _run(smollm, smol_sae, items[:3], _cfg(coeff=0.0, random=0)).arrays
    for m in MEASURES:
        assert np.array_equal(difference(arr0, 3, m), np.zeros_like(arr0["original"][m]))


def test_smollm_mean_coefficient_and_encoder_direction(smollm, smol_sae):
    items = _items(2)
    num = _run(smollm, smol_sae, items, _cfg(random=0)).arrays
    mean = _run(smollm, smol_sae, items, _cfg(coeff="mean", latent_means={3: 60.0}, random=0)).arrays
    for m in MEASURES:
        assert np.array_equal(num["steered"][3][m], mean["steered"][3][m])
    with pytest.raises(PlipyError, match=r"no mean activation for latent\(s\) \[3\]"):
        _run(smollm, smol_sae, items, _cfg(coeff="mean", random=0))
    other = saes.random_sae(8, 4, seed=1)
    other.W_enc = torch.randn(8, 4)
    (add,) = sa.steering_adds(other, 1, sa.Steering(latent=2, coeff=3.0, direction="encoder"), [[4]])
    assert torch.equal(add.vector[0], 3.0 * other.W_enc[:, 2]) and add.positions == [4] and add.skip_single_token


def test_smollm_bad_input(smollm, smol_sae):
    with pytest.raises(PlipyError, match="latent 64 is out of range"):
        _run(smollm, smol_sae, _items(2), _cfg(latent=64))
    with pytest.raises(PlipyError, match="d_in=32.*576"):
        _run(smollm, saes.random_sae(32, 8, hook_name="blocks.1.hook_resid_post"), _items(2), _cfg())
    bad = [*_items(1), si.EntityPrompt("The city Rome is nice", "Roma", "city", "known")]
    with pytest.raises(PlipyError, match="prompt 1: entity 'Roma' not found"):
        _run(smollm, smol_sae, bad, _cfg())


def _cli(argv):
    from plipy import cli
    from plipy.cli import sae as sae_cli

    if not any(g.name == "sae" for g in cli.app.registered_groups):
        cli.app.add_typer(sae_cli.app, name="sae")
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
        raise SystemExit(0)
    return e.value.code


def test_cli_end_to_end_npz_plots_npy(tmp_path, capsys):
    sae = saes.random_sae(576, 32, seed=9)
    saes.save_npz(sae, tmp_path / "layer_3" / "params.npz")  # Gemma Scope style: hook from the path
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p, "entity": e, "entity_type": t, "label": lab}) + "\n" for p, e, t, lab in PROMPTS
        )
    )
    out = tmp_path / "run.json"
    code = _cli(
        [
            "sae",
            "attention",
            "--sae",
            str(tmp_path / "layer_3" / "params.npz"),
            "--latent",
            "2",
            "--prompts",
            str(prompts),
            "--coeff",
            "norm",
            "--random",
            "2",
            "--batch-size",
            "8",
            "--measures",
            "attn_weights,value_weighted",
            "--heads",
            "L10H0,L12H3,L20H1",
            "--npy",
            "--plot",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert res["layer"] == 4 and res["heads"] == ["L10H0", "L12H3", "L20H1"]
    assert res["provenance"]["config"]["coeff"] == "norm" and res["sae"]["decoder_norms"]["unit_norm"]
    assert set(res["measures"]) == {"attn_weights", "value_weighted"}
    plots = res["provenance"]["files"]["plots"]
    assert len(plots) == 4 and all(Path(f).stat().st_size > 1000 for f in plots)
    d = np.load(tmp_path / "run-attn_weights.npy", allow_pickle=True).item()
    assert set(d) == {"L10H0", "L12H3", "L20H1"} and d["L10H0"].shape == (8,)
    rnd = np.load(tmp_path / "run-attn_weights-random.npy", allow_pickle=True).tolist()
    assert len(rnd) == 2
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "run.parquet")
    assert t.num_rows == 3 * 8 * 30 * 9 and "value_weighted_difference" in t.column_names
    assert not (tmp_path / "run.partial").exists()
    assert "top vs random latents: " in capsys.readouterr().out


def test_cli_bad_input_exit_2(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The city Rome is nice", "entity": "Roma", "label": "known"}) + "\n")
    saes.save_saelens(saes.random_sae(576, 8, hook_name="blocks.1.hook_resid_post"), tmp_path / "s")
    assert _cli(["sae", "attention", "--sae", str(tmp_path / "s"), "--latent", "1", "--prompts", str(prompts)]) == 2
    assert "prompt 0: entity 'Roma' not found" in capsys.readouterr().err
    prompts.write_text(json.dumps({"prompt": "The city Rome is nice", "entity": "Rome"}) + "\n")
    assert _cli(["sae", "attention", "--sae", str(tmp_path / "s"), "--latent", "8", "--prompts", str(prompts)]) == 2
    assert "latent 8 is out of range" in capsys.readouterr().err
