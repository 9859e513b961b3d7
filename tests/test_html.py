"""Interactive HTML reports, opened in a real headless Chromium: no console errors, no request to any host, the
expected plots and the token view drawn, clicks on figures driving the token view and detail panels, and the
numbers the page shows equal to the result's (the token view's against the scan's own per-target measures)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

import plipy
from conftest import corpus_subset
from plipy.cli import main
from plipy.errors import PlipyError
from plipy.report.html import browser as hb
from plipy.report.html.knockout import samples_order
from plipy.report.html.page import _script_json

# Head means in JS and numpy sum ≤ 9 float32 values (each ≤ 1) in float64 in different orders: they agree to a few
# ulps of 1, far inside this; a wrong head, layer, key or sample differs by orders of magnitude more.
MEAN_TOL = 1e-12


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return corpus_subset(tmp_path_factory.mktemp("corpus"), {"python_doctest": 3, "rust_test": 3})


@pytest.fixture(scope="module")
def scan_r(smollm, small):
    return plipy.scan(smollm, small, layers="0-3", resamples=200)


@pytest.fixture(scope="module")
def browser():
    if hb.find_chromium() is None:
        pytest.skip("no Chromium found (Debian's `chromium`; .ci/run installs it): browser checks not run")
    with hb.chromium() as b:
        yield b


def _cli(argv):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), e


def _open(browser, path):
    opened = hb.open_report(browser, path)
    assert opened.errors == [], opened.errors
    assert [k for k, _ in opened.console if k in ("error", "warning")] == [], opened.console
    assert opened.foreign_requests() == [], opened.foreign_requests()
    return opened


def _data(page):
    return page.evaluate("JSON.parse(document.getElementById('plipy-data').textContent)")


def _drawn(page, fid):
    """A plotly figure is drawn: its SVG exists and it holds traces."""
    return page.evaluate(
        "(id) => { const gd = document.getElementById(id);"
        " return !!gd && !!gd.querySelector('.main-svg') && gd.data.length > 0; }",
        fid,
    )


def _click(page, fid, xi, yi):
    """A real mouse click at the centre of category (xi, yi) of a figure's axes."""
    page.locator(f"#{fid}").scroll_into_view_if_needed()
    x, y = page.evaluate(
        """([id, xi, yi]) => {
        const gd = document.getElementById(id), r = gd.getBoundingClientRect();
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        return [r.left + xa._offset + xa.l2p(xi), r.top + ya._offset + ya.l2p(yi)]; }""",
        [fid, xi, yi],
    )
    page.mouse.click(x, y)


def _weights(page, tid):
    return page.evaluate(f"[...document.querySelectorAll('#{tid} .tok[data-w]')].map(s => Number(s.dataset.w))")


def _view(page, tid):
    return page.evaluate(
        "(id) => { const d = document.getElementById(id).dataset; return [d.sample, Number(d.layer), d.head]; }", tid
    )


# -- without a browser ---------------------------------------------------------------------------------------------


def test_rows_travel_exactly_and_script_json_cannot_close_the_tag(scan_r):
    from plipy.report.html.scan import token_payload

    shown = [s for s in scan_r["samples"] if "attention" in s]
    p = token_payload(scan_r, shown)
    for s, enc in zip(shown, p["samples"], strict=True):
        rows = scan_r.extras["rows"][s["id"]]
        m = s["marker_token"]
        got = np.frombuffer(base64.b64decode(enc["rows"]), dtype="<f4").reshape(rows.shape[0], rows.shape[1], m + 1)
        assert np.array_equal(got, rows[:, :, : m + 1])  # bit for bit
        assert not rows[:, :, m + 1 :].any()  # what is cut is causally masked: exactly 0
        assert enc["tokens"] == scan_r.token_texts(s["id"])
    text = _script_json({"a": "</script><script>alert(1)</script>"})
    assert "</" not in text and json.loads(text) == {"a": "</script><script>alert(1)</script>"}


def test_report_is_deterministic_and_offline_by_policy(scan_r):
    a, b = scan_r.to_html(), scan_r.to_html()
    assert a == b  # no clock in the page: the same result gives the same bytes
    assert "default-src 'none'" in a  # the browser itself refuses any request the page might try
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']?(https?:)?//""", a)
    assert a.count("<script>") == 2  # plotly.js once, page.js once (+ the JSON data block)


def test_saved_rows_sidecar_round_trips(scan_r, tmp_path):
    files = scan_r.save(tmp_path / "scan.json", html=True)
    assert files["rows"] == str(tmp_path / "scan-rows.npz") and files["html"] == str(tmp_path / "scan.html")
    assert json.loads((tmp_path / "scan.json").read_text())["provenance"]["files"] == files
    back = plipy.load_result(tmp_path / "scan.json")
    assert back.has_rows and set(back.extras["rows"]) == set(scan_r.extras["rows"])
    for sid, rows in scan_r.extras["rows"].items():
        assert np.array_equal(back.extras["rows"][sid], rows) and back.extras["rows"][sid].dtype == np.float32
        assert back.token_texts(sid) == scan_r.token_texts(sid)
        assert back.extras["input_ids"][sid] == scan_r.extras["input_ids"][sid]
    assert set(back.plot()) == {"layers", "heads", "tokens"}  # the token plot works from the files
    again = tmp_path / "again.json"
    back.save(again)  # the sidecar's bytes depend only on the arrays (no zip timestamps)
    assert (tmp_path / "again-rows.npz").read_bytes() == (tmp_path / "scan-rows.npz").read_bytes()
    (tmp_path / "scan-rows.npz").unlink()
    lost = plipy.load_result(tmp_path / "scan.json")  # the JSON is still the result; the token view says why not
    assert not lost.has_rows and "No token view" in lost.to_html() and "scan-rows.npz is missing" in lost.to_html()
    with pytest.raises(PlipyError, match="scan-rows.npz is missing"):
        lost.plot("tokens")


def test_a_kind_without_a_view_gets_its_plots_and_a_kind_can_plug_in_one(smollm, small, tmp_path):
    cal = plipy.steer.calibrate(smollm, small, layer=27)

    from plipy.report import steer as report_steer
    from plipy.results import Result
    from plipy.results.views import VIEWS

    class Plain(Result):  # a result kind that has not written an HTML view yet: a summary and a plot
        kind = "plain"

    VIEWS.summary(Plain)(report_steer.calibrate_summary)
    VIEWS.figure(Plain, "groups")(report_steer.calibrate_figure)

    class Custom(type(cal)):  # one that plugs in its own with one function
        kind = "custom"

    VIEWS.html(Custom)(custom_view)

    plain = Plain(cal.to_dict()).to_html()
    assert plain.count('<img class="png" alt="figure-groups" src="data:image/png;base64,') == 1
    assert "Console summary" in plain and "Provenance" in plain
    assert "custom view of layer 27" in Custom(cal.to_dict()).to_html()


def custom_view(result, sec):
    sec.text("hello", f"custom view of layer {result['layer']}")


def test_word_diff_marks_what_changed():
    from plipy.report.html.steer import word_diff

    assert word_diff("fn a() {\n  x < 1", "fn b() {\n  x < 1 }") == (
        "fn <del>a()</del><ins>b()</ins> {\n  x &lt; 1<ins> }</ins>"
    )


# -- in the browser ------------------------------------------------------------------------------------------------


def test_scan_report_in_browser_clicks_drive_the_token_view(scan_r, browser, tmp_path):
    path = tmp_path / "scan.html"
    scan_r.to_html(path)
    o = _open(browser, path)
    page = o.page
    for fid in ("r0-layers", "r0-excess", "r0-heads"):
        assert _drawn(page, fid), fid
    sig = int((np.nan_to_num(np.array(scan_r["per_head"]["p_bh"], dtype=float), nan=1) < 0.05).sum())
    assert page.evaluate("document.getElementById('r0-heads').layout.shapes.length") == sig  # BH outlines
    # the token view: the first measured sample at the scan's token layer, head mean
    shown = [s for s in scan_r["samples"] if "attention" in s]
    s0 = shown[0]
    layers = scan_r["layers_scanned"]
    sid, layer, head = _view(page, "r0-tokens")
    assert (sid, layer, head) == (s0["id"], scan_r.token_layer(), "mean")
    n_tok = page.evaluate("document.querySelectorAll('#r0-tokens .tok').length")
    assert n_tok == s0["n_tokens"] == len(scan_r.token_texts(s0["id"]))
    marker = page.evaluate(
        "[...document.querySelectorAll('#r0-tokens .tok')].findIndex(s => s.classList.contains('marker'))"
    )
    assert marker == s0["marker_token"]
    rows = scan_r.extras["rows"][s0["id"]].astype(np.float64)
    li = layers.index(layer)
    expect = rows[li][scan_r["heads"]].mean(0)[: s0["marker_token"] + 1]
    assert np.allclose(_weights(page, "r0-tokens"), expect, rtol=0, atol=MEAN_TOL)
    # per-target bars (JS, from the rows) = the scan's own attention_per_target (torch float64, measure_sample)
    bars = page.evaluate("Array.from(document.querySelector('#r0-tokens .tv-bars').data[0].y)")
    assert np.allclose(bars, s0["attention_per_target"][li], rtol=0, atol=MEAN_TOL)
    # a real click on heatmap cell (layer L, head H) shows exactly that head's row at that layer
    L = next(x for x in layers if x != layer)
    H = 4
    _click(page, "r0-heads", scan_r["per_head"]["heads"].index(H), scan_r["per_head"]["layers"].index(L))
    page.wait_for_function(f"document.getElementById('r0-tokens').dataset.layer === '{L}'")
    assert _view(page, "r0-tokens") == [s0["id"], L, str(H)]
    one_head = scan_r.extras["rows"][s0["id"]][layers.index(L), H, : s0["marker_token"] + 1]
    assert _weights(page, "r0-tokens") == [float(w) for w in one_head]  # float32 values, bit for bit
    # the controls: another sample from the picker, back to the head mean
    page.select_option("#r0-tokens .tv-sample", "2")
    page.select_option("#r0-tokens .tv-head", "mean")
    s2 = shown[2]
    assert _view(page, "r0-tokens") == [s2["id"], L, "mean"]
    bars = page.evaluate("Array.from(document.querySelector('#r0-tokens .tv-bars').data[0].y)")
    assert np.allclose(bars, s2["attention_per_target"][layers.index(L)], rtol=0, atol=MEAN_TOL)
    assert o.foreign_requests() == [] and o.errors == []


def test_two_scans_side_by_side_each_column_its_own_token_view(smollm, small, scan_r, browser, tmp_path):
    other = plipy.scan(smollm, small, layers="1,3", heads="0-4", resamples=200)
    path = tmp_path / "cmp.html"
    plipy.html_report([scan_r, other], path)
    page = _open(browser, path).page
    assert page.evaluate("document.querySelectorAll('.row[style*=\"--n:2\"]').length") >= 5
    assert page.evaluate("document.querySelectorAll('.tokens').length") == 2
    before = _view(page, "r0-tokens")
    _click(page, "r1-heads", 2, 0)  # head 2, layer 1 of the second scan
    page.wait_for_function("document.getElementById('r1-tokens').dataset.head === '2'")
    assert _view(page, "r1-tokens")[1:] == [1, "2"] and _view(page, "r0-tokens") == before
    sid = _view(page, "r1-tokens")[0]
    s = next(x for x in other["samples"] if x["id"] == sid)
    # the second scan's metric averages heads 0-4: its head-mean view uses them
    page.select_option("#r1-tokens .tv-head", "mean")
    bars = page.evaluate("Array.from(document.querySelector('#r1-tokens .tv-bars').data[0].y)")
    assert np.allclose(bars, s["attention_per_target"][0], rtol=0, atol=MEAN_TOL)


def test_knockout_report_heatmap_click_shows_changed_tokens(smollm, small, browser, tmp_path):
    k = plipy.knockout(smollm, small, scan_windows=True, center=28, max_radius=1, resamples=200)  # cheap: late
    path = tmp_path / "ko.html"
    k.to_html(path)
    page = _open(browser, path).page
    for fid in ("r0-heatmap", "r0-means"):
        assert _drawn(page, fid)
    runs = k["runs"]
    best = max((s["kl"], ci, s["id"]) for ci, r in enumerate(runs) for s in r["samples"] if s["kl"] is not None)
    assert page.evaluate("document.getElementById('r0-changed').dataset.key") == f"{best[1]}|{best[2]}"
    # click the cell of the first sample under the first condition (samples are columns, conditions rows)
    sid = samples_order(k)[0][0]
    first = next(x for x in runs[0]["samples"] if x["id"] == sid)
    _click(page, "r0-heatmap", 0, 0)
    page.wait_for_function(f"document.getElementById('r0-changed').dataset.key === '0|{first['id']}'")
    text = page.inner_text("#r0-changed")
    assert first["id"] in text and f"{first['kl']:.2e}" in text
    shown = page.evaluate(
        "[...document.querySelectorAll('#r0-changed tbody tr td:nth-child(2)')].map(td => Number(td.textContent))"
    )
    assert shown == [t["token_id"] for t in first["top_changed"]]
    z = page.evaluate("document.getElementById('r0-heatmap').data[0].z")
    assert z[0][0] == pytest.approx(np.log10(first["kl"]), rel=1e-12)


def test_steer_and_sae_reports_in_browser(smollm, tmp_path, browser):
    from plipy import sae as saes

    two = corpus_subset(tmp_path, {"python_doctest": 2, "rust_test": 2})
    d = plipy.steer.dose(smollm, two, layer=27, doses="0.5,1,2", target_attention=0.1)  # late layers: cheap
    cal = plipy.steer.calibrate(smollm, two, layer=27)
    gen = plipy.steer.generate(smollm, layer=27, limit=1, max_tokens=6, scale=6)
    sae_dir = tmp_path / "sae"
    saes.save_saelens(
        saes.random_sae(576, 32, hook_name="blocks.4.hook_resid_post", seed=3), sae_dir, model_name="smollm2-135m"
    )
    rows = [
        {"prompt": "The city Paris is located in", "entity": "Paris", "entity_type": "city", "label": "known"},
        {
            "prompt": "The city Velmorath is located in",
            "entity": "Velmorath",
            "entity_type": "city",
            "label": "unknown",
        },
    ]
    s = plipy.sae_attention(smollm, sae_dir, 5, rows, coeff=40, random=2, measures="attn_weights")
    path = tmp_path / "all.html"
    plipy.html_report([d, cal, gen, s], path)
    page = _open(browser, path).page
    data = _data(page)
    expect = {
        "r0-kl",
        "r0-attention",
        "r0-target",
        "r1-groups",
        "r1-scales",
        "r2-preserved",
        "r3-bars-attn_weights",
        "r3-scatter-attn_weights",
        "r3-heatmap-attn_weights",
        "r3-boxes-attn_weights",
    }
    assert set(data["figures"]) == expect
    for fid in expect:
        assert _drawn(page, fid), fid
    # dose: the plotted group mean at each α is the mean of the samples' KLs in the result
    means = page.evaluate("document.getElementById('r0-kl').data[2].y")
    runs = sorted(d["doses"], key=lambda r: r["scale"])
    assert np.allclose(
        means, [np.mean([x["kl"] for x in r["samples"] if x["status"] == "ok"]) for r in runs], rtol=1e-12, atol=0
    )
    assert means[1] == 0.0  # α = 1: KL exactly 0
    # a click on the target-α scatter (log axis: its linear coordinate is log10 α) opens that sample's panel
    t0 = d["target"]["samples"][0]
    _click(page, "r0-target", 0, float(np.log10(t0["scale"])))
    page.wait_for_function(f"document.getElementById('r0-changed').dataset.key === 'target|{t0['id']}'")
    assert f"{t0['kl']:.2e}" in page.inner_text("#r0-changed")
    # generation diffs and the Fisher line
    assert page.locator("[data-key='diffs'] .gen").count() == len(gen["samples"])
    # SAE: the heatmap marks the steering layer; the random-latent table lists each random latent per label
    shapes = page.evaluate("document.getElementById('r3-heatmap-attn_weights').layout.shapes")
    assert [sh["y0"] for sh in shapes] == [s["layer"] - 0.5]
    cells = page.evaluate("[...document.querySelectorAll('[data-key=\"tests-attn_weights\"] tbody tr')].length")
    assert cells == 2 * len(s["random_latents"])
    bars = page.evaluate("Array.from(document.getElementById('r3-bars-attn_weights').data[0].y)")
    ph = {h["head"]: h["mean_difference"] for h in s["measures"]["attn_weights"]["per_head"]}
    diff = s.arrays["steered"][5]["attn_weights"] - s.arrays["original"]["attn_weights"]
    want = [
        float(diff[:, int(h[1:].split("H")[0]), int(h.split("H")[1])].astype(np.float64).mean()) for h in s["heads"]
    ]
    assert bars == [ph[h] for h in s["heads"]]  # the result's numbers, as saved
    assert np.allclose(bars, want, rtol=1e-6, atol=1e-9)  # and the arrays' (float32 differences, averaged)


def test_cli_report_and_html_flag(small, browser, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _cli(["scan", "--corpus", str(small.path), "--layers", "0-1", "--resamples", "100", "--out", "s.json", "--html"])
    out = capsys.readouterr().out
    assert "s.html" in out and "s-rows.npz" in out
    _open(browser, tmp_path / "s.html")
    _cli(["report", "s.json", "s.json", "-o", "two.html", "--title", "twice"])
    page = _open(browser, tmp_path / "two.html").page
    assert page.title() == "twice" and page.evaluate("document.querySelectorAll('.tokens').length") == 2
    for argv, msg in (
        (["report", "missing.json"], "no such result file"),
        (["report", str(small.path)], "not a plipy result file"),
        (["report", "s.json", "-o", "r.txt"], "a report is an .html file"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    assert not (tmp_path / "r.txt").exists() and not (tmp_path / "missing.html").exists()


@pytest.mark.slow
def test_30_sample_scan_report_size_and_load(smollm, browser, tmp_path):
    r = plipy.scan(smollm, groups="python_doctest,rust_test,python_baseline,rust_baseline", resamples=200)
    assert len(r["samples"]) == 30 and len(r["layers_scanned"]) == 30
    measured = sum("attention" in s for s in r["samples"])  # baselines whose targets follow the marker are not
    path = tmp_path / "scan30.html"
    r.to_html(path)
    size = path.stat().st_size
    assert size < 10e6, f"{size / 1e6:.2f} MB"
    o = _open(browser, path)
    n = o.page.evaluate("document.querySelectorAll('#r0-tokens .tv-sample option').length")
    assert n == measured
    # speed goals are measured by benchmarks/html_report.py; this only catches a page that hangs
    print(f"30-sample scan report: {size / 1e6:.2f} MB, drawn in {o.ready_ms:.0f} ms")
    assert o.ready_ms < 20000


def test_lens_emergence_and_probe_reports_in_browser(smollm, small, browser, tmp_path):
    """The logit lens, emergence and probe views draw their figures from the result's own numbers."""
    lens = plipy.lens(smollm, "fn add(a: i32) -> i32 {\n}\n\n#[", positions="all", top_k=5, tokens=["test"])
    emerge = plipy.emergence(smollm, top_k=20)
    probe = plipy.probe(smollm, small, layers="0,10,29", folds=3, permutations=20)
    for name, r, figs in (
        ("lens", lens, ["grid", "tracked"]),
        ("emergence", emerge, ["ranks"]),
        ("probe", probe, ["accuracy"]),
    ):
        path = tmp_path / f"{name}.html"
        r.to_html(path)
        opened = _open(browser, path)
        page = opened.page
        ids = [fid for fid in _data(page)["figures"] if any(fid.endswith("-" + f) for f in figs)]
        assert len(ids) == len(figs), (name, list(_data(page)["figures"]))
        assert all(_drawn(page, fid) for fid in ids), name
        if name == "lens":
            gd = page.evaluate(f"document.getElementById('{ids[0]}').data[0].z")
            want = [[lay["top"][0]["prob"] for lay in p["layers"]] for p in lens["positions"]]
            assert np.allclose(gd, want, rtol=0, atol=0)
        if name == "probe":
            y = page.evaluate(f"document.getElementById('{ids[0]}').data[2].y")
            assert y == [row["accuracy"] for row in probe["layers"]]
        page.close()
