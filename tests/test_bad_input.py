"""Bad input through the real CLI: one `error:` line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json

import pytest

from plipy.cli import main


def _nested(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    return p


def _truncated_npz(tmp_path):
    import numpy as np

    p = tmp_path / "params.npz"
    np.savez(p, W_enc=np.zeros((4, 8), np.float32), W_dec=np.zeros((8, 4), np.float32))
    p.write_bytes(p.read_bytes()[:200])
    return p


def _truncated_gguf(tmp_path, n_bytes):
    from plipy.models import resolve_alias

    p = tmp_path / f"cut-{n_bytes}.gguf"
    with open(resolve_alias("smollm2-135m"), "rb") as f:
        p.write_bytes(f.read(n_bytes))
    return p


def _pickle_only_dir(tmp_path):
    """A model folder whose weights exist only as a pickle (`pytorch_model.bin`)."""
    import torch
    from transformers import LlamaConfig

    d = tmp_path / "pickled"
    d.mkdir()
    LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ).save_pretrained(d)
    torch.save({"lm_head.weight": torch.zeros(64, 16)}, d / "pytorch_model.bin")
    return d


def _one_sample_group(tmp_path):
    from conftest import corpus_subset

    d = tmp_path / "one"
    d.mkdir()
    return corpus_subset(d, {"python_doctest": 1, "rust_test": 3}).path


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from plipy import sae as saes

    tmp_path = tmp_path_factory.mktemp("bad")
    sae_dir = tmp_path / "sae"
    saes.save_saelens(saes.random_sae(576, 8, hook_name="blocks.4.hook_resid_post"), sae_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The city Paris is", "entity": "Paris", "entity_type": "city"}))
    return {
        "npz": _truncated_npz(tmp_path),
        "deep": _nested(tmp_path),
        "sae": sae_dir,
        "prompts": prompts,
        "gguf1": _truncated_gguf(tmp_path, 1_000_000),
        "gguf98": _truncated_gguf(tmp_path, 98_000_000),
        "pickled": _pickle_only_dir(tmp_path),
        "one": _one_sample_group(tmp_path),
    }


CASES = [
    (["scan", "--layers", ""], "--layers: is empty"),
    (["scan", "--resamples", "0"], "--resamples: must be an integer ≥ 1"),
    (["scan", "--groups", "nope,rust_test"], "unknown group"),
    (["scan", "--device", "cuda"], "no CUDA GPU"),
    (["scan", "--table-format", "xlsx"], "--table-format: must be one of parquet, csv"),
    (["knockout", "--layer", "3", "--scan-layers"], "choose one mode"),
    (["steer", "dose", "--doses", "1,x"], "--doses: cannot read"),
    (["steer", "generate", "--limit", "0"], "--limit: must be an integer ≥ 1"),
    (["sae", "attention", "--latent", "0", "--sae", "{npz}", "--prompts", "{prompts}"], "cannot read npz"),
    (
        ["sae", "attention", "--latent", "0", "--sae", "{sae}", "--prompts", "{prompts}", "--coeff", "nan"],
        "coefficient must be a finite number",
    ),
    # SAE and entity parameters: named as flags, refused before any model loads (this model does not exist)
    (["sae", "attention", "--latent", "0", "--sae", "{sae}", "-m", "no-such-model"], "--prompts: nothing to analyse"),
    (
        ["sae", "attention", "--latent", "0", "--sae", "{sae}", "--prompts", "{prompts}", "--alpha", "2", "-m", "nope"],
        "--alpha: must be a number between 0 and 1",
    ),
    (
        ["sae", "attention", "--latent", "0", "--sae", "{sae}", "--prompts", "{prompts}", "--heads", "L2H0", "-m", "x"],
        "--heads: L2H0 is in layer 2, before the first steered layer 5",
    ),
    (
        ["sae", "attention", "--latent", "8", "--sae", "{sae}", "--prompts", "{prompts}", "-m", "no-such-model"],
        "--latent: latent 8 is out of range",
    ),
    (
        ["sae", "attention", "--latent", "0", "--sae", "{sae}", "--prompts", "{prompts}", "--seed", "-1", "-m", "x"],
        "--seed: must be an integer ≥ 0",
    ),
    (
        ["sae", "attention", "--latent", "0", "--sae", "{sae}", "--prompts", "{prompts}", "--layer", "3", "-m", "x"],
        "--layer: 3 contradicts SAE",
    ),
    (
        [
            "sae",
            "attention",
            "--latent",
            "0",
            "--sae",
            "{sae}",
            "--prompts",
            "{prompts}",
            "--coeff",
            "mean",
            "--random",
            "2",
            "-m",
            "x",
        ],
        "--latent-file: coefficient 'mean'",
    ),
    (["sae", "train", "--arch", "gated", "-m", "no-such-model"], "--arch: must be one of topk, jumprelu"),
    (["sae", "train", "--width", "8", "--k", "9", "-m", "no-such-model"], "--k: must be in 1..width (8)"),
    (["sae", "train", "--n-tokens", "0", "-m", "no-such-model"], "--n-tokens: must be an integer ≥ 1"),
    (["sae", "train", "--tokens", "0", "-m", "no-such-model"], "--n-tokens: must be an integer ≥ 1"),  # old spelling
    (["sae", "latents", "--sae", "{sae}", "--labels", "{prompts}", "--split", "x"], "--split: must be one of"),
    (["sae", "pipeline", "--coeff", "x", "-m", "no-such-model"], "--coeff: coefficient must be a number"),
    (["entities", "label", "--types", "player,team", "-m", "no-such-model"], "--types: unknown entity type(s) team"),
    (["entities", "label", "--samples", "0", "-m", "no-such-model"], "--samples: must be an integer ≥ 1"),
    (["sae", "latents", "--sae", "{sae}", "--split", "train"], "--labels-file is required"),
    (["scan", "--corpus", "{deep}"], "nested too deeply"),
    (["scan", "--model", "{gguf1}"], "is not a readable GGUF file"),
    (["knockout", "--model", "{gguf98}"], "truncated or corrupt"),
    (["scan", "--model", "{pickled}"], "only pickle-based weights"),
    # the group is too small to compare: said before any model loads (this model does not exist)
    (["scan", "--corpus", "{one}", "--model", "no-such-model"], "'python_doctest' has 1 sample(s)"),
    (["knockout", "--corpus", "{one}", "--model", "no-such-model"], "comparing groups needs at least 2"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(c[0][:3]) + f" {i}" for i, c in enumerate(CASES)])
def test_one_error_line_exit_2_nothing_written(argv, message, paths, tmp_path, capsys, monkeypatch):
    if "--device" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    argv = [a.format(**paths) for a in argv]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.chdir(out_dir)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(out_dir / "r.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_out_is_checked_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path, "is a directory"), (tmp_path / "file" / "r.json", "is a file")):
        with pytest.raises(SystemExit) as e:
            main(["scan", "--model", "no-such-model-anywhere", "--out", str(out)])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_umask_and_symlinks(tmp_path):
    import os

    from plipy.io import write_json

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.json").st_mode & 0o777) == oct(0o640)
    real = tmp_path / "real.json"
    real.write_text("{}")
    (tmp_path / "link.json").symlink_to(real)
    write_json(tmp_path / "link.json", {"y": 2})
    assert (tmp_path / "link.json").is_symlink() and json.loads(real.read_text()) == {"y": 2}


def test_single_dose_has_no_monotonicity():
    from plipy.experiments.dose import monotonicity

    m = monotonicity([{"scale": 2.0, "n": 3, "mean_kl": 0.1, "mean_attention_achieved": 0.2, "samples": []}])
    assert m["attention_increasing"] is None and "fewer than two doses" in m["note"]


def test_ctrl_c_through_the_entry_point(tmp_path):
    """SIGINT mid-scan: one `interrupted` line, exit 130, no result file (through `python -m plipy`).

    The signal goes once the first sample is checkpointed (a unit on disk), with one sample per forward: 29
    forwards and the statistics are still to run, whatever the load on the machine. (A progress line is no such
    point: a piped stderr gets rich's bars only when they stop.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, runs = tmp_path / "scan.json", tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PLIPY_RUNS": str(runs)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "plipy", "scan", "-b", "1", "--resamples", "100000", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/unit-*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None and list(runs.glob("*/unit-*.json")), proc.stderr.read() if proc.poll() else "timeout"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not any(p.suffix == ".tmp" for p in tmp_path.rglob("*"))


def test_one_spelling_of_a_head_of_a_layer():
    """SAE heads and patching receivers read the same spellings — `L12H3`, `12.3` and results' label `L12.H3` — and
    refuse anything else with the grammar named."""
    from plipy import options
    from plipy.errors import ParameterError

    for text in ("L2H1", "l2h1", "2.1", "L2.H1", " 2.1 "):
        assert options.read_head_site(text) == (2, 1), text
    for text in ("21", "2.", "L2", "x.1", "-1.2", "2.1.0"):
        assert options.read_head_site(text) is None, text
    assert options.parse_head_sites("L16H2,14.3,L14.H3", 30, 9, param="receivers") == [(14, 3), (16, 2)]
    assert options.parse_layer_heads("L2H1,0.3", 3, 4) == [(2, 1), (0, 3)]
    assert options.parse_layer_heads("0,3", 3, 4, first=2) == [(2, 0), (2, 3)]
    with pytest.raises(ParameterError, match="receivers: cannot read '14': use L12H3 or 12.3"):
        options.parse_head_sites("14", param="receivers")
    with pytest.raises(ParameterError, match="L0.H1 is in layer 0, before the first steered layer 1"):
        options.check_layer_heads("L0.H1", first=1)
