"""SAELens interop both ways, against the real `sae-lens` package (6.x): folders SAELens writes load into plipy with
bit-identical encode/decode, and folders plipy writes (by hand or from `plipy sae train`) load into SAELens with the
hook and model name in `cfg.metadata`.

Bit-identity is expected: both sides run the same float32 ops in the same order on the same tensors
(`(x − b_dec) @ W_enc + b_enc`, ReLU / JumpReLU mask / TopK + scatter, `acts @ W_dec + b_dec`)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

sae_lens = pytest.importorskip("sae_lens", minversion="6.0", reason="needs sae-lens>=6 (pip install 'plipy[test]')")

from sae_lens import (  # noqa: E402
    SAE as SLSAE,
)
from sae_lens import (  # noqa: E402
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from plipy import sae as saes  # noqa: E402
from plipy.errors import PlipyError  # noqa: E402
from plipy.models import LoadedModel  # noqa: E402
from plipy.workflows import sae_train as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)

ARCHS = ("standard", "topk", "jumprelu")
SL_CLASSES = {
    "standard": (StandardSAE, StandardSAEConfig),
    "topk": (TopKSAE, TopKSAEConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
}
HOOK = "blocks.9.hook_resid_post"
EPS32 = torch.finfo(torch.float32).eps


def _weights(d_in: int, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    """Random, non-trivial weights: decoder rows of unequal norm, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g) * (0.5 + torch.rand(d_sae, 1, generator=g))
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "W_dec": W_dec,
        "b_enc": torch.randn(d_sae, generator=g) * 0.3,
        "b_dec": torch.randn(d_in, generator=g) * 0.5,
    }


def _inputs(d_in: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 9, d_in, generator=torch.Generator().manual_seed(seed + 100)) * 2  # [batch, seq, d_in]


def _thresholds(w: dict[str, torch.Tensor], x: torch.Tensor, apply_b_dec: bool, seed: int) -> torch.Tensor:
    """Per-latent thresholds between the 30th and 90th percentile of its positive pre-activations on `x`: some
    positive pre-activations are cut, some pass."""
    xin = x - w["b_dec"] if apply_b_dec else x
    pre = (xin @ w["W_enc"] + w["b_enc"]).reshape(-1, w["W_enc"].shape[1])
    q = 0.3 + 0.6 * torch.rand(pre.shape[1], generator=torch.Generator().manual_seed(seed + 200))
    return torch.stack([torch.quantile(pre[:, i].clamp_min(0), q[i]) for i in range(pre.shape[1])]) + 1e-3


def _saelens_sae(arch: str, d_in: int, d_sae: int, seed: int, apply_b_dec: bool = True, **cfg_kw):
    """An SAELens inference SAE built with its own config classes, with random weights."""
    cls, cfg_cls = SL_CLASSES[arch]
    extra = {"k": max(2, d_sae // 8)} if arch == "topk" else {}
    cfg = cfg_cls(
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec_to_input=apply_b_dec,
        metadata=SAEMetadata(hook_name=HOOK, model_name="smollm2-135m"),
        **extra,
        **cfg_kw,
    )
    sl = cls(cfg)
    w = _weights(d_in, d_sae, seed)
    if arch == "jumprelu":
        w["threshold"] = _thresholds(w, _inputs(d_in, seed), apply_b_dec, seed)
    with torch.no_grad():
        for name, t in w.items():
            getattr(sl, name).copy_(t)
    return sl


def _plipy_sae(arch: str, d_in: int, d_sae: int, seed: int) -> saes.SAE:
    w = _weights(d_in, d_sae, seed)
    thr = _thresholds(w, _inputs(d_in, seed), True, seed) if arch == "jumprelu" else None
    return saes.SAE(
        **w, architecture=arch, threshold=thr, k=max(2, d_sae // 8) if arch == "topk" else None, hook_name=HOOK
    )


def _assert_jumprelu_cuts(sae: saes.SAE, x: torch.Tensor) -> None:
    """The thresholds matter: some latents with positive pre-activation are cut, some fire."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc if sae.apply_b_dec_to_input else x @ sae.W_enc + sae.b_enc
    acts = sae.encode(x)
    assert ((pre > 0) & (acts == 0)).any() and (acts > 0).any()


def _assert_same_encode_decode(ours: saes.SAE, theirs, x: torch.Tensor, seed: int) -> None:
    with torch.no_grad():
        a_theirs = theirs.encode(x)
        a_ours = ours.encode(x)
        assert torch.equal(a_ours, a_theirs)
        assert (a_ours == 0).any() and (a_ours > 0).any()
        if ours.architecture == "topk":
            assert ((a_ours != 0).sum(-1) <= ours.k).all()
        # decode: of the SAE's own latents and of arbitrary non-negative sparse activations
        g = torch.Generator().manual_seed(seed + 300)
        a_rand = torch.rand(5, ours.d_sae, generator=g) * (torch.rand(5, ours.d_sae, generator=g) < 0.2)
        for a in (a_theirs, a_rand):
            assert torch.equal(ours.decode(a), theirs.decode(a))


# ---------------------------------------------------------------------------------------------- SAELens → plipy


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_saved_folder_loads_bit_identical(tmp_path, arch, apply_b_dec):
    d_in, d_sae, seed = 24, 96, ARCHS.index(arch) + 10 * apply_b_dec
    sl = _saelens_sae(arch, d_in, d_sae, seed, apply_b_dec)
    sl.save_model(tmp_path / "sae")  # SAELens' own writer
    keys = set(json.loads((tmp_path / "sae" / "cfg.json").read_text()))
    assert {"metadata", "architecture"} <= keys
    ours = saes.load_sae(tmp_path / "sae")
    assert ours.architecture == arch and ours.hook_name == HOOK and ours.apply_b_dec_to_input is apply_b_dec
    assert ours.k == (sl.cfg.k if arch == "topk" else None)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if arch == "jumprelu" else ()):
        assert torch.equal(getattr(ours, name), getattr(sl, name).detach())
    x = _inputs(d_in, seed)
    if arch == "jumprelu":
        _assert_jumprelu_cuts(ours, x)
    _assert_same_encode_decode(ours, sl, x, seed)


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path):
    """`rescale_acts_by_decoder_norm=True` (TopK ranks pre·‖W_dec[i]‖ and decodes acts/‖W_dec[i]‖) is folded into
    the weights at load. Same latents, but not bit-identical: `(x·W + b)·n` and `x·(W·n) + b·n` round differently.
    Both sides are within γ·(|x|·|W|·n + |b|·n) of the exact value, γ = (d + 2)·eps32 (standard dot-product error
    bound), so they differ by at most twice that; the decoder likewise with |a|·|W_dec|/n."""
    d_in, d_sae, seed = 32, 64, 7
    sl = _saelens_sae("topk", d_in, d_sae, seed, rescale_acts_by_decoder_norm=True)
    sl.save_model(tmp_path / "sae")
    ours = saes.load_sae(tmp_path / "sae")
    assert ours.cfg["folded_decoder_norm"] and ours.norm_summary()["unit_norm"]
    x = _inputs(d_in, seed)
    n = sl.W_dec.detach().norm(dim=-1)
    xin = (x - sl.b_dec.detach()).abs()
    with torch.no_grad():
        a_theirs, a_ours = sl.encode(x), ours.encode(x)
        tol = 2 * (d_in + 2) * EPS32 * (xin @ (sl.W_enc.detach().abs() * n) + sl.b_enc.detach().abs() * n)
        assert torch.equal(a_ours != 0, a_theirs != 0)  # the same latents fire
        assert ((a_ours - a_theirs).abs() <= tol).all()
        tol_dec = (
            2
            * (d_sae + 2)
            * EPS32
            * (a_theirs.abs() @ (sl.W_dec.detach().abs() / n[:, None]) + sl.b_dec.detach().abs())
        )
        assert ((ours.decode(a_theirs) - sl.decode(a_theirs)).abs() <= tol_dec).all()


def test_runtime_normalisation_is_refused(tmp_path):
    sl = _saelens_sae("standard", 16, 32, 3, normalize_activations="layer_norm")
    sl.save_model(tmp_path / "sae")
    with pytest.raises(PlipyError, match="normalize_activations='layer_norm'"):
        saes.load_sae(tmp_path / "sae")


# ---------------------------------------------------------------------------------------------- plipy → SAELens


@pytest.mark.parametrize("arch", ARCHS)
def test_plipy_folder_loads_in_saelens(tmp_path, arch):
    d_in, d_sae, seed = 48, 128, 20 + ARCHS.index(arch)
    ours = _plipy_sae(arch, d_in, d_sae, seed)
    saes.save_saelens(ours, tmp_path / "sae", model_name="smollm2-135m")
    sl = SLSAE.load_from_disk(tmp_path / "sae")
    assert isinstance(sl, SL_CLASSES[arch][0]) and sl.cfg.architecture() == arch
    assert sl.cfg.metadata.hook_name == HOOK and sl.cfg.metadata.model_name == "smollm2-135m"
    assert sl.cfg.metadata.hook_head_index is None and sl.cfg.metadata.prepend_bos is True
    assert sl.cfg.apply_b_dec_to_input and sl.cfg.normalize_activations == "none"
    if arch == "topk":
        assert sl.cfg.k == ours.k and sl.cfg.rescale_acts_by_decoder_norm is False
    x = _inputs(d_in, seed)
    if arch == "jumprelu":
        _assert_jumprelu_cuts(ours, x)
    _assert_same_encode_decode(ours, sl, x, seed)
    # and back into plipy: the same SAE
    back = saes.load_sae(tmp_path / "sae")
    assert back.hook_name == HOOK and back.cfg["metadata"]["model_name"] == "smollm2-135m"
    assert torch.equal(back.encode(x), ours.encode(x))


def test_plipy_files_without_sae_lens_version_still_load_in_plipy(tmp_path):
    """plipy's files from before it wrote `sae_lens_version`: metadata without the version."""
    ours = _plipy_sae("topk", 16, 32, 5)
    d = saes.save_saelens(ours, tmp_path / "old", model_name="smollm2-135m")
    cfg = json.loads((d / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] == saes.io.SAELENS_LAYOUT_VERSION
    for key in ("sae_lens_version", "sae_lens_training_version"):
        del cfg["metadata"][key]
    del cfg["rescale_acts_by_decoder_norm"]
    (d / "cfg.json").write_text(json.dumps(cfg))
    back = saes.load_sae(d)
    assert back.architecture == "topk" and back.k == ours.k and back.hook_name == HOOK
    assert torch.equal(back.encode(_inputs(16, 5)), ours.encode(_inputs(16, 5)))


# ------------------------------------------------------------------------------------------- plipy sae train → SAELens


class _ByteTokenizer:
    """Bytes as token ids: enough for `text_chunks` (the only tokenizer use of `train_on_model`), and offline."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + b % 125 for b in text.encode()]}


def _tiny_lm() -> LoadedModel:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=_ByteTokenizer(), spec="tiny-llama", name="tiny-llama")


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_trained_sae_folder_loads_in_saelens(tmp_path, arch):
    """`plipy sae train` (train_on_model) writes a folder whose SAELens metadata names the hook it trained on."""
    lm = _tiny_lm()
    docs = [" ".join(f"The number {i} follows {i - 1}." for i in range(j, j + 40)) for j in range(0, 400, 40)]
    cfg = st.TrainConfig(
        arch=arch, width=64, k=4, n_tokens=400, epochs=1, batch_size=64, seq_len=16, model_batch=8, eval_seqs=2
    )
    sae, result = st.train_on_model(lm, 1, cfg, tmp_path / "sae", extra_documents=docs, stdlib=False)
    sl = SLSAE.load_from_disk(tmp_path / "sae")
    assert result["hook_name"] == "blocks.1.hook_resid_post" == sae.hook_name
    assert sl.cfg.metadata.hook_name == result["hook_name"] and sl.cfg.metadata.model_name == lm.name
    assert sl.cfg.architecture() == arch and sl.cfg.d_sae == 64
    x = _inputs(32, 1)
    with torch.no_grad():
        assert torch.equal(sl.encode(x), sae.encode(x))
        assert torch.equal(sl.decode(sae.encode(x)), sae.decode(sae.encode(x)))
