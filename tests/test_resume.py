"""Resume after kill -9: a long command killed mid-run and run again gives the same bytes as an uninterrupted run.

Each case kills the real CLI (`python -m plipy`) once some samples are checkpointed, reruns the same command to the
end, and compares its JSON (provenance aside) and table bytes with an uninterrupted run through the Python API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import corpus_subset
from plipy.runtime.checkpoint import Units, fingerprint


def _units(runs: Path, pattern: str = "*/unit-*.json") -> int:
    return sum(1 for _ in runs.glob(pattern))


def _kill_after_units(
    cmd: list[str], env: dict[str, str], runs: Path, cwd: Path, n: int = 1, pattern: str = "*/unit-*.json"
) -> None:
    """Start `cmd`, SIGKILL it as soon as `n` units (of the run folders `pattern` matches) are on disk; the kill
    must land before it finished."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    deadline = time.monotonic() + 300
    while _units(runs, pattern) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]


def _doc(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("provenance")
    return data


def _long_corpus(directory: Path, copies: int):
    """The bundled PLIP groups repeated `copies` times (distinct ids): enough samples that a scan can be caught
    mid-run."""
    from plipy.corpus import load_corpus

    full = load_corpus()
    data: dict = {"_format_version": "2.0"}
    for g in ("python_doctest", "rust_test"):
        data[g] = [
            {
                "id": f"{s.id}#{c}",
                "code": s.code,
                "marker_char_pos": s.marker_char_pos,
                "marker_pattern": s.marker_pattern,
                "target_char_positions": list(s.target_char_positions),
            }
            for c in range(copies)
            for s in full.groups[g]
        ]
    path = directory / "long.json"
    path.write_text(json.dumps(data))
    return load_corpus(path)


CASES = {
    "scan": (["scan"], {}),
    "knockout": (["knockout", "--scan-layers"], {"scan_layers": True}),
    "dose": (["steer", "dose", "--groups", "rust_test,python_doctest"], {"groups": "rust_test,python_doctest"}),
    # two phases (the clean edge masses, then the conditions): the kill may land in either
    "knockout mean": (
        ["knockout", "--scan-layers", "--ablation", "mean"],
        {"scan_layers": True, "ablation": "mean"},
    ),
    "qk": (["qk", "--layer", "13", "--per-head-components"], {"layer": 13, "per_head_components": True}),
    "patch": (
        ["patch", "heads", "--layers", "12-14", "--positions", "marker,last"],
        {"layers": "12-14", "positions": "marker,last"},
    ),
}
SLOW_CASES = {"knockout mean", "qk", "patch"}  # the newer experiments: in `make test-slow`
NO_RESAMPLES = {"dose", "qk"}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_CASES else k for k in CASES])
def test_killed_run_resumes_to_identical_bytes(kind, smollm, tmp_path, monkeypatch):
    import plipy

    corpus = (
        _long_corpus(tmp_path, 4) if kind == "scan" else corpus_subset(tmp_path, {"python_doctest": 2, "rust_test": 3})
    )
    runs = tmp_path / "runs"
    env = {**os.environ, "PLIPY_RUNS": str(runs)}
    args, api_kw = CASES[kind]
    common = ["--corpus", str(corpus.path), "--table-format", "csv"]
    if kind not in NO_RESAMPLES:
        common += ["--resamples", "300"]
    out = tmp_path / "resumed.json"
    cmd = [sys.executable, "-m", "plipy", *args, *common, "--out", str(out)]

    _kill_after_units(cmd, env, runs, tmp_path, n=2)
    assert not out.exists() and _units(runs) >= 2
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed)" in done.stderr  # the progress bar says how much an earlier run did
    assert _units(runs) == 0 and not any(runs.iterdir())  # the units go once the result is complete

    # the reference: one uninterrupted run, nothing kept or resumed
    fn = {
        "scan": plipy.scan,
        "knockout": plipy.knockout,
        "dose": plipy.steer.dose,
        "knockout mean": plipy.knockout,
        "qk": plipy.qk,
        "patch": plipy.patch.heads,
    }[kind]
    kw = {} if kind in NO_RESAMPLES else {"resamples": 300}
    ref = fn(smollm, corpus.path, resume=False, **api_kw, **kw)
    ref_files = ref.save(tmp_path / "reference.json", table_format="csv")
    assert _doc(out) == _doc(Path(ref_files["json"]))
    assert out.with_suffix(".csv").read_bytes() == Path(ref_files["table"]).read_bytes()
    if kind == "scan":  # the attention rows of the token view too, resumed samples included
        assert out.with_name("resumed-rows.npz").read_bytes() == Path(ref_files["rows"]).read_bytes()
    # and byte for byte once provenance is set aside: the same numbers written the same way
    strip = {k: v for k, v in json.loads(out.read_text()).items() if k != "provenance"}
    strip_ref = {k: v for k, v in json.loads(Path(ref_files["json"]).read_text()).items() if k != "provenance"}
    assert json.dumps(strip) == json.dumps(strip_ref)


# the fits' run folder (`probe-<fingerprint>`), not the residuals' (`probe-features-<fingerprint>`)
PROBE_FITS = "probe-" + "?" * 16 + "/unit-*.json"
LENS_CASES = {
    "lens": (["lens", "--file", "text.txt", "--positions", "all", "--token", " test"], "*/unit-*.json"),
    "lens emergence": (["lens", "emergence", "--top-k", "20"], "*/unit-*.json"),
    "probe": (["probe", "--permutations", "3", "--folds", "2"], "*/unit-*.json"),  # killed among the residuals
    "probe fits": (["probe", "--permutations", "5", "--folds", "3"], PROBE_FITS),  # killed among the fits
}


@pytest.mark.parametrize("kind", list(LENS_CASES))
def test_killed_lens_and_probe_runs_resume_to_identical_bytes(kind, smollm, tmp_path):
    """`plipy lens`, `plipy lens emergence` and `plipy probe` (either of its two phases) killed once 2 units are on
    disk and run again: the bytes of one uninterrupted run."""
    import plipy
    from plipy.corpus import load_corpus

    args, pattern = LENS_CASES[kind]
    # a text long enough (every position, 30 layers) that the lens is caught between its batches of layers
    text = "\n\n".join(s.code for s in load_corpus().samples()[:8])
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    corpus = corpus_subset(tmp_path, {"python_doctest": 6, "rust_test": 6}) if kind.startswith("probe") else None
    common = ["--table-format", "csv", *(["--corpus", str(corpus.path)] if corpus else [])]
    runs, out = tmp_path / "runs", tmp_path / "resumed.json"
    env = {**os.environ, "PLIPY_RUNS": str(runs)}
    cmd = [sys.executable, "-m", "plipy", *args, *common, "--out", str(out)]
    _kill_after_units(cmd, env, runs, tmp_path, n=2, pattern=pattern)
    assert not out.exists() and _units(runs, pattern) >= 2
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed)" in done.stderr
    assert _units(runs) == 0 and not any(runs.iterdir())  # both phases' units go once the result is complete
    if kind == "lens":
        ref = plipy.lens(smollm, text, positions="all", tokens=[" test"], resume=False)
    elif kind == "lens emergence":
        ref = plipy.emergence(smollm, top_k=20, resume=False)
    else:
        folds, perms = (2, 3) if kind == "probe" else (3, 5)
        ref = plipy.probe(smollm, corpus.path, folds=folds, permutations=perms, resume=False)
    ref_files = ref.save(tmp_path / "reference.json", table_format="csv")
    assert out.with_suffix(".csv").read_bytes() == Path(ref_files["table"]).read_bytes()
    strip = {k: v for k, v in json.loads(out.read_text()).items() if k != "provenance"}
    strip_ref = {k: v for k, v in json.loads(Path(ref_files["json"]).read_text()).items() if k != "provenance"}
    assert json.dumps(strip) == json.dumps(strip_ref)  # same keys, same order, same numbers


def test_units_refuse_another_runs_folder_and_fresh_starts_over(tmp_path):
    folder = tmp_path / "run"
    u = Units(folder, fingerprint({"a": 1}))
    u.put(0, {"x": float("nan"), "y": [0.1, 1e-300]})
    got = Units(folder, fingerprint({"a": 1})).get(0)
    assert got is not None and got[0]["y"] == [0.1, 1e-300] and got[0]["x"] != got[0]["x"]  # NaN kept
    with pytest.raises(plipy_error(), match="different run"):
        Units(folder, fingerprint({"a": 2}))
    fresh = Units(folder, fingerprint({"a": 2}), fresh=True)
    assert fresh.get(0) is None
    fresh.put(0, {"x": 1.0})  # the folder (and its meta.json) is made with the first unit
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(plipy_error(), match="corrupt"):
        Units(folder, fingerprint({"a": 2}))


def test_a_wrapped_model_keeps_no_units(tmp_path, monkeypatch):
    """A model plipy did not load has no weights hash: two such models may share a config, so nothing resumes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import plipy
    from plipy.models import load_tokenizer

    monkeypatch.setenv("PLIPY_RUNS", str(tmp_path / "runs"))
    tok, _ = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).eval()
    corpus = corpus_subset(tmp_path, {"python_doctest": 2, "rust_test": 2})
    from plipy.models import wrap_model
    from plipy.runtime.checkpoint import open_run

    units = open_run("scan", wrap_model(model, tok), corpus, {})
    assert units.folder is None
    plipy.scan(model, corpus, tokenizer=tok, resamples=10)
    assert not (tmp_path / "runs").exists()


def plipy_error():
    from plipy.errors import PlipyError

    return PlipyError
