"""plipy.entities: entity lists, queries, correctness rules, labels, split, cache and CLI (real SmolLM2, no mocks)."""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import pytest
import torch

import plipy
from plipy import entities
from plipy.entities import build as eb
from plipy.entities.correctness import RULES, grade, is_correct, is_refusal, known_threshold
from plipy.entities.generate import _RowSampler, generate
from plipy.entities.label import assign_labels, balanced_test, entity_label, split_indices, three_way_split
from plipy.errors import PlipyError

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT.parent / "shared" / "entities" / "raw" / "wikidata"
SPLITS = ROOT.parent / "shared" / "entities" / "processed" / "gemma-2-2b-it_wikidata_splits.json"
needs_raw = pytest.mark.skipif(not RAW.is_dir(), reason="raw WikiData dumps (../shared/entities) not present")

# ---------------------------------------------------------------------------------------------- data


@needs_raw
def test_build_from_raw_gives_upstream_counts_and_the_shipped_files(tmp_path):
    lists = eb.build_entities(RAW)
    assert {t: len(v) for t, v in lists.items()} == {"player": 7487, "movie": 10895, "city": 7904, "song": 8448}
    for t, ents in lists.items():
        names = [e["entity"] for e in ents]
        assert len(set(names)) == len(names)
        assert all(set(e["attributes"]) == set(eb.RAW_FIELDS[t][1].values()) for e in ents)
        # byte-identical to the shipped package data (deterministic gzip)
        assert eb.encode(ents) == (eb.shipped_dir() / f"{t}.json.gz").read_bytes()
    from plipy.cli import main

    main(["entities", "build", "--raw", str(RAW), "--out", str(tmp_path)])
    for t in entities.ENTITY_TYPES:
        assert (tmp_path / f"{t}.json.gz").read_bytes() == (eb.shipped_dir() / f"{t}.json.gz").read_bytes()


@pytest.mark.skipif(not SPLITS.is_file(), reason="upstream split file not present")
def test_every_upstream_split_question_names_a_shipped_entity():
    qs = [q for part in json.loads(SPLITS.read_text()).values() for q in part]
    assert len(qs) == 6144
    names = {t: {e["entity"] for e in v} for t, v in entities.load_entities().items()}
    pats = [
        (key.split("_")[0], re.compile(re.escape(question).replace(re.escape("'{entity}'"), "'(.+)'") + "$"))
        for key, (question, _) in entities.QUERY_TEMPLATES.items()
    ]
    for q in qs:
        hits = [(t, m.group(1)) for t, p in pats if (m := p.match(q))]
        assert hits, q
        assert any(name in names[t] for t, name in hits), q


def test_load_entities_limit_types_and_order():
    full = entities.load_entities(types=["city"])
    two = entities.load_entities(types="city,player", limit=2)
    assert list(two) == ["city", "player"]
    assert two["city"] == full["city"][:2]
    assert two["player"][0] == {
        "entity": "Goran Jeretin",
        "entity_type": "player",
        "attributes": {
            "place_birth": "Nikšić",
            "date_birth": "1979",
            "teams_list": two["player"][0]["attributes"]["teams_list"],
            "weight": "82",
            "height": "190",
        },
    }
    assert len(full["city"]) == 7904
    with pytest.raises(PlipyError, match="unknown entity type"):
        entities.load_entities(types=["team"])


def test_shipped_files_carry_the_licence():
    d = eb.shipped_dir()
    assert "Apache License" in (d / "LICENSE-sae_entities-Apache-2.0.txt").read_text()
    assert "CC0" in (d / "ATTRIBUTION.md").read_text()
    with gzip.open(d / "song.json.gz", "rt") as f:
        assert len(json.load(f)) == 8448


# ---------------------------------------------------------------------------------------------- queries


def test_queries_use_the_base_templates_and_every_queried_attribute():
    e = entities.load_entities(types=["player"], limit=2)["player"][1]
    qs = entities.make_queries(e)
    assert [q.attribute for q in qs] == ["place_birth", "date_birth", "teams_list"]
    assert qs[0].prompt == (
        "What is the place of birth for the player 'Tracy McGrady'? The city of birth for the player 'Tracy McGrady' is"
    )
    assert qs[0].answer == "Bartow" and qs[1].answer == "1979"
    n = {t: len(entities.make_queries(v[0])) for t, v in entities.load_entities(limit=1).items()}
    assert n == {"player": 3, "movie": 6, "city": 4, "song": 4}  # upstream 22,461 / 65,370 / 31,616 / 33,792
    weird = {
        "entity": "A {b} c",
        "entity_type": "song",
        "attributes": dict.fromkeys(["album", "publication_year", "genres", "performers"], "x"),
    }
    assert "'A {b} c'" in entities.make_queries(weird)[0].prompt  # braces in names are not format fields


def test_player_relations_are_fixed():
    from plipy.entities.queries import UPSTREAM_SWAPPED_RELATIONS

    assert entities.RELATIONS["player_date_birth"] == "was born in the year"
    assert entities.RELATIONS["player_place_birth"] == "was born in the city of"
    assert UPSTREAM_SWAPPED_RELATIONS["player_date_birth"] == "was born in the city of"
    e = entities.load_entities(types=["player"], limit=2)["player"][1]
    rel = {r["attribute"]: r for r in entities.relation_prompts(e)}
    assert rel["date_birth"]["prompt"] == "The player Tracy McGrady was born in the year"
    assert rel["date_birth"]["answer"] == " 1979"
    assert rel["place_birth"]["answer"] == " Bartow"
    assert rel["teams_list"]["answer"] == " Qingdao Eagles"  # last listed value, as upstream


# ---------------------------------------------------------------------------------------------- correctness

# (prompt_type, completion, answer, correct?) — hand-made, at least one right and one wrong per attribute type.
CASES = [
    ("player_place_birth", " Bartow, Florida, in 1979.", "Bartow", True),
    ("player_place_birth", " Niksic, Montenegro.", "Nikšić", True),  # accents folded
    ("player_place_birth", " Orlando, Florida.", "Bartow", False),
    ("player_date_birth", " 1975, in Bartow.", "1979", True),  # ±5
    ("player_date_birth", " 1973.", "1979", False),
    ("player_teams_list", " the Toronto Raptors in 1997.", "New York Knicks, Toronto Raptors, Houston Rockets", True),
    ("player_teams_list", " the Chicago Bulls.", "New York Knicks, Toronto Raptors", False),
    ("movie_directors", " Charlie Chaplin, who also starred.", "Charlie Chaplin", True),
    ("movie_directors", " Charles Chaplin Jr.", "King Vidor, Jack Conway", False),
    ("movie_cast", " Paulette Goddard and others", "Sig Arno, Paulette Goddard, Jack Oakie", True),
    ("movie_cast", " Tom Hanks", "Sig Arno, Paulette Goddard", False),
    ("movie_screenwriters", " written by Kenneth Roberts.", "King Vidor, Kenneth Roberts", True),
    ("movie_screenwriters", " Aaron Sorkin.", "King Vidor, Kenneth Roberts", False),
    ("movie_genres", " a comedy drama set in Europe.", "slapstick, comedy drama film, war film", True),
    ("movie_genres", " war.", "slapstick, comedy drama film, war film", True),  # ' film' removed
    ("movie_genres", " a horror movie.", "slapstick, comedy drama film", False),
    ("movie_release_year", " 1942.", "1940", True),  # ±2
    ("movie_release_year", " 1943.", "1940", False),
    ("movie_durations", " 128 minutes", "125, 130", True),  # ±3 of any listed
    ("movie_durations", " 2 hours", "125, 130", False),
    ("city_country", " the United States.", "United States of America", True),  # upstream alias list
    ("city_country", " China", "People's Republic of China", True),
    ("city_country", " Mexico.", "Netherlands", False),
    ("city_location", " 20.59° N, 100.39° W", "Point(-100.388055555 20.588055555)", True),
    ("city_location", " 20.59° N, 20.4° E", "Point(-100.388055555 20.588055555)", False),  # one number only
    ("city_location", " 53.2, 5.78", "Point(5.783333333 53.2)", True),
    ("city_population", " about 800,000 people.", "794789", True),  # ±10 %, thousands comma removed
    ("city_population", " 700,000.", "794789", False),
    ("city_elevation", " 1,835 metres above sea level", "1820", True),  # ±20
    ("city_elevation", " 1,900 m", "1820", False),
    ("song_album", " Psy 6 (Six Rules), Part 1.", "Psy 6 (Six Rules), Part 1", True),
    ("song_album", " Gangnam Style: The Album", "Psy 6 (Six Rules), Part 1", False),
    ("song_publication_year", " 2012.", "2012", True),  # exact
    ("song_publication_year", " 2011.", "2012", False),
    ("song_genres", " K-pop and dance", "K-pop", True),
    ("song_genres", " heavy metal", "K-pop", False),
    ("song_performers", " Enrique Iglesias.", "Enrique Iglesias", True),
    ("song_performers", " Shakira.", "Enrique Iglesias", False),
]


@pytest.mark.parametrize(("prompt_type", "completion", "answer", "expected"), CASES)
def test_correctness_hand_made_cases(prompt_type, completion, answer, expected):
    assert is_correct(prompt_type, completion, answer) is expected


def test_every_queried_attribute_has_a_rule_and_cases():
    types = {f"{t}_{a}" for t, attrs in entities.QUERIED_ATTRIBUTES.items() for a in attrs}
    assert set(RULES) == types == set(entities.QUERY_TEMPLATES)
    for pt in types:
        assert {c[3] for c in CASES if c[0] == pt} == {True, False}, pt


def test_refusal_detection_and_grade_order():
    assert is_refusal(" I'm sorry, I don't know that player.")
    assert is_refusal(" unknown.")
    assert is_refusal("Unfortunately the record is lost")
    assert not is_refusal(" Bartow, Florida.")
    assert grade("player_place_birth", " not sure, maybe Bartow", "Bartow") == "correct"  # correct wins
    assert grade("player_place_birth", " not sure, maybe Paris", "Bartow") == "refusal"
    assert grade("player_place_birth", " Paris", "Bartow") == "error"


def test_known_threshold_scales_with_k():
    assert known_threshold(10) == 3  # upstream
    assert [known_threshold(k) for k in (1, 2, 3, 4, 5, 7, 20)] == [1, 1, 1, 2, 2, 3, 6]


# ---------------------------------------------------------------------------------------------- labels and split


def test_split_matches_sklearn_train_test_split():
    # Reference values from sklearn 1.9.1 train_test_split(items, test_size=0.5, random_state=42), then rest 0.8.
    items = [f"e{i}" for i in range(10)]
    assert three_way_split(items) == {
        "train": ["e2", "e9", "e4", "e3", "e6"],
        "validation": ["e0"],
        "test": ["e1", "e7", "e5", "e8"],
    }
    items = [f"e{i}" for i in range(23)]
    assert three_way_split(items) == {
        "train": ["e3", "e4", "e18", "e16", "e21", "e22", "e7", "e10", "e14", "e19", "e6"],
        "validation": ["e8", "e1"],
        "test": ["e11", "e2", "e15", "e5", "e12", "e0", "e9", "e20", "e17", "e13"],
    }
    # 50 / 10 / 40 and a partition, for any size; tiny groups do not raise (sklearn would)
    for n in (0, 1, 2, 3, 7, 100, 101):
        parts = three_way_split(list(range(n)))
        assert sorted(sum(parts.values(), [])) == list(range(n))
    parts = three_way_split(list(range(100)))
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [50, 10, 40]
    assert split_indices(1, 0.5) == ([], [0])


def test_entity_label_and_balancing_rules():
    assert [entity_label(n) for n in (0, 1, 2, 3, 6)] == ["unknown", "dropped", "known", "known", "known"]
    assert balanced_test(["a", "b", "c"], ["x"]) == (["a"], ["x"])
    assert balanced_test([], ["x", "y"]) == ([], [])


def _records(n_known: int, n_unknown: int, n_dropped: int, t: str = "movie") -> list[dict]:
    spec = [2] * n_known + [0] * n_unknown + [1] * n_dropped
    return [
        {"entity": f"{t}{i}", "entity_type": t, "known_attributes": ["a"] * m, "attributes": {}}
        for i, m in enumerate(spec)
    ]


def test_assign_labels_split_and_balanced_lists():
    recs = _records(23, 10, 4) + _records(1, 3, 0, "city")
    summary, balanced = assign_labels(recs)
    assert {k: summary["movie"][k] for k in ("n", "known", "unknown", "dropped")} == {
        "n": 37,
        "known": 23,
        "unknown": 10,
        "dropped": 4,
    }
    movies = [r for r in recs if r["entity_type"] == "movie"]
    known = [r["entity"] for r in movies if r["label"] == "known"]
    by = {r["entity"]: r for r in recs}
    # same membership as upstream's two train_test_split calls on the known list (entity order)
    want = three_way_split(known)
    for split, names in want.items():
        assert all(by[n]["split"] == split for n in names)
    assert all(r["split"] is None for r in movies if r["label"] == "dropped")
    unknown_test = three_way_split([r["entity"] for r in movies if r["label"] == "unknown"])["test"]
    assert summary["movie"]["test"] == {"known": 10, "unknown": 4}
    assert balanced["movie"] == want["test"][:4] + unknown_test[:4]
    assert summary["movie"]["test_balanced_per_label"] == 4
    # one known city: train and validation empty, it lands in test (sklearn would raise); 3 unknown → 2 in test
    assert by["city0"]["split"] == "test" and summary["city"]["test"] == {"known": 1, "unknown": 2}
    city_unknown_test = three_way_split(["city1", "city2", "city3"])["test"]
    assert balanced["city"] == ["city0", city_unknown_test[0]]


# ---------------------------------------------------------------------------------------------- generation


def test_row_sampler_draws_from_the_softmax_and_leaves_greedy_rows():
    logits = torch.log(torch.tensor([[0.25, 0.75, 1e-9]])).repeat(2001, 1)
    sampler = _RowSampler([None] + list(range(2000)))
    out = sampler(None, logits)
    assert torch.equal(out[0], logits[0])
    picks = out[1:].argmax(-1)
    assert torch.isinf(out[1:]).sum(-1).eq(2).all()  # one-hot: every other token -inf
    frac = picks.eq(1).float().mean().item()
    assert 0.72 < frac < 0.78 and picks.eq(2).sum() == 0


def test_generation_is_seeded_and_batched(smollm):
    prompts = [q.prompt for q in entities.make_queries(entities.load_entities(types=["song"], limit=1)["song"][0])]
    a = generate(smollm, prompts[:2], k=2, seed=1, max_new_tokens=4, batch_size=2)
    b = generate(smollm, prompts[:2], k=2, seed=1, max_new_tokens=4, batch_size=2)
    assert a == b and len(a) == 2 and all(len(g["samples"]) == 2 for g in a)
    plain = generate(smollm, prompts[:2], k=2, seed=1, max_new_tokens=4, batch_size=2, share_prefill=False)
    assert [g["greedy"] for g in plain] == [g["greedy"] for g in a]  # the shared KV prefill changes nothing
    assert smollm.tokenizer.padding_side == "right"  # restored


@pytest.mark.slow
def test_label_entities_end_to_end_cache_and_cli(smollm, tmp_path):
    from plipy.cli import main

    t0 = time.time()
    doc = plipy.label_entities(
        smollm, types=["player", "city"], limit=2, k=2, max_new_tokens=8, batch_size=4, cache_dir=tmp_path / "cache"
    )
    first = time.time() - t0
    entities.validate_labels(doc)
    assert doc["config"]["known_threshold"] == 1 and doc["cache"]["generated_queries"] == 2 * 3 + 2 * 4
    assert [e["entity"] for e in doc["entities"]] == [
        "Goran Jeretin",
        "Tracy McGrady",
        "Santiago de Querétaro",
        "Leeuwarden",
    ]
    for e in doc["entities"]:
        for name, a in e["attributes"].items():
            pt = f"{e['entity_type']}_{name}"
            assert a["correct_samples"] == sum(grade(pt, s, a["value"]) == "correct" for s in a["samples"])
            assert a["known"] == (a["correct_samples"] >= 1)
            assert len(a["samples"]) == 2
        assert e["known_attributes"] == [n for n, a in e["attributes"].items() if a["known"]]
        assert e["label"] == entity_label(len(e["known_attributes"]))
    for s in doc["summary"].values():
        assert s["known"] + s["unknown"] + s["dropped"] == s["n"] == 2
    assert any("knows" in n for n in doc["notes"])
    assert doc["provenance"]["model"]["weights_sha256"] == smollm.provenance["weights_sha256"]
    t0 = time.time()
    again = plipy.label_entities(
        smollm, types=["player", "city"], limit=2, k=2, max_new_tokens=8, batch_size=4, cache_dir=tmp_path / "cache"
    )
    assert time.time() - t0 < min(2.0, first) and again["cache"]["hit"] is True
    assert again["entities"] == doc["entities"]
    # CLI, other batch size: a new labels document, but every generation comes from the shared generation cache
    out = tmp_path / "labels.json"
    main(["entities", "label", "--quick", "--types", "city", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    cli = entities.read_labels(out)
    assert cli["cache"]["generated_queries"] == 0
    assert cli["entities"] == [e for e in doc["entities"] if e["entity_type"] == "city"]
    bad = json.loads(out.read_text())
    bad["entities"][0]["label"] = "maybe"
    out.write_text(json.dumps(bad))
    with pytest.raises(PlipyError, match="label"):
        entities.read_labels(out)


def test_cli_rejects_unknown_types_before_loading_a_model(capsys):
    from plipy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["entities", "label", "--types", "player,team", "--model", "no-such-model"])
    assert exc.value.code == 2
    assert "unknown entity type(s) team" in capsys.readouterr().err
