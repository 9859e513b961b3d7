"""Attention knockout on SmolLM2: exact identity, agreement with an explicit reference, fast path == naive path,
statuses for impossible knockouts, clear errors, and the CLI end to end."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

import plipy
from conftest import corpus_subset
from plipy import cli
from plipy.cli import knockout as ko_cli
from plipy.corpus import load_corpus, token_positions
from plipy.divergence import compare_logits, entropy, kl_divergence, kl_plip, top_changed
from plipy.engine import EdgeEdit, Engine
from plipy.engine import runner as runner_mod
from plipy.engine.runner import ConditionRunner
from plipy.errors import PlipyError
from plipy.experiments import knockout as ko
from plipy.options import parse_layers
from plipy.runtime.driver import RunOptions, execute
from tiny_models import ARCHS, REF, REF_EDITS, SLIDING, build, register_reference, variant

PICK = {"python_doctest": 2, "rust_test": 2, "python_baseline": 1, "rust_baseline": 1}
# the layer sets every mode produces: first and last layer, a middle range, windows clipped at both ends, all
CONDITIONS = [
    ko.Condition([29], "29"),
    ko.Condition(list(range(10, 15)), "10-14"),
    ko.Condition([26, 27, 28, 29], "26-29"),
    ko.Condition(list(range(30)), "0-29"),
]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Two samples of each compared group, one of each baseline group (rust_baseline's marker is token 0)."""
    return corpus_subset(tmp_path_factory.mktemp("corpus"), PICK)


@pytest.fixture(scope="module")
def engine(smollm):
    return Engine(smollm.model)


def _cfg(conditions, **kw):
    kw.setdefault("include_baselines", True)
    return dict(conditions=conditions, n_resamples=200, **kw)


def _run(lm, corpus, cfg, runner=None):
    return execute(ko.Knockout(corpus, **cfg, runner=runner), lm, RunOptions())


def _assert_same(fast: dict, naive: dict) -> None:
    assert fast["provenance"]["config"]["runner"]["path"] == "fast"
    assert naive["provenance"]["config"]["runner"]["path"] == "naive"
    for rf, rn in zip(fast["runs"], naive["runs"], strict=True):
        for sf, sn in zip(rf["samples"], rn["samples"], strict=True):
            assert (sf["id"], sf["status"]) == (sn["id"], sn["status"])
            if sf["status"] == "ok":
                assert abs(sf["kl"] - sn["kl"]) <= 1e-6
                assert abs(sf["kl_plip"] - sn["kl_plip"]) <= 1e-6


# -- measures ------------------------------------------------------------------------------------------------------


def _kl_bound(a: np.ndarray, b: np.ndarray, p: np.ndarray, terms: np.ndarray) -> float:
    """Worst-case float64 error of a KL/entropy sum computed two ways (torch vs scipy) from the same logits: each
    log-probability is off by a few ulps of |logit| + |logsumexp|, weighted by p, plus n ulps of the summed |terms|."""
    eps = np.finfo(np.float64).eps
    la, lb = abs(scipy.special.logsumexp(a)), abs(scipy.special.logsumexp(b))
    return float(eps * (8 * np.sum(p * (np.abs(a) + np.abs(b) + la + lb + 1)) + len(p) * np.abs(terms).sum()))


def test_measures_equal_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5000, generator=g) * 4
    b = a + torch.randn(5000, generator=g) * 0.3
    a64, b64 = a.double().numpy(), b.double().numpy()
    p, q = scipy.special.softmax(a64), scipy.special.softmax(b64)
    terms = scipy.special.rel_entr(p, q)
    assert float(kl_divergence(a, b)) == pytest.approx(terms.sum(), abs=_kl_bound(a64, b64, p, terms))
    keep = (p > 1e-10) & (q > 1e-10)
    assert keep.sum() < len(p)  # the floor drops something here
    assert np.abs(np.concatenate([p, q]) / 1e-10 - 1).min() > 1e-6  # and no probability sits on the floor's edge
    assert float(kl_plip(a, b)) == pytest.approx(terms[keep].sum(), abs=_kl_bound(a64, b64, p, terms[keep]))
    h = scipy.special.entr(p)
    assert float(entropy(a)) == pytest.approx(h.sum(), abs=_kl_bound(a64, a64, p, h))
    m = compare_logits(a, b, k=3)
    assert m["kl"] == float(kl_divergence(a, b)) and m["kl_plip"] == float(kl_plip(a, b))
    assert m["entropy_change"] == pytest.approx(scipy.stats.entropy(q) - scipy.stats.entropy(p), rel=1e-9)
    top = np.argsort(-np.abs(q - p))[:3].tolist()
    assert [t["token_id"] for t in m["top_changed"]] == top == [t["token_id"] for t in top_changed(a, b, 3)]
    assert m["top1_changed"] == (int(np.argmax(p)) != int(np.argmax(q)))
    assert compare_logits(a, a)["kl"] == 0.0


# -- identity ------------------------------------------------------------------------------------------------------


def test_identity_is_exactly_zero(smollm, engine, small_corpus):
    """An empty edge set, and knockout on no heads, give KL exactly 0.0 for every sample of the corpus."""
    runner = ConditionRunner(smollm.model, engine)
    for s in load_corpus().samples():
        sp = token_positions(s, smollm.tokenizer)
        m = sp.marker_token
        base = runner.baseline(sp.input_ids)
        outs = runner.run(
            base, [[EdgeEdit([5], [])], [EdgeEdit(range(30), [(q, m) for q in range(m, sp.seq_len)], heads=[])]]
        )
        for o in outs:
            assert o.status == "identity"
            assert float(kl_divergence(base.logits, o.logits)) == 0.0
    res = _run(smollm, small_corpus, _cfg([ko.Condition(list(range(30)), "0-29")], heads=[]))
    ok = [s for s in res["runs"][0]["samples"] if s["status"] == "ok"]
    assert len(ok) == 5 and all(s["kl"] == 0.0 and s["kl_plip"] == 0.0 and not s["top1_changed"] for s in ok)
    assert res["runs"][0]["p"] == 1.0


def test_last_layer_edits_off_the_last_row_are_exactly_zero(smollm, engine, small_corpus):
    """In the last layer a row feeds only its own position's output, so an edit that spares the last row cannot move
    the next-token logits: the runner returns the baseline (KL exactly 0, not a ~1e-13 rounding "effect"). The
    from-scratch eager reference with the edit agrees to its own rounding; an edit on the last row still runs."""
    register_reference()
    ref = variant(variant(smollm.model, "eager"), REF)
    runner = ConditionRunner(smollm.model, engine)
    for s in small_corpus.samples():
        sp = token_positions(s, smollm.tokenizer)
        m, last = sp.marker_token, sp.seq_len - 1
        off_last = [(q, m) for q in range(m + 1, last)]  # (m, m) would empty row 0 when the marker is token 0
        base = runner.baseline(sp.input_ids)
        spared, hit = runner.run(base, [[EdgeEdit([29], off_last)], [EdgeEdit([29], [(last, m)])]])
        assert spared.status == "identity" and float(kl_divergence(base.logits, spared.logits)) == 0.0
        assert hit.status == "ok"
        ids = torch.tensor([sp.input_ids])
        with torch.inference_mode():
            REF_EDITS.clear()
            want = ref(ids).logits[0, -1]
            try:
                REF_EDITS["edits"] = [(29, q, k, None, 0.0) for q, k in off_last]
                spared_ref = ref(ids).logits[0, -1]
                REF_EDITS["edits"] = [(29, last, m, None, 0.0)]
                hit_ref = ref(ids).logits[0, -1]
            finally:
                REF_EDITS.clear()
        assert float(kl_divergence(want, spared_ref)) <= 1e-10  # the reference: unchanged up to rounding
        assert float(kl_divergence(want, hit_ref)) > 1e-8  # while the last row's edit is a real change
        assert abs(float(kl_divergence(base.logits, hit.logits)) - float(kl_divergence(want, hit_ref))) <= 1e-6
    res = _run(smollm, small_corpus, _cfg([ko.Condition([29], "29")], include_baselines=False))
    rows = res["runs"][0]["samples"]
    assert rows and all(r["kl"] == 0.0 and r["note"].startswith("identity: edits only in the last layer") for r in rows)


# -- agreement with an independent computation -----------------------------------------------------------------


def test_kl_equals_explicit_reference(smollm, small_corpus):
    """Eager attention written from scratch (tests/tiny_models.py), knockout = weight 0 and renormalise."""
    eager = variant(smollm.model, "eager")
    register_reference()
    ref = variant(eager, REF)
    ours = variant(smollm.model, "sdpa")
    runner = ConditionRunner(ours, Engine(ours, idle="eager"))  # eager maths in every layer, as the reference
    corpus = {s.id: s for s in small_corpus.samples()}
    c14, c345 = ko.Condition([14], "14"), ko.Condition([3, 4, 5], "3-5")
    cases = [
        ("marker-to-targets", None, [c14, c345]),
        ("to-marker", None, [c345]),
        ("from-marker", None, [c14]),
        ("marker-to-targets", [0, 4], [c14]),
    ]
    checked, bases = 0, {}
    with torch.inference_mode():
        for edges, heads, conditions in cases:
            res = _run(
                smollm, small_corpus, _cfg(conditions, edges=edges, heads=heads, include_baselines=False), runner=runner
            )
            by_id = {s["id"]: s for s in res["samples"]}
            for run in res["runs"]:
                for s in run["samples"]:
                    ids = torch.tensor([token_positions(corpus[s["id"]], smollm.tokenizer).input_ids])
                    REF_EDITS.clear()
                    if s["id"] not in bases:
                        bases[s["id"]] = ref(ids).logits[0, -1]
                    REF_EDITS["edits"] = [
                        (layer, q, k, heads, 0.0) for layer in run["layers"] for q, k in by_id[s["id"]]["edges"]
                    ]
                    try:
                        knocked = ref(ids).logits[0, -1]
                    finally:
                        REF_EDITS.clear()
                    assert abs(s["kl"] - float(kl_divergence(bases[s["id"]], knocked))) <= 1e-6
                    checked += 1
    assert checked == 5 * 4


# -- fast path == naive path ---------------------------------------------------------------------------------------


def test_fast_equals_naive_every_edge_set(smollm, engine, small_corpus):
    for edges in ko.EDGE_KINDS:
        cfg = _cfg(CONDITIONS, edges=edges, heads=[1, 2, 7] if edges == "from-marker" else None)
        fast = _run(smollm, small_corpus, cfg, runner=ConditionRunner(smollm.model, engine, path="fast"))
        naive = _run(smollm, small_corpus, cfg, runner=ConditionRunner(smollm.model, engine, path="naive"))
        _assert_same(fast, naive)
        assert sum(s["status"] == "ok" for s in fast["runs"][0]["samples"]) == 5


@pytest.mark.slow
def test_fast_equals_naive_every_mode(smollm, engine, small_corpus):
    modes = [
        ("layer", {}),
        ("layers", {"layers": parse_layers("10-14", 30)}),
        ("scan-layers", {}),
        ("scan-windows", {"center": 2, "max_radius": 4}),
        ("slide-window", {"window": 4}),
    ]
    for mode, kw in modes:
        for edges in ko.EDGE_KINDS:
            cfg = _cfg(ko.build_conditions(mode, 30, **kw), mode=mode, edges=edges)
            fast = _run(
                smollm, small_corpus, cfg, runner=ConditionRunner(smollm.model, engine, path="fast", max_batch=7)
            )
            naive = _run(smollm, small_corpus, cfg, runner=ConditionRunner(smollm.model, engine, path="naive"))
            _assert_same(fast, naive)


def _windowed(model, layers, edges, scale=0.0, heads=None):
    """An EdgeEdit per window size, without the edges a sliding window already hides (as knockout builds them)."""
    edits = ko.condition_edits(edges, layers, heads, runner_mod.layer_windows(model))
    for e in edits:
        e.scale = scale
    return edits


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_fast_equals_naive_tiny_models(arch):
    """The shortcut is generic: every architecture takes it and matches the naive path, sliding-window ones too
    (their windows, 4 tokens, are shorter than the 14-token input, so the suffix needs prefix keys a sliding cache
    would have dropped)."""
    model = build(arch)
    engine = Engine(model)
    fast = ConditionRunner(model, engine, max_batch=2)
    naive = ConditionRunner(model, engine, path="naive")
    assert fast.path == "fast", fast.reasons
    if arch in SLIDING:
        assert any(w is not None and w < 14 for w in runner_mod.layer_windows(model))
    ids = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(3))
    w = functools.partial(_windowed, model)
    last = model.config.num_hidden_layers - 1
    conds = [
        w([last], [(9, 7), (13, 11)]),  # the last layer, the last row too
        w([0, 2], [(q, 4) for q in range(4, 14)]),
        w([1], [(6, k) for k in range(3, 6)], heads=[1]),
        w([1], [(9, 7)], scale=3.0) + w([2], [(11, 10)]),  # steering too
        w([1], [(0, 0)], scale=3.0) + w([2], [(5, 4)]),  # earliest query 0: no cache to reuse
        [EdgeEdit([0], [(0, 0)])],  # empties row 0
        [EdgeEdit([1], [])],
        w([last], [(9, 7), (9, 8)]),  # the last layer, not the last row: the logits cannot change
    ]
    bf, bn = fast.baseline(ids), naive.baseline(ids)
    assert fast.path == "fast" and bf.kv is not None, fast.reasons  # the baseline did not switch it off
    assert all(k.shape[-2] == 14 for k, _v in bf.kv)  # every layer keeps every position, windowed ones too
    assert torch.equal(bf.logits, bn.logits)
    of, on = fast.run(bf, conds), naive.run(bn, conds)
    assert [o.status for o in of] == [o.status for o in on] == ["ok"] * 5 + ["row-fully-masked", "identity", "identity"]
    for a, b in zip(of[:5], on[:5], strict=True):
        assert (a.logits - b.logits).abs().max() <= 1e-5
        assert abs(float(kl_divergence(bf.logits, a.logits)) - float(kl_divergence(bn.logits, b.logits))) <= 1e-6
    assert float(kl_divergence(bf.logits, of[1].logits)) > 1e-6  # it knocks out something that matters


def test_runner_batch_survives_an_error_inside(monkeypatch):
    """An item that fails inside the batched forward is isolated; the others keep their results."""
    model = build("llama")
    runner = ConditionRunner(model, Engine(model))
    ids = torch.randint(3, 128, (10,), generator=torch.Generator().manual_seed(4))
    conds = [[EdgeEdit([1], [(5, 1)])], [EdgeEdit([1], [(5, k) for k in range(6)])], [EdgeEdit([1], [(5, 3)])]]
    base = runner.baseline(ids)
    want = runner.run(base, conds)
    monkeypatch.setattr(runner_mod, "dead_row", lambda compiled: None)  # let the dead row reach the engine
    got = runner.run(base, conds)
    assert [o.status for o in got] == ["ok", "row-fully-masked", "ok"] == [o.status for o in want]
    assert runner.stats.fallbacks == 1
    assert torch.allclose(got[0].logits, want[0].logits, atol=1e-6)
    assert torch.allclose(got[2].logits, want[2].logits, atol=1e-6)


# -- statuses, conditions, errors ----------------------------------------------------------------------------------


def test_statuses_for_impossible_knockouts(smollm, small_corpus):
    """rust_baseline's marker is token 0: no edges to targets, and to-marker would empty row 0."""
    cond = [ko.Condition([14], "14")]
    for edges, status in (
        ("marker-to-targets", "no-edges"),
        ("to-marker", "row-fully-masked"),
        ("from-marker", "no-edges"),
    ):
        res = _run(smollm, small_corpus, _cfg(cond, edges=edges))
        bad = [s for s in res["runs"][0]["samples"] if s["group"] == "rust_baseline"]
        assert [(s["status"], s["kl"]) for s in bad] == [(status, None)]
        assert [e["status"] for e in res["excluded"]] == [status]
        assert res["runs"][0]["groups"]["rust_baseline"]["n"] == 0
        assert res["runs"][0]["groups"]["python_doctest"]["n"] == 2


def test_build_conditions():
    assert ko.build_conditions("layer", 30)[0].layers == [16]  # PLIP's default for 28-31 layers
    assert ko.build_conditions("layers", 30, layers=parse_layers("3-5", 30))[0].layers == [3, 4, 5]
    assert [c.layers for c in ko.build_conditions("scan-layers", 3)] == [[0], [1], [2]]
    assert [c.layers for c in ko.build_conditions("scan-windows", 4, center=1, max_radius=5)] == [
        [1],
        [0, 1, 2],
        [0, 1, 2, 3],
    ]  # clipped windows that repeat are dropped
    assert [c.label for c in ko.build_conditions("slide-window", 30, window=28)] == ["0-27", "1-28", "2-29"]


def test_bad_input_raises_one_clear_error(smollm, small_corpus, tmp_path):
    with pytest.raises(PlipyError, match="layer 30 does not exist"):
        ko.build_conditions("layer", 30, layer=30)
    with pytest.raises(PlipyError, match="layer 40 does not exist"):
        plipy.knockout(smollm, small_corpus, layers="5-40")
    with pytest.raises(PlipyError, match="empty"):
        plipy.knockout(smollm, small_corpus, layers="7-3")
    with pytest.raises(PlipyError, match="width"):
        ko.build_conditions("slide-window", 30, window=31)
    with pytest.raises(PlipyError, match="layer 31 does not exist"):
        _run(smollm, small_corpus, _cfg([ko.Condition([31], "31")]))
    with pytest.raises(PlipyError, match="head 9 does not exist"):
        _run(smollm, small_corpus, _cfg([ko.Condition([3], "3")], heads=[9]))
    with pytest.raises(PlipyError, match="no usable sample"):
        _run(smollm, _unusable_corpus(tmp_path), _cfg([ko.Condition([3], "3")]))


def _unusable_corpus(tmp_path):
    code = "#[derive(Debug)]\nstruct S;"
    item = {
        "marker_char_pos": 0,
        "marker_pattern": "#[",
        "code": code,
        "target_char_positions": [code.index("struct"), code.index("S;")],
    }
    path = tmp_path / "unusable.json"
    path.write_text(
        json.dumps({"a": [dict(item, id="a1"), dict(item, id="a2")], "b": [dict(item, id="b1"), dict(item, id="b2")]})
    )
    return load_corpus(path)


# -- CLI -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def main(monkeypatch, smollm):
    """`plipy` with the knockout command registered and the session model (no reload per call)."""
    register = cli._register

    def with_knockout():
        register()
        if not any(c.name == "knockout" for c in cli.app.registered_commands):
            cli.app.command("knockout")(ko_cli.knockout)

    monkeypatch.setattr(cli, "_register", with_knockout)
    monkeypatch.setattr("plipy.models.load_model", lambda *a, **k: smollm)
    return cli.main


def test_cli_end_to_end(main, small_corpus, tmp_path, capsys):
    out = tmp_path / "ko.json"
    try:
        main(
            [
                "knockout",
                "--corpus",
                str(small_corpus.path),
                "--layer",
                "14",
                "--include-baselines",
                "--plot",
                "--resamples",
                "200",
                "--out",
                str(out),
            ]
        )
    except SystemExit as e:  # success may return or exit 0
        assert e.code in (0, None)
    data = json.loads(out.read_text())
    assert data["provenance"]["model"]["spec"] == "smollm2-135m"
    assert data["provenance"]["config"]["runner"]["path"] == "fast"
    run = data["runs"][0]
    assert run["layers"] == [14] and run["edges"] == "marker-to-targets" and run["heads"] == list(range(9))
    assert {"t", "df", "p", "p_holm", "hedges_g", "ci_diff", "ratio"} <= set(run)
    assert set(run["groups"]["python_doctest"]) >= {"n", "mean", "std", "median"}
    assert all({"id", "group", "kl", "status"} <= set(s) for s in run["samples"])
    assert [s["status"] for s in run["samples"]].count("no-edges") == 1
    for suffix in ("-heatmap.png", "-means.png"):
        assert (tmp_path / f"ko{suffix}").read_bytes()[:4] == b"\x89PNG"
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "ko.parquet").num_rows == 6
    captured = capsys.readouterr()
    assert "Knockout" in captured.out and "excluded" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "30"], "error: --layer: layer 30 does not exist"),
        (["--heads", "9"], "error: --heads: head 9 does not exist"),
        (
            ["--layer", "3", "--scan-layers"],
            "error: --layer/--layers/--scan-layers/--scan-windows/--slide-window: choose one mode",
        ),
        (["--edges", "all"], "error: --edges: must be one of"),
    ],
)
def test_cli_bad_input(main, small_corpus, tmp_path, capsys, args, message):
    out = tmp_path / "x.json"
    with pytest.raises(SystemExit) as e:
        main(["knockout", "--corpus", str(small_corpus.path), "--out", str(out), *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(message)
    assert not out.exists()


def test_cli_unusable_corpus(main, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["knockout", "--corpus", str(_unusable_corpus(tmp_path).path), "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert capsys.readouterr().err.lstrip().startswith("error: no usable sample")  # after the progress bar
