"""Activation, path and attribution patching (`plipy.patch`) against references written here, on tiny random models of
every family plipy supports (GQA and MQA included) and on SmolLM2.

References are independent of plipy's patching code: float64 copies of the models, patched through hooks this file
installs on the modules it names itself (TransformerLens' `hook_z` is the input of the attention output
projection). Tolerances are derived as in tests/test_engine_parity.py (`fp32_bound`: 4× the error the same
reference makes in fp32 + 16 ulps), never picked; finite differences carry their own truncation estimate.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import plipy
from plipy.engine import Engine, HeadPatch, SublayerPatch
from plipy.engine.patching import PatchRunner, Site, SitePatch
from plipy.errors import ParameterError, PlipyError
from tiny_models import ARCHS, REF, build, fp32_bound, register_reference, variant

T = 12
DIFF = 5  # the counterfactual's first differing token
ATTN = {"gpt2": ("transformer.h", "attn", "c_proj"), "gpt_neox": ("gpt_neox.layers", "attention", "dense")}
SANDWICH = {"gemma2", "gemma3"}  # the MLP's contribution is its post-feedforward norm's output


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def blocks(model, arch):
    return _get(model, ATTN.get(arch, ("model.layers",))[0])


def o_proj(model, arch, layer):
    """The attention output projection of a layer, named here (not by plipy's adapter)."""
    _, attn, proj = ATTN.get(arch, ("model.layers", "self_attn", "o_proj"))
    return getattr(getattr(blocks(model, arch)[layer], attn), proj)


def mlp_out(model, arch, layer):
    block = blocks(model, arch)[layer]
    return block.post_feedforward_layernorm if arch in SANDWICH else block.mlp


def n_heads(model):
    return model.config.get_text_config().num_attention_heads


def exact64(model):
    """A float64 copy of `model` computed in float64 throughout: HF's eager attention takes its softmax in float32
    and its RMS norms cast their input to float32 even in a float64 model, so the attention is tests/tiny_models.py's
    reference and each RMS norm its formula in the input's dtype."""
    register_reference()
    m = copy.deepcopy(model).double()
    m.set_attn_implementation(REF)
    for module in m.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _rms_norm(module)
    return m


def _rms_norm(m):
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
    gemma = "gemma" in type(m).__module__  # Gemma scales by (1 + weight)

    def forward(x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y * (1.0 + m.weight) if gemma else m.weight * y

    return forward


def _ids(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 128, (T,), generator=g).tolist()
    corrupt = list(clean)
    corrupt[DIFF] = (corrupt[DIFF] + 7) % 120 + 3
    return clean, corrupt


class Ref:
    """A model patched through hooks of its own: per layer, head outputs `z` (input of the output projection,
    `[1, T, H·d]`) and MLP outputs can be captured or overwritten."""

    def __init__(self, model, arch):
        self.model, self.arch, self.h = model, arch, n_heads(model)

    def run(self, ids, z_writes=(), mlp_writes=(), layer_writes=(), capture=False):
        """Logits at the last position; writes: (layer, head or None, positions, value) on z; (layer, positions,
        value) on MLP outputs; (layer, fn(input, output) -> output) on whole layers."""
        got: dict[str, dict[int, torch.Tensor]] = {"z": {}, "mlp": {}, "in": {}, "out": {}}
        handles = []
        for layer in range(len(blocks(self.model, self.arch))):
            handles.append(
                o_proj(self.model, self.arch, layer).register_forward_pre_hook(self._z(layer, z_writes, got))
            )
            handles.append(
                mlp_out(self.model, self.arch, layer).register_forward_hook(self._mlp(layer, mlp_writes, got))
            )
            handles.append(
                blocks(self.model, self.arch)[layer].register_forward_hook(
                    self._block(layer, layer_writes, got), with_kwargs=True
                )
            )
        try:
            with torch.no_grad():
                out = self.model(torch.tensor([ids]))
        finally:
            for h in handles:
                h.remove()
        return (out.logits[0, -1], got) if capture else out.logits[0, -1]

    def _z(self, layer, writes, got):
        def hook(module, args):
            x = args[0].clone()
            d = x.shape[-1] // self.h
            for lay, head, pos, value in writes:
                if lay == layer:
                    cols = slice(None) if head is None else slice(head * d, (head + 1) * d)
                    x[0, pos, cols] = value.to(x.dtype)
            got["z"][layer] = x.clone()
            return (x,)

        return hook

    def _mlp(self, layer, writes, got):
        def hook(module, args, output):
            out = output.clone()
            for lay, pos, value in writes:
                if lay == layer:
                    out[0, pos] = value.to(out.dtype)
            got["mlp"][layer] = out.clone()
            return out

        return hook

    def _block(self, layer, writes, got):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            got["in"][layer], got["out"][layer] = hidden.clone(), out.clone()
            for lay, fn in writes:
                if lay == layer:
                    out = fn(hidden, out)
                    return (out, *output[1:]) if isinstance(output, tuple) else out
            return None

        return hook


@pytest.fixture(scope="module", params=ARCHS)
def family(request, one_thread):
    """A tiny model of one family, its fp32 and float64 reference copies (made before the engine touches it),
    the runner's clean and corrupt runs, and the references' own runs."""
    arch = request.param
    model = build(arch, "eager")
    r32, r64 = Ref(variant(model, "eager"), arch), Ref(exact64(model), arch)
    clean, corrupt = _ids()
    runner = PatchRunner(model, max_batch=8)
    naive = PatchRunner(model, path="naive")
    c, k = runner.baselines([clean, corrupt])
    refs = {}
    for name, ref in (("32", r32), ("64", r64)):
        refs[name] = {key: ref.run(ids, capture=True)[1] for key, ids in (("clean", clean), ("corrupt", corrupt))}
    return SimpleNamespace(
        arch=arch,
        model=model,
        r32=r32,
        r64=r64,
        ids={"clean": clean, "corrupt": corrupt},
        runner=runner,
        naive=naive,
        runs={"clean": c, "corrupt": k},
        refs=refs,
    )


def _within(got, ref32, ref64, what):
    bound = fp32_bound(ref32, ref64)
    err = (got.double() - ref64).abs().max().item()
    assert err <= bound, f"{what}: {err:.3g} > bound {bound:.3g}"


def test_self_patch_is_the_identity_bit_for_bit(family):
    """Writing every head's, block's and MLP's own value over itself: the same bits as the unpatched forward."""
    model, run = family.model, family.runs["clean"]
    engine = Engine(model)
    n, every = len(run.z), list(range(T))
    patches: list[HeadPatch | SublayerPatch] = [
        HeadPatch(layer, list(range(run.z[layer].shape[1])), every, run.z[layer]) for layer in range(n)
    ]
    patches += [SublayerPatch(layer, s, every, getattr(run, s)[layer]) for layer in range(n) for s in ("attn", "mlp")]
    ids = torch.tensor([family.ids["clean"]])
    with torch.no_grad(), engine.run():
        plain = model(ids).logits
    with torch.no_grad(), engine.run(patches=patches):
        patched = model(ids).logits
    assert torch.equal(plain, patched), family.arch
    # the runner sees that nothing changes and returns the target's own logits: KL exactly 0
    sites = [Site("head", layer, h) for layer in range(n) for h in range(run.z[layer].shape[1])]
    out = family.runner.run(run, [[SitePatch(s, torch.arange(T), run.value(s))] for s in sites])
    assert all(o is run.logits for o in out)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_one_head_equals_float64_reference(family, direction):
    """Every head patched alone at every position, fast and naive runner, against the float64 model whose head
    output is overwritten by a hook of this file."""
    target, source = ("corrupt", "clean") if direction == "denoising" else ("clean", "corrupt")
    run_t, run_s = family.runs[target], family.runs[source]
    n_layers, h = len(run_t.z), n_heads(family.model)
    d = run_t.z[0].shape[-1]
    heads = [(layer, head) for layer in range(n_layers) for head in range(h)]
    sites = [Site("head", layer, head) for layer, head in heads]
    conds = [[SitePatch(s, torch.arange(T), run_s.value(s))] for s in sites]
    fast = family.runner.run(run_t, conds)
    naive = family.naive.run(family.naive.baselines([family.ids[target]])[0], conds)
    for (layer, head), s, f, nv in zip(heads, sites, fast, naive, strict=True):
        refs = {}
        for name, ref in (("32", family.r32), ("64", family.r64)):
            src = family.refs[name][source]["z"][layer][0, :, head * d : (head + 1) * d]
            refs[name] = ref.run(family.ids[target], z_writes=[(layer, head, slice(None), src)])
        _within(f, refs["32"], refs["64"], f"{family.arch} {s.label} fast")
        _within(nv, refs["32"], refs["64"], f"{family.arch} {s.label} naive")


def test_layer_heads_and_mlp_equal_replacing_the_layer_output(family):
    """All heads of layer L and its MLP patched from the source = layer L adding the source's output − input."""
    run_t, run_s = family.runs["corrupt"], family.runs["clean"]
    h = n_heads(family.model)
    for layer in range(len(run_t.z)):
        heads = [
            SitePatch(Site("head", layer, j), torch.arange(T), run_s.value(Site("head", layer, j))) for j in range(h)
        ]
        mlp = SitePatch(Site("mlp", layer), torch.arange(T), run_s.mlp[layer])
        attn = SitePatch(Site("attn", layer), torch.arange(T), run_s.attn[layer])
        by_heads, by_blocks = family.runner.run(run_t, [[*heads, mlp], [attn, mlp]])
        refs = {}
        for name, ref in (("32", family.r32), ("64", family.r64)):
            src_in, src_out = family.refs[name]["clean"]["in"][layer], family.refs[name]["clean"]["out"][layer]

            def write(hidden, out, src_in=src_in, src_out=src_out):
                return hidden + (src_out - src_in).to(hidden.dtype)

            refs[name] = ref.run(family.ids["corrupt"], layer_writes=[(layer, write)])
        _within(by_heads, refs["32"], refs["64"], f"{family.arch} layer {layer} heads + mlp")
        _within(by_blocks, refs["32"], refs["64"], f"{family.arch} layer {layer} attn + mlp")


def test_suffix_runs_reuse_the_shared_prefix(family):
    """A run computed from the first token it differs in, on the other run's K/V (what attribution does): the
    prefix's activations are the other run's bits, the rest and the logits equal the float64 model's within fp32
    rounding, and a traced run from a prefix takes gradients from that token on only."""
    runner, corrupt = family.runner, family.runs["corrupt"]
    if runner.path != "fast":
        pytest.skip(f"{family.arch}: no KV-cache fast path ({runner.reasons})")
    clean = runner.suffix_run(family.ids["clean"], prefix=corrupt)
    for layer in range(len(clean.z)):
        assert torch.equal(clean.z[layer][:DIFF], corrupt.z[layer][:DIFF])
        assert torch.equal(clean.mlp[layer][:DIFF], corrupt.mlp[layer][:DIFF])
        h = clean.z[layer].shape[1]
        for name in ("z", "mlp"):
            got = clean.z[layer].reshape(T, -1) if name == "z" else clean.mlp[layer]
            want32, want64 = (family.refs[k]["clean"][name][layer][0] for k in ("32", "64"))
            _within(got, want32, want64, f"{family.arch} L{layer} {name} ({h} heads)")
    _within(clean.logits, family.r32.run(family.ids["clean"]), family.r64.run(family.ids["clean"]), "logits")
    traced = runner.traced(family.ids["clean"], prefix=corrupt)
    assert traced.start == DIFF
    grads = runner.gradients(traced, traced.logits.logsumexp(-1))
    assert grads["z"][0].shape[0] == grads["mlp"][-1].shape[0] == T - DIFF


def test_path_patching_fast_equals_naive(family):
    """The staircase with twins (fast) against one full forward per sender (naive), for q, k and v inputs."""
    run_t, run_s = family.runs["clean"], family.runs["corrupt"]
    n_layers, h = len(run_t.z), n_heads(family.model)
    senders = [Site("head", layer, j) for layer in range(n_layers - 1) for j in range(h)]
    receivers = {n_layers - 1: [0, h - 1]}
    deltas = family.runner.sender_delta(run_t, run_s, senders, torch.arange(T))
    naive_t = family.naive.baselines([family.ids["clean"]])[0]
    for inputs in (["q"], ["k"], ["v"], ["q", "k", "v"]):
        fast = torch.stack(family.runner.run_paths(run_t, receivers, inputs, senders, deltas))
        naive = torch.stack(family.naive.run_paths(naive_t, receivers, inputs, senders, deltas))
        ref64 = _path_reference64(family, senders, receivers, inputs)
        _within(fast, naive, ref64, f"{family.arch} {inputs} fast")


def _path_reference64(family, senders, receivers, inputs):
    """The same path patching in float64 (the naive runner on a float64 copy): the exact answer fp32 runs are
    measured against."""
    m64 = copy.deepcopy(variant(build(family.arch, "eager"), "eager")).double()
    runner = PatchRunner(m64, path="naive")
    t, s = runner.baselines([family.ids["clean"], family.ids["corrupt"]])
    deltas = runner.sender_delta(t, s, senders, torch.arange(T))
    return torch.stack(runner.run_paths(t, receivers, inputs, senders, deltas)).double()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("inputs", [["q"], ["k"], ["v"]])
def test_path_patching_equals_a_from_scratch_reference(arch, inputs, one_thread):
    """Llama-style attention written out in float64: the receivers' query, key or value computed from the target's
    layer input plus the sender's direct effect o_proj(z with the sender's head from the source) − o_proj(z); the
    receiver layer's output replaced by it, the layers after it run as usual. GQA: one query head of a key/value
    group reads the modified keys, its siblings do not."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build(arch, "eager")
    m64 = exact64(model)
    clean, corrupt = _ids()
    runner = PatchRunner(model)
    c, k = runner.baselines([clean, corrupt])
    n_layers, h = len(c.z), n_heads(model)
    sh = 1  # the sender: head 1 of layer 0
    sender, receiver = Site("head", 0, sh), (n_layers - 1, 2)
    got = runner.run_paths(
        c, {receiver[0]: [receiver[1]]}, inputs, [sender], runner.sender_delta(c, k, [sender], torch.arange(T))
    )[0]

    ref = Ref(m64, arch)
    _, rc = ref.run(clean, capture=True)
    _, rk = ref.run(corrupt, capture=True)
    d = m64.config.head_dim if getattr(m64.config, "head_dim", None) else m64.config.hidden_size // h
    attn0 = m64.model.layers[0].self_attn
    z = rc["z"][0].clone()
    z[0, :, sh * d : (sh + 1) * d] = rk["z"][0][0, :, sh * d : (sh + 1) * d]
    delta = attn0.o_proj(z) - attn0.o_proj(rc["z"][0])
    layer = m64.model.layers[receiver[0]]

    def manual(hidden, out):
        a = layer.self_attn
        pos = torch.arange(T)[None]
        cos, sin = m64.model.rotary_emb(hidden, pos)

        def qkv(x):
            x = layer.input_layernorm(x)
            q = a.q_proj(x).view(1, T, -1, d).transpose(1, 2)
            kk = a.k_proj(x).view(1, T, -1, d).transpose(1, 2)
            v = a.v_proj(x).view(1, T, -1, d).transpose(1, 2)
            q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
            g = q.shape[1] // kk.shape[1]
            return q, kk.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

        real, twin = qkv(hidden), qkv(hidden + delta)
        q, kk, v = (t.clone() for t in real)
        for name, t, tw in zip("qkv", (q, kk, v), twin, strict=True):
            if name in inputs:
                t[:, receiver[1]] = tw[:, receiver[1]]
        w = (q @ kk.transpose(2, 3)) * a.scaling
        w = w.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
        o = (torch.softmax(w, -1) @ v).transpose(1, 2).reshape(1, T, -1)
        x = hidden + a.o_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    ref64 = ref.run(clean, layer_writes=[(receiver[0], manual)]).double()
    # the same construction in fp32 gives the bound
    ref32 = _fp32_manual_bound(model, arch, clean, corrupt, sender, receiver, inputs)
    assert (got.double() - ref64).abs().max().item() <= fp32_bound(ref32, ref64)
    assert (got.double() - c.logits.double()).abs().max().item() > fp32_bound(ref32, ref64)  # it did something


def _fp32_manual_bound(model, arch, clean, corrupt, sender, receiver, inputs):
    """The naive runner's fp32 answer to the same path patching (the fp32 error the bound is scaled by)."""
    runner = PatchRunner(variant(model, "eager"), path="naive")
    c, k = runner.baselines([clean, corrupt])
    return runner.run_paths(
        c, {receiver[0]: [receiver[1]]}, inputs, [sender], runner.sender_delta(c, k, [sender], torch.arange(T))
    )[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_patching_equals_one_by_one(arch, one_thread):
    """Two sequences of different lengths in one left-padded batch, each item patching a different (layer, head) at
    its own positions (shifted by its padding): each equals its own unpadded patched run within fp32 rounding — the
    nnsight #672 failure (patches landing on padding) cannot happen."""
    model = build(arch, "eager")
    r32, r64 = Ref(variant(model, "eager"), arch), Ref(exact64(model), arch)
    engine = Engine(model)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 128, (T,), generator=g).tolist(), torch.randint(3, 128, (T - 4,), generator=g).tolist()]
    h, d = n_heads(model), None
    writes = [(1, 1, [2, 7]), (0, h - 1, [0, 3, 5])]  # (layer, head, positions) per item
    from plipy.engine.batch import pad_left

    padded = pad_left(seqs, 0)
    patches = []
    for b, (layer, head, pos) in enumerate(writes):
        _, got = r32.run(seqs[b], capture=True)
        d = got["z"][layer].shape[-1] // h
        value = torch.full((len(pos), 1, d), 0.5) + torch.arange(len(pos))[:, None, None] * 0.25
        patches.append(HeadPatch(layer, [head], [p + padded.pads[b] for p in pos], value, batch=b))
    with torch.no_grad(), engine.run(patches=patches):
        batched = model(padded.ids, **padded.forward_kwargs()).logits[:, -1]
    for b, (layer, head, pos) in enumerate(writes):
        value = patches[b].value[:, 0]
        refs = [r.run(seqs[b], z_writes=[(layer, head, pos, value)]) for r in (r32, r64)]
        with torch.no_grad(), engine.run(patches=[HeadPatch(layer, [head], pos, value[:, None])]):
            alone = model(torch.tensor([seqs[b]])).logits[0, -1]
        _within(batched[b], refs[0], refs[1].double(), f"{arch} item {b} batched")
        _within(alone, refs[0], refs[1].double(), f"{arch} item {b} alone")


# -- the experiments -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from plipy.models import load_tokenizer

    return load_tokenizer("smollm2-135m")[0]


def _lm(tok, dtype=torch.float32, arch="llama"):
    from plipy.models import LoadedModel

    model = build(arch, "eager", vocab_size=len(tok)).to(dtype)
    if dtype == torch.float64:  # float64 throughout (HF's RMS norms compute in float32): see exact64
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = _rms_norm(module)
    return LoadedModel(model=model, tokenizer=tok, spec=f"tiny-{arch}", name=f"tiny-{arch}")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from conftest import corpus_subset

    return corpus_subset(tmp_path_factory.mktemp("corpus"), {"python_doctest": 3, "rust_test": 3})


def test_counterfactual_rule_keeps_tokens_aligned(tok):
    """Every sample of the bundled corpus gets a marker-neutral twin: same token count, every token outside the
    marker's unchanged, the first difference at the marker's first token."""
    from plipy.corpus import load_corpus, token_positions
    from plipy.experiments.counterfactual import marker_twin, tokens

    for s in load_corpus().samples():
        sp = token_positions(s, tok)
        twin = marker_twin(sp, tok)
        assert len(twin.ids) == sp.seq_len
        assert list(twin.ids) == tokens(twin.code, tok, False)
        assert s.marker_pattern not in twin.code[s.marker_char_pos : s.marker_char_pos + len(s.marker_pattern)]
        changed = [i for i, (a, b) in enumerate(zip(sp.input_ids, twin.ids, strict=True)) if a != b]
        spans = [
            i
            for i, (a, b) in enumerate(sp.offsets)
            if a < s.marker_char_pos + len(s.marker_pattern) and b > s.marker_char_pos
        ]
        assert changed and set(changed) <= set(spans) and twin.first_diff == changed[0]


def test_pairs_of_another_length_are_refused_by_name(tok, small_corpus, tmp_path):
    lm = _lm(tok)
    sample = small_corpus.samples()[0]
    pairs = {s.id: s.code for s in small_corpus.samples()}
    pairs[sample.id] = sample.code + "\n# one more line"
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps(pairs))
    with pytest.raises(PlipyError, match=f"sample '{sample.id}': its counterfactual has \\d+ tokens"):
        plipy.patch.heads(lm, small_corpus, pairs=str(f), progress=False)
    del pairs[sample.id]
    f.write_text(json.dumps({"pairs": pairs}))
    with pytest.raises(PlipyError, match="has no counterfactual in the pairs given"):
        plipy.patch.heads(lm, small_corpus, pairs=str(f), progress=False)


def test_heads_experiment(tok, small_corpus, one_thread):
    """Every mode and position class: the document's shape, normalisation against the raw metric, the identity
    null exactly 0, the fast path equal to the naive one, batch sizes equal within fp32 rounding."""
    lm = _lm(tok)
    kw: dict[str, Any] = dict(
        positions="all,marker,targets,last", ablations="zero,mean,resample", progress=False, fresh=True
    )
    r = plipy.patch.heads(lm, small_corpus, batch_size=4, **kw)
    n_sites = 3 * 4 + 2 * 3
    assert len(r["sites"]) == n_sites and len(r["conditions"]) == 4 * 5
    assert all(n["exact"] and n["max_abs_metric_change"] == 0 for n in r["identity"])
    recs = {s["id"]: s for s in r["samples"]}
    for c in r["conditions"]:
        assert len(c["mean"]) == len(c["ci"]) == n_sites
        for sid, raw, norm in zip(c["samples"]["ids"], c["samples"]["metric"], c["samples"]["normalised"], strict=True):
            m_clean, m_corrupt = recs[sid]["clean_metric"], recs[sid]["corrupt_metric"]
            for x, y in zip(raw, norm, strict=True):
                want = (
                    (x - m_corrupt) / (m_clean - m_corrupt)
                    if c["direction"] == "denoising" and not c["ablation"]
                    else (m_clean - x) / (m_clean - m_corrupt)
                )
                assert y == pytest.approx(want, rel=1e-12, abs=1e-12)
        if c["position"] == "targets" and not c["ablation"]:
            # every target lies before the marker, where the twin equals the sample: patching is the identity
            assert all(v == 0 for row in c["samples"]["normalised"] for v in row)
    assert len(r.rows()) == sum(len(c["samples"]["ids"]) * n_sites for c in r["conditions"])
    # batch sizes and paths agree within fp32 rounding: each within 4× the naive path's own error of float64
    one = plipy.patch.heads(lm, small_corpus, batch_size=1, **kw)
    naive = plipy.patch.heads(lm, small_corpus, batch_size=1, runner="naive", **kw)
    exact = plipy.patch.heads(_lm(tok, torch.float64), small_corpus, **kw)
    for a, b, cn, c64 in zip(r["conditions"], one["conditions"], naive["conditions"], exact["conditions"], strict=True):
        x64 = torch.tensor(c64["samples"]["metric"], dtype=torch.float64)
        bound = fp32_bound(torch.tensor(cn["samples"]["metric"]), x64)
        for other in (a, b):
            err = (torch.tensor(other["samples"]["metric"], dtype=torch.float64) - x64).abs().max().item()
            assert err <= bound, (a["position"], a["direction"], a["ablation"], err, bound)


def test_attribution_equals_finite_differences(tok, small_corpus, one_thread):
    """On a float64 tiny model, every estimate equals the derivative of the exactly patched metric along the
    patch, d/dε m(target + ε (source − target)) at 0, by central differences through hooks of this file
    (Richardson's difference of two step sizes bounds their truncation error)."""
    lm = _lm(tok, torch.float64)
    ref = Ref(exact64(lm.model), "llama")
    for metric in ("kl", "logit-diff"):
        r = plipy.patch.heads(
            lm,
            small_corpus,
            method="attribution",
            top=3,
            metric=metric,
            groups="python_doctest",
            progress=False,
            fresh=True,
        )
        est = [c for c in r["conditions"] if c.get("estimate") == "attribution"]
        assert {c["direction"] for c in est} == {"denoising", "noising"}
        for c in est:
            for sid, raw in list(zip(c["samples"]["ids"], c["samples"]["metric"], strict=True))[:2]:
                rec = next(s for s in r["samples"] if s["id"] == sid)
                for j in (0, 5, 13, 15):  # two heads, an attention block, an MLP
                    fd, tol = _directional_derivative(
                        ref, lm, small_corpus.sample(sid), rec, r["sites"][j], c["direction"], metric
                    )
                    assert abs(raw[j] - fd) <= tol, (
                        metric,
                        c["direction"],
                        sid,
                        r["sites"][j]["label"],
                        raw[j],
                        fd,
                        tol,
                    )
        check = r["attribution"]["checks"]
        assert len(check) == 2 and all(len(ch["sites"]) == 3 for ch in check)


def _directional_derivative(ref, lm, sample, rec, site, direction, metric_name):
    """(f'(0) by Richardson-extrapolated central differences, its error bound) for f(ε) = m(target run with the
    site's activation moved ε of the way to the source run's at every position)."""
    from plipy.corpus import token_positions
    from plipy.experiments.counterfactual import marker_twin
    from plipy.experiments.patching import Metric

    sp = token_positions(sample, lm.tokenizer)
    clean, corrupt = list(sp.input_ids), list(marker_twin(sp, lm.tokenizer).ids)
    target, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    lc, got_c = ref.run(clean, capture=True)
    lk, _ = ref.run(corrupt, capture=True)
    _, got_t = ref.run(target, capture=True)
    _, got_s = ref.run(source, capture=True)
    metric = Metric(metric_name)
    answer, wrong = metric.tokens(lc, lk)
    h = n_heads(ref.model)

    def f(eps):
        if site["kind"] == "head":
            d = got_t["z"][0].shape[-1] // h
            cols = slice(site["head"] * d, (site["head"] + 1) * d)
            t, s = got_t["z"][site["layer"]][0, :, cols], got_s["z"][site["layer"]][0, :, cols]
            logits = ref.run(target, z_writes=[(site["layer"], site["head"], slice(None), t + eps * (s - t))])
        elif site["kind"] == "mlp":
            t, s = got_t["mlp"][site["layer"]][0], got_s["mlp"][site["layer"]][0]
            logits = ref.run(target, mlp_writes=[(site["layer"], slice(None), t + eps * (s - t))])
        else:  # the attention block's output: all its heads' z moved together is the same straight line
            t, s = got_t["z"][site["layer"]][0], got_s["z"][site["layer"]][0]
            logits = ref.run(target, z_writes=[(site["layer"], None, slice(None), t + eps * (s - t))])
        return float(metric.value(logits, lc, answer, wrong))

    step = 1e-3
    d1 = (f(step) - f(-step)) / (2 * step)
    d2 = (f(step / 2) - f(-step / 2)) / step
    best = d2 + (d2 - d1) / 3
    scale = max(abs(f(0.0)), 1.0)
    return best, abs(d2 - d1) + 64 * torch.finfo(torch.float64).eps * scale / step


def test_paths_experiment_and_refusals(tok, small_corpus, one_thread):
    lm = _lm(tok)
    r = plipy.patch.paths(
        lm, small_corpus, receivers="2.1,2.3", inputs="q,kv", directions="noising,denoising", progress=False, fresh=True
    )
    assert r["method"] == "path" and len(r["sites"]) == 2 * 4 and len(r["conditions"]) == 4
    assert [x["label"] for x in r["receivers"]] == ["L2.H1", "L2.H3"]
    assert all(n["exact"] for n in r["identity"])
    bads: list[tuple[dict[str, Any], str]] = [
        (dict(receivers="9.0"), "receivers"),
        (dict(receivers="2.1", inputs="qx"), "inputs"),
        (dict(receivers="0.1"), "layers"),
        (dict(receivers="2.1", positions="middle"), "positions"),
    ]
    for bad, param in bads:
        with pytest.raises(ParameterError) as e:
            plipy.patch.paths(lm, small_corpus, progress=False, **bad)
        assert e.value.param == param


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(positions="all,nowhere"), "positions"),
        (dict(directions="both"), "directions"),
        (dict(ablations="gaussian"), "ablations"),
        (dict(metric="kl", answer="x"), "answer"),
        (dict(metric="prob", wrong="x"), "wrong"),
        (dict(method="attribution", ablations="zero"), "ablations"),
        (dict(directions="none"), "directions"),
        (dict(sites="neurons"), "sites"),
        (dict(top=0), "top"),
        (dict(metric="prob", answer="def add"), "answer"),
    ],
)
def test_heads_refusals(tok, small_corpus, kwargs, param):
    with pytest.raises(ParameterError) as e:
        plipy.patch.heads(_lm(tok), small_corpus, progress=False, **kwargs)
    assert e.value.param == param


def test_cli_views_and_round_trip(tok, small_corpus, tmp_path, capsys, monkeypatch):
    """`plipy patch heads` on a model folder: JSON, table, plots and HTML; the saved result reads back equal and its
    HTML holds a per-sample panel for a heatmap cell."""
    from conftest import cli_exit_code, tiny_llama_dir
    from plipy.api import load_result

    d = tiny_llama_dir(tmp_path / "tiny", tok)
    path = tmp_path / "small.json"
    path.write_text(small_corpus.path.read_text())
    out = tmp_path / "p.json"
    code = cli_exit_code(
        [
            "patch",
            "heads",
            "--model",
            str(d),
            "--corpus",
            str(path),
            "--positions",
            "all,last",
            "--ablations",
            "zero",
            "--out",
            str(out),
            "--plot",
            "--html",
            "--table-format",
            "csv",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "denoising @ all" in text and "identity null (denoising)" in text and "unchanged exactly" in text
    r = load_result(out)
    assert r.kind == "patch" and (tmp_path / "p.csv").is_file() and (tmp_path / "p-heatmap.png").is_file()
    page = (tmp_path / "p.html").read_text()
    assert "Per-sample values" in page and "L0.H0" in page
    code = cli_exit_code(["patch", "heads", "--model", str(d), "--corpus", str(path), "--positions", "nowhere"])
    assert code == 2 and "--positions: must be one of" in capsys.readouterr().err


def test_smollm_head_patch_equals_float64_reference(smollm):
    """SmolLM2: one head of a middle layer patched from the clean run into the corrupt run of a corpus sample equals
    the float64 model patched by this file's hook."""
    from plipy.corpus import load_corpus, token_positions
    from plipy.experiments.counterfactual import marker_twin

    sp = token_positions(load_corpus().samples()[0], smollm.tokenizer)
    clean, corrupt = list(sp.input_ids), list(marker_twin(sp, smollm.tokenizer).ids)
    r32 = Ref(variant(smollm.model, "eager"), "llama")
    r64 = Ref(exact64(r32.model), "llama")
    runner = PatchRunner(smollm.model)
    c, k = runner.baselines([clean, corrupt])
    site = Site("head", 14, 3)
    got = runner.run(k, [[SitePatch(site, torch.arange(len(clean)), c.value(site))]])[0]
    refs = []
    for ref in (r32, r64):
        _, rc = ref.run(clean, capture=True)
        d = rc["z"][14].shape[-1] // 9
        refs.append(ref.run(corrupt, z_writes=[(14, 3, slice(None), rc["z"][14][0, :, 3 * d : 4 * d])]))
    _within(got, refs[0], refs[1].double(), "smollm L14.H3")
    assert (got - k.logits).abs().max() > 0  # the patch changed something


def test_smollm_identity_null_is_exact(smollm):
    """SmolLM2 over the 10 python_doctest samples: each direction's target run patched with its own values at every
    site gives the target's own KL bit for bit (the metric of a `[1, V]` row is never summed as part of a stack)."""
    r = plipy.patch.heads(
        smollm, groups="python_doctest", layers="14", sites="heads", progress=False, resume=False, batch_size=4
    )
    assert [n["direction"] for n in r["identity"]] == ["denoising", "noising"]
    for n in r["identity"]:
        assert n["n"] == 10 and n["exact"] and n["max_abs_metric_change"] == 0, n
    assert all(s["identity"]["noising"] == 0 for s in r["samples"])  # KL(P_clean ‖ P_clean)
