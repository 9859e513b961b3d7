"""The SAE trainer: it reduces reconstruction error on a tiny random model (TopK and JumpReLU), keeps unit decoder
rows, round-trips through the SAELens format, and its metrics (explained variance, spliced next-token loss) equal
direct computations."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from plipy import sae as saes
from plipy.errors import PlipyError
from plipy.models import LoadedModel, load_tokenizer
from plipy.sae import resolve_layer
from plipy.workflows import sae_train as st

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


def tiny_lm(vocab: int = 128, seed: int = 0, tokenizer=None) -> LoadedModel:
    """A tiny random Llama (3 layers, d 64) as a LoadedModel; a real model, only small."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.ndim >= 2:
                p.normal_(0, 0.15)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, spec="tiny-llama", name="tiny-llama")


def random_chunks(n: int, seq_len: int, vocab: int = 128, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g).tolist()


@pytest.fixture(scope="module")
def tiny_acts():
    lm = tiny_lm()
    acts = st.collect_activations(lm, 1, random_chunks(64, 33), 2048, batch=16)
    held = st.collect_activations(lm, 1, random_chunks(16, 33, seed=1), 512, batch=16)
    return lm, acts, held


def _untrained(acts: torch.Tensor, cfg: st.TrainConfig) -> saes.SAE:
    """The SAE at initialisation (0 steps): same init code path, no optimiser step."""
    one = acts[: cfg.batch_size]
    return st.train_sae(one, st.TrainConfig(**{**cfg.__dict__, "lr": 0.0, "epochs": 1}))[0]


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_training_reduces_reconstruction_error(tiny_acts, arch):
    _, acts, held = tiny_acts
    cfg = st.TrainConfig(
        arch=arch,
        width=256,
        k=16,
        lr=3e-3,
        n_tokens=2048,
        epochs=8,
        batch_size=128,
        dead_window=1024,
        l0_coeff=0.05,
        threshold_init=0.05,
    )
    before = st.reconstruction_metrics(_untrained(acts, cfg), held)
    sae, stats = st.train_sae(acts, cfg, hook_name="blocks.1.hook_resid_post")
    after = st.reconstruction_metrics(sae, held)
    assert after["mse"] < 0.5 * before["mse"], (before, after)
    assert after["explained_variance"] > 0.6
    assert sae.architecture == arch and sae.d_sae == 256 and sae.d_in == 64
    assert sae.norm_summary()["unit_norm"]  # the decoder-norm constraint holds after the last step
    if arch == "topk":
        assert after["l0"] <= 16
    else:
        assert 0 < after["l0"] < 256
    assert stats["steps"] == 8 * (2048 // 128)


def test_reconstruction_metrics_match_direct_computation(tiny_acts):
    _, acts, held = tiny_acts
    sae = saes.random_sae(64, 128, architecture="topk", k=8, seed=3)
    m = st.reconstruction_metrics(sae, held, batch=100)  # batching must not change the numbers
    x = held.double()
    r = sae.decode(sae.encode(held)).double()
    ev = 1 - ((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["explained_variance"] == pytest.approx(float(ev), rel=1e-5)
    assert m["mse"] == pytest.approx(float(((x - r) ** 2).mean()), rel=1e-5)
    assert m["l0"] == pytest.approx(8.0, abs=1e-9)


def test_scale_folding_gives_raw_unit_activations(tiny_acts):
    """The saved SAE reads raw residuals: encode(x) of the exported SAE equals the scaled model's activations / s."""
    _, acts, _ = tiny_acts
    cfg = st.TrainConfig(arch="jumprelu", width=64, n_tokens=2048, epochs=1, batch_size=256)
    g = torch.Generator().manual_seed(0)
    s = 7.5
    tr = st._Trainable(64, cfg, torch.randn(64, generator=g), g)
    with torch.no_grad():
        tr.b_enc.normal_(0, 0.5)
        scaled = tr.acts(tr.pre(acts[:50] * s))
        recon_scaled = scaled @ tr.W_dec + tr.b_dec
    sae = tr.export(s, None)
    torch.testing.assert_close(sae.encode(acts[:50]), scaled / s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(acts[:50])), recon_scaled / s, rtol=1e-4, atol=1e-4)


def test_saelens_round_trip_is_identical(tmp_path, tiny_acts):
    _, acts, held = tiny_acts
    for arch in ("topk", "jumprelu"):
        cfg = st.TrainConfig(arch=arch, width=128, k=8, n_tokens=2048, epochs=1, batch_size=256)
        sae, _ = st.train_sae(acts, cfg, hook_name="blocks.1.hook_resid_post")
        saes.save_saelens(sae, tmp_path / arch, model_name="tiny")
        back = saes.load_sae(tmp_path / arch)
        assert back.architecture == arch and back.k == sae.k and back.hook_name == "blocks.1.hook_resid_post"
        assert torch.equal(back.encode(held), sae.encode(held))
        assert torch.equal(back.decode(back.encode(held)), sae.decode(sae.encode(held)))
        assert resolve_layer(back, None, 3) == 2  # resid_post of 1 steers at the input of layer 2
        cfg_json = json.loads((tmp_path / arch / "cfg.json").read_text())
        assert cfg_json["metadata"]["hook_name"] == "blocks.1.hook_resid_post"


def test_spliced_loss_identity_sae_changes_nothing():
    """An SAE that reconstructs exactly (relu(x) − relu(−x)) leaves the next-token loss unchanged; the clean loss
    equals HF's own loss; a poor SAE or mean ablation changes it."""
    lm = tiny_lm()
    d = 64
    eye = torch.eye(d)
    ident = saes.SAE(
        W_enc=torch.cat([eye, -eye], 1),
        W_dec=torch.cat([eye, -eye], 0),
        b_enc=torch.zeros(2 * d),
        b_dec=torch.zeros(d),
        architecture="standard",
        apply_b_dec_to_input=False,
    )
    seqs = random_chunks(4, 20, seed=5)
    out = st.spliced_loss(lm, ident, 1, seqs, mean=torch.zeros(d), batch=2)
    ids = torch.tensor(seqs)
    ref = float(lm.model(input_ids=ids, labels=ids).loss)
    assert out["ce_clean"] == pytest.approx(ref, rel=1e-5)
    assert out["ce_spliced"] == pytest.approx(out["ce_clean"], abs=1e-6)
    assert out["ce_tokens"] == 4 * 19
    assert abs(out["ce_mean_ablated"] - out["ce_clean"]) > 1e-3  # the hook really replaces the residual
    bad = saes.random_sae(d, 16, architecture="topk", k=2, seed=1)
    worse = st.spliced_loss(lm, bad, 1, seqs, batch=4)
    assert worse["ce_clean"] == pytest.approx(out["ce_clean"], rel=1e-6)
    assert abs(worse["ce_increase"]) > 1e-3


def test_resid_post_is_the_layer_output():
    lm = tiny_lm()
    ids = torch.tensor(random_chunks(2, 10, seed=2))
    hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(st.resid_post(lm.model, 1, ids), hs[2])  # hidden_states[L+1] = output of layer L


def test_geometric_median():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    torch.testing.assert_close(st.geometric_median(pts, iters=500), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
    sq = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(st.geometric_median(sq), torch.tensor([1.0, 1.0]), atol=1e-4, rtol=0)


def test_bad_settings_are_refused():
    with pytest.raises(PlipyError, match="arch"):
        st.TrainConfig(arch="gated").check()
    with pytest.raises(PlipyError, match="k"):
        st.TrainConfig(width=8, k=9).check()


def test_train_on_model_end_to_end(tmp_path):
    """Text (entity sentences + stdlib) → activations → SAE → metrics → SAELens folder with training.json."""
    tok, _ = load_tokenizer("smollm2-135m")
    lm = tiny_lm(vocab=len(tok), tokenizer=tok)
    docs = st.entity_sentences({"movie": [{"entity": "Alien", "attributes": {"directors": "Ridley Scott, X"}}]})
    assert docs == ["The movie 'Alien' is directed by Ridley Scott."]
    cfg = st.TrainConfig(width=64, k=4, n_tokens=600, epochs=2, batch_size=64, seq_len=16, model_batch=8, eval_seqs=2)
    out = tmp_path / "sae"
    steps = []
    sae, result = st.train_on_model(
        lm, 1, cfg, out, extra_documents=docs * 3, progress=lambda d, n: lambda k=1, **m: steps.append((d, k))
    )
    assert {d for d, _ in steps} == {"activations", "training SAE"}
    assert sum(k for d, k in steps if d == "activations") == 600
    back = saes.load_sae(out)
    assert back.hook_name == "blocks.1.hook_resid_post" and back.d_sae == 64
    doc = json.loads((out / "training.json").read_text())
    for key in ("explained_variance", "mse", "l0", "ce_clean", "ce_spliced", "ce_increase"):
        assert isinstance(doc["metrics"][key], float)
    assert doc["metrics"]["ce_increase"] == pytest.approx(doc["metrics"]["ce_spliced"] - doc["metrics"]["ce_clean"])
    assert doc["steer_layer"] == 2 and (out / "sparsity.safetensors").is_file()
    with pytest.raises(PlipyError, match="layer"):
        st.train_on_model(lm, 2, cfg)  # the last layer's output has no attention after it
