"""Latent selection: scores equal a direct computation on a hand-made example, the latent file is read by the
attention readers (mean activations, random candidates), entity positions, padding exactness, and the CLI chain
train → latents → attention on a tiny saved model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from plipy import sae as saes
from plipy.errors import PlipyError
from plipy.models import load_tokenizer
from plipy.sae import inputs as si
from plipy.workflows import sae_latents as sl
from plipy.workflows import sae_train as st
from test_sae_train import tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


# 6 entities × 4 latents. Types: movie (2 known, 1 unknown), city (1 known, 2 unknown).
ACTS = np.array(
    [
        [0.0, 2.0, 0.0, 0.0],  # movie known
        [1.0, 3.0, 0.0, 0.0],  # movie known
        [0.0, 0.0, 5.0, 0.0],  # movie unknown
        [0.0, 1.0, 0.0, 0.0],  # city known
        [0.0, 0.0, 1.0, 0.0],  # city unknown
        [2.0, 0.0, 1e-7, 0.0],  # city unknown (1e-7 is not "active": upstream threshold 1e-6)
    ]
)
TYPES = ["movie", "movie", "movie", "city", "city", "city"]
LABELS = ["known", "known", "unknown", "known", "unknown", "unknown"]


def test_scores_equal_direct_computation():
    s = sl.score_latents(ACTS, TYPES, LABELS)
    # by hand: movie f_known = [1/2, 1, 0, 0], f_unknown = [0, 0, 1, 0]; city f_known = [0, 1, 0, 0],
    # f_unknown = [1/2, 0, 1/2, 0]
    np.testing.assert_allclose(s["per_type"]["movie"]["score_known"], [0.5, 1, -1, 0])
    np.testing.assert_allclose(s["per_type"]["city"]["score_known"], [-0.5, 1, -0.5, 0])
    np.testing.assert_allclose(s["min_known"], [-0.5, 1, -1, 0])
    np.testing.assert_allclose(s["min_unknown"], [-0.5, -1, 0.5, 0])
    # pooled over types: known rows 0,1,3; unknown rows 2,4,5
    np.testing.assert_allclose(s["freq_known"], [1 / 3, 1, 0, 0])
    np.testing.assert_allclose(s["freq_unknown"], [1 / 3, 0, 2 / 3, 0])  # 1e-7 does not count
    np.testing.assert_allclose(s["mean_all"], ACTS.mean(0))
    np.testing.assert_allclose(s["mean_known"], [1 / 3, 2, 0, 0])
    np.testing.assert_allclose(s["mean_active"], [1.5, 2, 3, 0])
    # a direct, independent computation for random data
    rng = np.random.default_rng(0)
    a = np.where(rng.random((40, 7)) < 0.4, rng.random((40, 7)), 0.0)
    types = rng.choice(["player", "song"], 40).tolist()
    labels = rng.choice(["known", "unknown"], 40).tolist()
    got = sl.score_latents(a, types, labels)
    direct = []
    for t in ("player", "song"):
        rows_k = [i for i in range(40) if types[i] == t and labels[i] == "known"]
        rows_u = [i for i in range(40) if types[i] == t and labels[i] == "unknown"]
        direct.append(
            [
                sum(a[i, j] > 1e-6 for i in rows_k) / len(rows_k) - sum(a[i, j] > 1e-6 for i in rows_u) / len(rows_u)
                for j in range(7)
            ]
        )
    np.testing.assert_allclose(got["min_known"], np.min(direct, axis=0))
    np.testing.assert_allclose(got["min_unknown"], np.min(-np.array(direct), axis=0))


def test_type_without_both_labels_is_skipped_and_all_missing_is_an_error():
    s = sl.score_latents(ACTS[:4], TYPES[:4], LABELS[:4])  # city has no unknown entity
    assert s["skipped_types"] == ["city"] and list(s["per_type"]) == ["movie"]
    with pytest.raises(PlipyError, match="both known and unknown"):
        sl.score_latents(ACTS[:2], TYPES[:2], LABELS[:2])


def test_selection_filter_and_latent_file_round_trip(tmp_path):
    s = sl.score_latents(ACTS, TYPES, LABELS)
    general = np.array([0.0, 0.5, 0.01, 0.0])  # latent 1 fires on general text: filtered out
    doc = sl.select_latents(s, steer_at=10, general_freq=general, max_general_freq=0.02, top_n=5)
    assert doc["top"]["known"] == []  # latent 1 is the only positive known latent and it is filtered
    assert doc["top"]["unknown"] == [2]
    assert doc["random_candidates"]["known"] == [3] and doc["random_candidates"]["unknown"] == [3]
    unfiltered = sl.select_latents(s, steer_at=10)
    assert unfiltered["top"]["known"] == [1]
    assert [e["latent_idx"] for e in doc["known"].values()] == [1, 3, 0, 2]  # sorted by min score (ties by index)
    out = tmp_path / "latents.json"
    paths = sl.write_latents({**doc, "format": sl.FORMAT}, out)
    names = ["latents.json", "latents-scores-min-known.json", "latents-scores-min-unknown.json"]
    assert [p.name for p in paths] == names
    means = si.read_latent_means(out, layer=10)
    assert means == pytest.approx({i: float(ACTS[:, i].mean()) for i in range(4)})
    with pytest.raises(PlipyError):
        si.read_latent_means(out, layer=11)  # wrong layer: nothing found
    for label in ("known", "unknown"):
        p = sl.candidate_paths(out)[label]
        assert si.read_candidates(p, layer=10) == doc["random_candidates"][label]
        assert si.read_candidates(p, layer=9) == []
        scores = json.loads(p.read_text())
        assert list(scores) == [f"L10F{e['latent_idx']}" for e in doc[label].values()]


def test_last_entity_token_uses_the_entity_span():
    tok, _ = load_tokenizer("smollm2-135m")
    for etype, entity in [("movie", "The Matrix"), ("movie", "movie"), ("city", "São Paulo"), ("song", "e")]:
        ids, pos = sl.last_entity_token(tok, entity, etype)
        assert ids[0] == tok.bos_token_id
        # pos is the token that completes the quoted entity: with it the text holds 'entity, without it not
        assert f"'{entity}" in tok.decode(ids[1 : pos + 1])
        assert f"'{entity}" not in tok.decode(ids[1:pos])
    with pytest.raises(PlipyError):
        sl.last_entity_token(tok, "", "movie")


def test_padded_batches_equal_single_sequences():
    lm = tiny_lm()
    sae = saes.random_sae(64, 32, architecture="jumprelu", seed=1)
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(1, 128, (n,), generator=g).tolist(), p) for n, p in [(5, 4), (9, 2), (3, 2), (7, 6)]]
    batched = sl.latent_activations(lm, sae, 1, items, batch_size=4)
    for i, (ids, p) in enumerate(items):
        alone = sae.encode(st.resid_post(lm.model, 1, torch.tensor([ids]))[0, p])
        torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)


def _labels_doc(rows):
    """A hand-made labels document in the `plipy.entities` layout (validated by `entities.read_labels`)."""
    ents = [
        {
            "entity": e,
            "entity_type": t,
            "label": lab,
            "split": None if lab == "dropped" else sp,
            "known_attributes": [],
            "attributes": {},
        }
        for e, t, lab, sp in rows
    ]
    return {"provenance": {}, "config": {}, "summary": {}, "test_balanced": {}, "entities": ents}


def test_run_latents_scores_the_train_split():
    tok, _ = load_tokenizer("smollm2-135m")
    lm = tiny_lm(vocab=len(tok), tokenizer=tok)
    sae = saes.random_sae(64, 48, architecture="topk", k=8, seed=2, hook_name="blocks.1.hook_resid_post")
    rows = [
        ("Alien", "movie", "known", "train"),
        ("Heat", "movie", "known", "train"),
        ("Zork Film", "movie", "unknown", "train"),
        ("Paris", "city", "known", "train"),
        ("Qwxv", "city", "unknown", "train"),
        ("Brest", "city", "unknown", "test"),
        ("Nope", "city", "dropped", "train"),
    ]
    doc = sl.run_latents(lm, sae, _labels_doc(rows), general_filter=True, general_tokens=128)
    assert doc["layer"] == 2 and doc["capture_layer"] == 1 and doc["n_entities"] == 5
    assert doc["counts"] == {"movie": {"known": 2, "unknown": 1}, "city": {"known": 1, "unknown": 1}}
    # recompute the scores from the activations directly
    train = [r for r in rows if r[3] == "train" and r[2] != "dropped"]
    items = [sl.last_entity_token(tok, e, t) for e, t, _, _ in train]
    acts = sl.latent_activations(lm, sae, 1, items).numpy()
    direct = sl.score_latents(acts, [r[1] for r in train], [r[2] for r in train])
    by_idx = {e["latent_idx"]: e for e in doc["known"].values()}
    for i in range(48):
        assert by_idx[i]["score"] == pytest.approx(float(direct["min_known"][i]))
        assert 0 <= by_idx[i]["freq_general"] <= 1
    with pytest.raises(PlipyError, match="no known/unknown"):
        sl.labelled_rows(_labels_doc(rows), split="validation")


@pytest.mark.slow
def test_cli_train_latents_attention_chain(tmp_path, capsys):
    """`plipy sae train` → `plipy sae latents` → `plipy sae attention --latent-file --random-candidates --coeff mean`
    on a tiny random model saved with SmolLM2's tokenizer."""
    from plipy.cli import main

    tok, _ = load_tokenizer("smollm2-135m")
    lm = tiny_lm(vocab=len(tok), tokenizer=tok)
    mdir = tmp_path / "model"
    lm.model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    rows = [
        ("Alien", "movie", "known", "train"),
        ("Heat", "movie", "unknown", "train"),
        ("Paris", "city", "known", "train"),
        ("Qwxv", "city", "unknown", "train"),
    ]
    (tmp_path / "labels.json").write_text(json.dumps(_labels_doc(rows)))
    sae_dir, lat = tmp_path / "sae", tmp_path / "lat.json"
    main(
        [
            "sae",
            "train",
            "-m",
            str(mdir),
            "--layer",
            "1",
            "--width",
            "64",
            "--k",
            "4",
            "--tokens",
            "400",
            "--epochs",
            "1",
            "--train-batch",
            "64",
            "--seq-len",
            "16",
            "--entity-text",
            "2",
            "-o",
            str(sae_dir),
        ]
    )
    assert "explained variance" in capsys.readouterr().out
    main(
        [
            "sae",
            "latents",
            "-m",
            str(mdir),
            "--sae",
            str(sae_dir),
            "--labels",
            str(tmp_path / "labels.json"),
            "--general-tokens",
            "64",
            "-o",
            str(lat),
        ]
    )
    assert "Top latents at the input of layer 2" in capsys.readouterr().out
    doc = json.loads(lat.read_text())
    latent = doc["known"]["0"]["latent_idx"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"entity": "Alien", "entity_type": "movie", "label": "unknown"}))
    main(
        [
            "sae",
            "attention",
            "-m",
            str(mdir),
            "--sae",
            str(sae_dir),
            "--latent",
            str(latent),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--coeff",
            "mean",
            "--latent-file",
            str(lat),
            "--random",
            "2",
            "--random-candidates",
            str(sl.candidate_paths(lat)["known"]),
            "--measures",
            "attn_weights",
            "-o",
            str(tmp_path / "att.json"),
        ]
    )
    res = json.loads((tmp_path / "att.json").read_text())
    cands = set(si.read_candidates(sl.candidate_paths(lat)["known"], layer=2))
    assert res["layer"] == 2 and set(res["random_latents"]) <= cands
    assert res["provenance"]["config"]["latent_means"][str(latent)] == pytest.approx(
        si.read_latent_means(lat, layer=2)[latent]
    )


# ---------------------------------------------------------------------------------------------- pipeline


def _saved_tiny(tmp_path):
    tok, _ = load_tokenizer("smollm2-135m")
    lm = tiny_lm(vocab=len(tok), tokenizer=tok)
    mdir = tmp_path / "model"
    lm.model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    return mdir


def test_attention_stage_steers_with_the_opposite_top_latent(tmp_path):
    from plipy.workflows import sae_pipeline as sp

    tok, _ = load_tokenizer("smollm2-135m")
    lm = tiny_lm(vocab=len(tok), tokenizer=tok)
    sae = saes.random_sae(64, 48, architecture="topk", k=8, seed=2, hook_name="blocks.1.hook_resid_post")
    rows = [
        ("Alien", "movie", "known", "train"),
        ("Heat", "movie", "unknown", "train"),
        ("Paris", "city", "known", "train"),
        ("Qwxv", "city", "unknown", "train"),
        ("Brest", "city", "known", "test"),
        ("Zzyq", "city", "unknown", "test"),
    ]
    labels = _labels_doc(rows)
    labels["test_balanced"] = {"city": ["Brest", "Zzyq"]}
    doc = sl.run_latents(lm, sae, labels, general_filter=False)
    path = tmp_path / "latents.json"
    sl.write_latents(doc, path)
    cfg = sp.quick_config(min_entities=1, n_random=2)
    res = sp._attention_stage(lm, sae, labels, doc, path, "known", cfg, tmp_path, "fp", None, lambda s: None)
    assert doc["top"]["unknown"]  # seed 2 has a latent active on both unknown entities only (checked)
    assert res["latent"] == doc["top"]["unknown"][0] and res["latent_label"] == "unknown"
    assert res["n_entities"] == 1 and res["n_prompts"] == 3  # Brest × the three city relations
    assert res["status"] == "tested" and res["K"] == 2
    saved = json.loads((tmp_path / "attention-known.json").read_text())
    assert set(saved["random_latents"]) <= set(doc["random_candidates"]["unknown"])
    small = sp._attention_stage(
        lm, sae, labels, doc, path, "known", sp.quick_config(), tmp_path / "b", "fp", None, lambda s: None
    )
    assert small["status"].startswith("too few samples") and small["k_significant"] is None


def test_quick_pipeline_on_a_tiny_model_resumes(tmp_path):
    """The whole chain on a tiny random model: it knows no entity, so the summary says so instead of testing."""
    from plipy.models import load_model
    from plipy.workflows import sae_pipeline as sp

    lm = load_model(str(_saved_tiny(tmp_path)), dtype="float32", device="cpu")
    out = tmp_path / "run"
    logs: list[str] = []
    cfg = sp.quick_config(layer=1)
    summary = sp.run_pipeline(lm, out, cfg, log=logs.append)
    for name in ("labels.json", "sae/cfg.json", "sae/training.json", "summary.json", "summary.md"):
        assert (out / name).is_file(), name
    ent = summary["entities"]
    assert set(ent) == {"player", "movie", "city", "song"}
    assert all(c["n"] == 2 and c["known"] + c["unknown"] + c["dropped"] == 2 for c in ent.values())
    md = (out / "summary.md").read_text()
    assert "What the model knows" in md and "blocks.1.hook_resid_post" in md
    if summary["latents"] is None:  # no type with both labels: said plainly, no p-value anywhere
        assert "Not scored" in md and summary["attention"] == {}
    assert "p=" not in md
    again = sp.run_pipeline(lm, out, cfg, log=logs.append)
    assert any("reusing" in s and "labels.json" in s for s in logs) and any("SAE: reusing" in s for s in logs)
    assert again["entities"] == summary["entities"] and again["sae"] == summary["sae"]


@pytest.mark.slow
def test_quick_pipeline_on_smollm(smollm, tmp_path):
    """`plipy sae pipeline --quick` on the real default model: every stage's file, honest counts, then a resume."""
    from plipy.workflows import sae_pipeline as sp

    out = tmp_path / "quick"
    summary = sp.run_pipeline(smollm, out, sp.profile("quick"), log=lambda s: None)
    assert (out / "sae" / "cfg.json").is_file() and (out / "summary.md").is_file()
    assert saes.load_sae(out / "sae").hook_name == "blocks.9.hook_resid_post"
    assert summary["sae"]["steer_layer"] == 10
    for t, c in summary["entities"].items():
        assert c["n"] == 2 and c["known"] + c["unknown"] + c["dropped"] == 2, t
    for a in summary["attention"].values():  # 2 entities per type can never reach min_entities = 5
        assert a["k_significant"] is None and ("too few" in a["status"] or "nothing" in a["status"])
    logs: list[str] = []
    sp.run_pipeline(smollm, out, sp.profile("quick"), log=logs.append)
    assert sum("reusing" in s for s in logs) >= 2
