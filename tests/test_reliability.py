"""Reliability through the real CLI ("Reliability II"): no number made from NaN or inf, no file written outside what
the user named, cached models checked, cache and disk errors, reports that survive any text, Ray that fails fast and
stays on loopback.

Every failing case runs the real CLI (`python -m plipy` where the entry point itself is under test, `plipy.cli.main`
otherwise: an exception other than SystemExit would fail the test as a traceback would) and asserts exactly one
`error:` line, a non-zero exit, no traceback, and the same files before and after in the output folder, in a
symlink target's folder and in the model folders. Models are tiny random Llamas with SmolLM2's tokenizer (and a
tiny GGUF built from SmolLM2's own metadata for the cache), so the file runs in minutes on a CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_MODELS, alias_gguf, corpus_subset, tiny_llama_dir
from plipy.cli import main

PY = [sys.executable, "-m", "plipy"]
SMOL_GGUF, _WHY = alias_gguf("smollm2-135m")
needs_gguf = pytest.mark.skipif(SMOL_GGUF is None, reason=_WHY)


# ---------------------------------------------------------------------------------------------- helpers


def listing(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folders` (hidden ones too) → (size, mtime_ns): what a run must leave untouched."""
    out = {}
    for folder in folders:
        if folder.exists():
            for p in sorted(folder.rglob("*")):
                if p.is_file() or p.is_symlink():
                    st = p.lstat()
                    out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def one_error(code: int | None, err: str, message: str) -> None:
    """Exit ≠ 0, exactly one `error:` line matching `message`, no traceback."""
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code not in (0, None), err
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err, err


def cli(argv: list[str], capsys, *, env: dict[str, str] | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path, timeout: float = 600):
    """`python -m plipy …` in a subprocess: the real entry point."""
    return subprocess.run(
        [*PY, *argv], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout
    )


def mount_tmpfs(path: Path, size: str, *, ro: bool = False) -> None:
    """A small tmpfs at `path` (a real full or read-only disk); the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the filesystem of `folder` until `leave` bytes are free (0: completely)."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if free > leave:
            os.write(fd, b"\0" * (free - leave))
        while not leave:
            os.write(fd, b"\0" * 4096)
    except OSError:  # full
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- models and inputs


@pytest.fixture(scope="module")
def tok():
    from plipy.models import load_tokenizer

    return load_tokenizer("smollm2-135m")[0]


def _with_nan(src: Path, dst: Path, tensor: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state[tensor][0, 0] = float("nan")
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _pickled(src: Path, dst: Path) -> Path:
    """The model's weights as a pickle holding a global torch's weights-only unpickler refuses."""
    import argparse

    from safetensors.torch import load_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    state = load_file(str(src / "model.safetensors"))
    state["extra"] = argparse.Namespace(code="would run")
    torch.save(state, dst / "pytorch_model.bin")
    return dst


@pytest.fixture(scope="module")
def paths(tok, tmp_path_factory):
    """Every input the cases need: models (tiny, NaN in one layer, config only, truncated, pickled), a corpus,
    SAEs (fine, NaN decoder row, truncated, cfg contradicting the weights) and prompts."""
    from plipy import sae as saes

    d = tmp_path_factory.mktemp("inputs")
    tiny = tiny_llama_dir(d / "tiny", tok)
    nan = _with_nan(tiny, d / "nan", "model.layers.2.mlp.down_proj.weight")  # NaN from layer 3's rows on
    cfgonly = d / "cfgonly"
    cfgonly.mkdir()
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, cfgonly / f.name)
    cut = d / "cut"
    shutil.copytree(tiny, cut)
    os.truncate(cut / "model.safetensors", 1_000_000)
    sae = saes.random_sae(64, 16, hook_name="blocks.0.hook_resid_post", seed=1)
    saes.save_saelens(sae, d / "sae")
    sae.W_dec[3, 5] = float("nan")
    saes.save_saelens(sae, d / "sae-nan")
    shutil.copytree(d / "sae", d / "sae-cut")
    os.truncate(d / "sae-cut" / "sae_weights.safetensors", 3000)
    shutil.copytree(d / "sae", d / "sae-din")
    cfg = json.loads((d / "sae-din" / "cfg.json").read_text())
    (d / "sae-din" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 576}))
    prompts = d / "prompts.jsonl"
    rows = [
        ("The player Lionel Messi has played for", "Lionel Messi", "known"),
        ("The city Paris is located in", "Paris", "known"),
        ("The player Zorvak Plinth has played for", "Zorvak Plinth", "unknown"),
        ("The city Velmorath is located in", "Velmorath", "unknown"),
    ]
    prompts.write_text("".join(json.dumps({"prompt": p, "entity": e, "label": lab}) + "\n" for p, e, lab in rows))
    (d / "ok.py").write_text("def add(a, b):\n    '''\n    >>> add(1, 2)\n    3\n    '''\n    return a + b\n")
    corpus = corpus_subset(d, {"python_doctest": 3, "rust_test": 3}).path
    return {
        "tiny": tiny,
        "nan": nan,
        "cfgonly": cfgonly,
        "cut": cut,
        "pickled": _pickled(tiny, d / "pickled"),
        "corpus": corpus,
        "sae": d / "sae",
        "sae-nan": d / "sae-nan",
        "sae-cut": d / "sae-cut",
        "sae-din": d / "sae-din",
        "prompts": prompts,
        "okpy": d / "ok.py",
        "inputs": d,
    }


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class Case:
    argv: list[str]
    message: str  # regex the one `error:` line matches
    sub: bool = False  # through `python -m plipy` (the entry point itself)
    env: dict[str, str] = field(default_factory=dict)
    out: str | None = "{out}/r.json"  # --out (None: the command takes none)


SAE = ["sae", "attention", "--prompts", "{prompts}", "--model", "{tiny}", "--random", "2"]
SCAN = ["scan", "--corpus", "{corpus}", "--resamples", "50"]
NONFINITE = r"non-finite values \(NaN or inf\) in .* at layer \d+, sample '[^']+'"
CASES = {
    # 1. no numbers made from NaN or inf
    "scan NaN weights": Case([*SCAN, "--model", "{nan}"], NONFINITE, sub=True),
    "knockout NaN weights": Case(
        ["knockout", "--layer", "1", "--corpus", "{corpus}", "--model", "{nan}"],
        "non-finite values .* logits at sample '",
    ),
    "steer dose NaN weights": Case(
        ["steer", "dose", "--layer", "3", "--doses", "2", "--corpus", "{corpus}", "--model", "{nan}"], NONFINITE
    ),
    "lens NaN weights": Case(
        ["lens", "run", "def f(): pass", "--model", "{nan}"], r"residual stream after the layer at layer 2, the text"
    ),
    "sae NaN decoder row": Case(
        [*SAE, "--sae", "{sae-nan}", "--latent", "3"], r"decoder direction of latent 3 at SAE .*sae-nan"
    ),
    "sae coeff 1e308": Case([*SAE, "--sae", "{sae}", "--latent", "3", "--coeff", "1e308"], r"beyond float32's range"),
    # 2. no writes outside what the user named
    "dangling symlink out": Case(
        [*SCAN, "--model", "{tiny}"],
        r"symlink to .*missing/deeper/r\.json, whose folder does not exist",
        out="{out}/link.json",
    ),
    "out collides with parquet": Case(
        [*SCAN, "--model", "no-such-model"], r"parquet table would take the JSON's own name", out="{out}/s.parquet"
    ),
    "out collides with csv": Case(
        [*SCAN, "--model", "no-such-model", "--table-format", "csv"],
        r"csv table would take the JSON's",
        out="{out}/s.csv",
    ),
    "out collides with html": Case(
        [*SCAN, "--model", "no-such-model", "--html"], r"HTML report would take the JSON's", out="{out}/s.html"
    ),
    "convert over its input": Case(
        ["corpus", "convert", "{okpy}"], r"--out .*ok\.py is the input .*ok\.py", out="{okpy}"
    ),
    "convert over a file of its folder": Case(["corpus", "convert", "{inputs}"], r"is the input", out="{okpy}"),
    # 3. models, SAEs and caches
    "truncated SAE weights": Case(
        [*SAE, "--sae", "{sae-cut}", "--latent", "3"], r"sae_weights\.safetensors is truncated or corrupt"
    ),
    "SAE d_in contradicts weights": Case(
        [*SAE, "--sae", "{sae-din}", "--latent", "3"], r"cfg\.json says d_in=576, but the weights have d_in=64"
    ),
    "empty --model": Case([*SCAN, "--model", ""], r"^error: --model: is empty", sub=True),
    "config-only model folder": Case([*SCAN, "--model", "{cfgonly}"], r"has a config but no weights"),
    "truncated model safetensors": Case([*SCAN, "--model", "{cut}"], r"model\.safetensors is truncated or corrupt"),
    "pickle the weights-only loader refuses": Case(
        ["--allow-pickle", *SCAN, "--model", "{pickled}"],
        r"weights-only unpickler refused its pickle \(Unsupported global: GLOBAL argparse\.Namespace",
        sub=True,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_error_line_nothing_written(name, paths, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    where = {**{k: str(v) for k, v in paths.items()}, "out": str(out_dir)}
    argv = [a.format(**where) for a in case.argv]
    if case.out is not None:
        argv += ["--out", case.out.format(**where)]
    if name == "dangling symlink out":  # a link into a folder that does not exist: nothing may create it
        (out_dir / "link.json").symlink_to(tmp_path / "elsewhere" / "missing" / "deeper" / "r.json")
        (tmp_path / "elsewhere").mkdir()
    watched = [out_dir, tmp_path / "elsewhere", paths["inputs"]]
    before = listing(*watched)
    monkeypatch.chdir(out_dir)
    if case.sub:
        proc = run(argv, env=case.env, cwd=out_dir)
        code, err = proc.returncode, proc.stderr
    else:
        code, _, err = cli(argv, capsys, env=case.env, monkeypatch=monkeypatch)
    one_error(code, err, case.message)
    assert listing(*watched) == before  # nothing written, nothing created, no input overwritten
    assert not (tmp_path / "elsewhere" / "missing").exists()


# ---------------------------------------------------------------------------------------------- NaN: what stays legal


def test_rows_the_models_own_mask_empties_stay_zero_and_the_rest_equal_one_by_one(one_thread):
    """Left padding empties the padding queries' rows (every key masked by the model's own mask): they stay
    exactly 0, no NaN error, and the real rows and logits are what the item alone gives, within the fp32 bound of
    test_batch (each within `fp32_bound` of the float64 answer)."""
    from plipy.engine import Capture, Engine
    from tiny_models import batch_inputs, build, float64, fp32_bound, variant

    eager = build("llama", "eager")
    ours = variant(eager, "sdpa")
    engine = Engine(ours, idle="eager")  # every layer explicit: the padding rows are computed, and empty
    ids, mask = batch_inputs(pad=3)
    T = ids.shape[1]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode(), engine.run(capture=Capture(rows=list(range(T)))) as rec:
        batched = ours(ids, attention_mask=mask, position_ids=pos).logits
    alone_ids = ids[1:, 3:]
    with torch.inference_mode(), engine.run(capture=Capture(rows=list(range(T - 3)))) as one:
        alone = ours(alone_ids).logits
    with torch.inference_mode():
        ref32 = eager(alone_ids, output_attentions=True)
        ref64 = float64(eager)(alone_ids, output_attentions=True)
    for layer, a in rec.attn.items():
        assert torch.isfinite(a).all() and (a[1, :, :3] == 0).all()  # the emptied rows: exactly 0
        tol = fp32_bound(ref32.attentions[layer][0], ref64.attentions[layer][0])
        assert (a[1, :, 3:, 3:].double() - ref64.attentions[layer][0]).abs().max() <= tol
        assert (one.attn[layer][0].double() - ref64.attentions[layer][0]).abs().max() <= tol
    tol = fp32_bound(ref32.logits[0], ref64.logits[0])
    assert (batched[1, 3:].double() - ref64.logits[0]).abs().max() <= tol
    assert (alone[0].double() - ref64.logits[0]).abs().max() <= tol


def test_a_steering_dose_beyond_float32_is_an_error_not_attention_zero(paths, tmp_path, capsys, monkeypatch):
    """α = 1e308 overflows the row's float32 weights: the run stops naming the layer and sample."""
    monkeypatch.chdir(tmp_path)
    argv = [
        "steer",
        "dose",
        "--layer",
        "1",
        "--doses",
        "1e308",
        "--corpus",
        str(paths["corpus"]),
        "--model",
        str(paths["tiny"]),
    ]
    code, _, err = cli([*argv, "--out", str(tmp_path / "d.json")], capsys)
    one_error(
        code, err, r"non-finite values .* attention weights of query position \d+ \(head \d\) at layer 1, sample '"
    )
    assert not list(tmp_path.glob("d*"))


# ---------------------------------------------------------------------------------------------- outputs


def test_a_symlinked_out_writes_through_into_an_existing_folder_siblings_beside_the_target(
    paths, tmp_path, capsys, monkeypatch
):
    target_dir, link_dir = tmp_path / "target", tmp_path / "links"
    target_dir.mkdir()
    link_dir.mkdir()
    (link_dir / "s.json").symlink_to(target_dir / "s.json")  # dangling, but its folder exists
    monkeypatch.chdir(tmp_path)
    argv = [*[a.format(corpus=paths["corpus"]) for a in SCAN], "--model", str(paths["tiny"]), "--layers", "0-1"]
    code, out, err = cli([*argv, "--out", str(link_dir / "s.json")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in link_dir.iterdir()) == ["s.json"] and (link_dir / "s.json").is_symlink()
    assert sorted(p.name for p in target_dir.iterdir()) == ["s-rows.npz", "s.json", "s.parquet"]
    doc = json.loads((link_dir / "s.json").read_text())
    assert doc["provenance"]["files"]["table"] == str(target_dir / "s.parquet")


def _writer(path: Path, tag: int, at: float) -> None:
    """Write one output set tagged `tag` (sizes differ by writer: a torn set is visible) at time `at`."""
    from plipy.io import write_outputs

    time.sleep(max(0.0, at - time.time()))
    body = f"{tag}:".encode() * (500 + 97 * (tag % 50))
    write_outputs({path.with_suffix(".parquet"): body, path.with_suffix(".npz"): body, path: body})


def test_concurrent_writers_of_one_output_set_replace_it_whole(tmp_path):
    """Round after round, 8 threads and 4 processes write one output set at the same moment: after each round
    the set's files all come from one writer (without the set's lock about one round in ten mixes writers)."""
    import multiprocessing as mp

    ctx, path = mp.get_context("fork"), tmp_path / "s.json"
    for r in range(30):
        at = time.time() + 0.3
        threads = [threading.Thread(target=_writer, args=(path, 100 * r + t, at)) for t in range(8)]
        procs = [ctx.Process(target=_writer, args=(path, 100 * r + 50 + p, at)) for p in range(4)]
        for w in [*procs, *threads]:
            w.start()
        for w in [*threads, *procs]:
            w.join(60)
        assert all(p.exitcode == 0 for p in procs)
        a, b, c = (path.with_suffix(s).read_bytes() for s in (".parquet", ".npz", ".json"))
        assert a == b == c, f"round {r}: {a[:8]!r} {b[:8]!r} {c[:8]!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.npz", "s.parquet"]


def test_enospc_while_writing_results_leaves_the_previous_set(paths, tmp_path, capsys, monkeypatch):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "512k")
    try:
        argv = [*[a.format(corpus=paths["corpus"]) for a in SCAN], "--model", str(paths["tiny"]), "--layers", "0"]
        monkeypatch.chdir(tmp_path)
        code, _, err = cli([*argv, "--out", str(disk / "s.json")], capsys)
        assert code == 0, err
        before = {p.name: p.read_bytes() for p in disk.iterdir()}
        fill(disk, leave=4096)  # the new JSON's temporary no longer fits
        code, _, err = cli([*argv, "--layers", "0-3", "--out", str(disk / "s.json")], capsys)
        one_error(
            code,
            err,
            r"could not write .*disk/s\S*: No space left on device \(nothing of this output set was replaced\)",
        )
        assert {p.name: p.read_bytes() for p in disk.iterdir() if p.name != "filler"} == before
    finally:
        umount(disk)


def test_enospc_while_checkpointing_is_one_line(paths, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    mount_tmpfs(runs, "64k")
    try:
        fill(runs)
        monkeypatch.chdir(tmp_path)
        argv = [*[a.format(corpus=paths["corpus"]) for a in SCAN], "--model", str(paths["tiny"])]
        code, _, err = cli(
            [*argv, "--out", str(tmp_path / "s.json")], capsys, env={"PLIPY_RUNS": str(runs)}, monkeypatch=monkeypatch
        )
        one_error(code, err, r"could not write .*runs/scan-\w+/.*: No space left on device")
        assert not list(tmp_path.glob("s*"))
    finally:
        umount(runs)


@pytest.mark.parametrize("variable", ["PLIPY_CACHE", "PLIPY_RUNS"])
def test_a_read_only_cache_or_runs_folder_fails_before_the_model_loads(variable, paths, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "64k", ro=True)
    try:
        monkeypatch.chdir(tmp_path)
        # the cache matters where a GGUF must be dequantized (the alias, not yet in this empty cache); the runs folder
        # for every resumable run (the tiny model)
        model = "smollm2-135m" if variable == "PLIPY_CACHE" else str(paths["tiny"])
        argv = [*[a.format(corpus=paths["corpus"]) for a in SCAN], "--model", model]
        t0 = time.monotonic()
        code, _, err = cli(
            [*argv, "--out", str(tmp_path / "s.json")], capsys, env={variable: str(ro)}, monkeypatch=monkeypatch
        )
        one_error(code, err, rf"{variable}: {re.escape(str(ro))}.* is not writable")
        assert "dequantizing" not in err and time.monotonic() - t0 < 60  # refused before any weights were read
    finally:
        umount(ro)


def test_entities_build_writes_to_the_cache_with_the_umask(tmp_path):
    from plipy.entities.build import shipped_dir

    raw = SHARED_MODELS.parent / "entities" / "raw" / "wikidata"
    if not raw.is_dir():
        pytest.skip("raw WikiData dumps (../shared/entities) not present")
    shipped = listing(shipped_dir())
    env = {**os.environ, "PLIPY_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        ["sh", "-c", 'umask 027 && exec "$@"', "sh", *PY, "entities", "build", "--raw", str(raw)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    built = sorted((tmp_path / "cache" / "entity-lists").iterdir())
    assert [p.name for p in built] == ["city.json.gz", "movie.json.gz", "player.json.gz", "song.json.gz"]
    assert {oct(p.stat().st_mode & 0o777) for p in built} == {oct(0o640)}
    assert listing(shipped_dir()) == shipped  # the package's own lists untouched


# ---------------------------------------------------------------------------------------------- the cached copy


def _tiny_gguf(path: Path) -> Path:
    """A 2-layer Llama GGUF with SmolLM2's tokenizer metadata and random F32 weights (dequantizes in seconds)."""
    import gguf

    src = gguf.GGUFReader(str(SMOL_GGUF))
    sizes = {
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
    }
    w = gguf.GGUFWriter(str(path), "llama")
    for name, f in src.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        value, kind = sizes.get(name, f.contents()), f.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, value, kind, sub_type=f.types[-1])
        else:
            w.add_key_value(name, value, kind)
    rng = np.random.default_rng(0)
    vocab, d, ff = 49152, 64, 96

    def rand(name: str, shape: tuple[int, ...]) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.15).astype(np.float32))

    rand("token_embd.weight", (vocab, d))
    rand("output.weight", (vocab, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(2):
        for name, shape in (("attn_q", (64, d)), ("attn_k", (32, d)), ("attn_v", (32, d)), ("attn_output", (d, 64))):
            rand(f"blk.{i}.{name}.weight", shape)
        for name, shape in (("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            rand(f"blk.{i}.{name}.weight", shape)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@needs_gguf
@pytest.mark.slow
def test_a_truncated_or_edited_cached_copy_is_rebuilt_from_the_gguf(tmp_path, capsys, monkeypatch):
    """The dequantized copy records each file's size and sha256 when it is written; a load that finds one cut short
    or edited says so in one line and rebuilds the copy from the GGUF (whose sha256 provenance names)."""
    from plipy import models
    from plipy.io import sha256_file

    gguf = _tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("PLIPY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["lens", "run", "def f(): pass", "--model", str(gguf), "--layers", "1", "--out", str(tmp_path / "l.json")]
    code, _, err = cli(argv, capsys)
    assert code == 0 and "dequantizing" in err, err
    copy = models.dequantized_dir(models.sha256_stamped(gguf))
    weights = copy / "model.safetensors"
    recorded = json.loads((copy / models.DEQUANT_MARKER).read_text())["files"]["model.safetensors"]
    assert recorded == {"size": weights.stat().st_size, "sha256": sha256_file(weights)}
    good = json.loads((tmp_path / "l.json").read_text())

    def damaged(why: str) -> None:
        code, _, err = cli(argv, capsys)
        notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
        assert code == 0 and len(notes) == 1 and why in notes[0] and "rebuilding it from the GGUF" in notes[0], err
        assert sha256_file(weights) == recorded["sha256"]  # rebuilt: the same bits as before
        again = json.loads((tmp_path / "l.json").read_text())
        assert again["positions"] == good["positions"]  # the same numbers
        assert again["provenance"]["model"]["weights_sha256"] == sha256_file(gguf)
        assert [p.name for p in copy.parent.iterdir()] == [copy.name]  # no temporary or damaged copy left

    os.truncate(weights, weights.stat().st_size // 2)
    damaged("model.safetensors has")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    weights.write_bytes(bytes(data))
    damaged("model.safetensors differs from what was written")
    code, _, err = cli(argv, capsys)
    assert code == 0 and "note:" not in err and "dequantizing" not in err, err  # whole again: loaded as it is


def test_a_killed_writers_temporary_is_cleaned_a_live_ones_kept(tmp_path):
    """A `kill -9` mid-write leaves a temporary named after its writer; the next load removes it once its pid is
    gone, and never a live writer's."""
    from plipy.models import _temp_prefix, clean_stale_temporaries

    code = (
        "import sys, tempfile, time; from plipy.models import _temp_prefix; "
        "d = tempfile.mkdtemp(dir=sys.argv[1], prefix=_temp_prefix('abc')); "
        "open(d + '/model.safetensors', 'wb').write(b'x' * 1000); print(d, flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    dead = Path(proc.stdout.readline().strip())
    live = tmp_path / f"{_temp_prefix('abc')}mine"
    live.mkdir()
    clean_stale_temporaries(tmp_path)
    assert dead.is_dir() and live.is_dir()  # the writer is alive: its temporary stays
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    clean_stale_temporaries(tmp_path)
    assert not dead.exists() and live.is_dir()
    other_host = tmp_path / f".abc.tmp-{socket.gethostname()}x-1-zz"
    other_host.mkdir()
    clean_stale_temporaries(tmp_path)
    assert other_host.is_dir()  # another host's writer: not this machine's to judge


# ---------------------------------------------------------------------------------------------- reports


GROUPS = ("py <!--<script>", "rs \u2028\u2029 </script>&")
NASTY = [
    "</script><script>window.pwned=1</script>",
    "<!--<script>",
    "<script>window.pwned=2</script>",
    "]]>",
    "&amp; &",
    "'\"",
    "\u2028\u2029",
]


def _nasty_corpus(path: Path) -> tuple[Path, list[str]]:
    """Three python and three rust samples whose ids, group names and code carry every HTML-significant sequence."""
    from plipy.corpus import load_corpus

    full = load_corpus()
    data: dict = {"_format_version": "2.0"}
    ids = []
    for g, name in zip(("python_doctest", "rust_test"), GROUPS, strict=True):
        data[name] = []
        for s in full.groups[g][:3]:
            prefix = f"// {''.join(NASTY)}\n"
            sid = f"{s.id}{NASTY[len(ids)]}"
            ids.append(sid)
            data[name].append(
                {
                    "id": sid,
                    "code": prefix + s.code,
                    "marker_char_pos": s.marker_char_pos + len(prefix),
                    "marker_pattern": s.marker_pattern,
                    "target_char_positions": [t + len(prefix) for t in s.target_char_positions],
                }
            )
    path.write_text(json.dumps(data))
    return path, ids


def _strings(obj: object) -> list[str]:
    """Every string in a JSON value (keys too)."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in (k, *_strings(v))]
    if isinstance(obj, list):
        return [x for v in obj for x in _strings(v)]
    return []


@pytest.fixture(scope="module")
def browser():
    from plipy.report.html import browser as hb

    if hb.find_chromium() is None:
        pytest.skip("no Chromium found: browser checks not run")
    with hb.chromium() as b:
        yield b


def test_a_report_shows_any_text_literally_and_still_draws(paths, browser, tmp_path, capsys, monkeypatch):
    from plipy.report.html import browser as hb

    corpus, ids = _nasty_corpus(tmp_path / "nasty.json")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"The player Zorvak {n} Plinth played for", "entity": "Zorvak", "label": lab}) + "\n"
            for n, lab in zip(NASTY[:4], ["known", "unknown"] * 2, strict=True)
        )
    )
    monkeypatch.chdir(tmp_path)
    scan = [
        "scan",
        "--corpus",
        str(corpus),
        "--groups",
        ",".join(GROUPS),
        "--resamples",
        "50",
        "--model",
        str(paths["tiny"]),
        "--html",
    ]
    sae = [
        "sae",
        "attention",
        "--sae",
        str(paths["sae"]),
        "--latent",
        "3",
        "--prompts",
        str(prompts),
        "--random",
        "2",
        "--model",
        str(paths["tiny"]),
        "--html",
    ]
    for argv, out in ((scan, "scan.json"), (sae, "sae.json")):
        code, _, err = cli([*argv, "--out", str(tmp_path / out)], capsys)
        assert code == 0, err
    for page_file, shown in (("scan.html", [*ids, *GROUPS]), ("sae.html", ["Zorvak"])):
        opened = hb.open_report(browser, tmp_path / page_file)
        assert opened.errors == [] and opened.foreign_requests() == [], opened.errors
        page = opened.page
        assert page.evaluate("window.pwned === undefined")  # no injected script ran
        assert page.evaluate("document.querySelectorAll('script').length") == 3  # plotly, data, page script
        drawn = page.evaluate(
            "[...document.querySelectorAll('.plot')].filter(d => d.querySelector('.main-svg')).length"
        )
        assert drawn >= 3  # the figures render
        text = page.evaluate(
            "[...document.querySelectorAll('option, h1, h2, h3, td, th, p, .tok, .detail')]"
            ".map(e => e.textContent).join('\\n')"
        )
        for s in shown:
            assert s in text, s  # shown literally, not parsed as markup
        if page_file == "scan.html":
            tokens = page.evaluate("[...document.querySelectorAll('.tok')].map(e => e.textContent).join('')")
            assert "<!--<script>" in tokens and "</script>" in tokens  # the token view prints the code as written
        data = "\n".join(_strings(json.loads(page.evaluate("document.getElementById('plipy-data').textContent"))))
        for s in NASTY if page_file == "scan.html" else NASTY[:4]:
            assert s in data, s  # every string reaches the page script intact
        page.close()


# ---------------------------------------------------------------------------------------------- Ray


def test_an_unreachable_ray_address_is_one_line_within_seconds(paths, tmp_path):
    t0 = time.monotonic()
    proc = run(
        [
            *[a.format(corpus=paths["corpus"]) for a in SCAN],
            "--model",
            str(paths["tiny"]),
            "--ray",
            "127.0.0.1:1",
            "--out",
            str(tmp_path / "r.json"),
        ],
        cwd=tmp_path,
        timeout=120,
    )
    one_error(
        proc.returncode,
        proc.stderr,
        r"ray: cannot connect to 127\.0\.0\.1:1: nothing answers at 127\.0\.0\.1:1 \(Connection refused\)",
    )
    assert time.monotonic() - t0 < 60 and list(tmp_path.iterdir()) == []
    assert len(proc.stderr.splitlines()) == 1  # none of Ray's retry messages


def test_a_local_ray_instance_plipy_starts_listens_on_loopback_only(tmp_path):
    """`--ray` without an address starts a local instance: every socket its processes listen on is loopback."""
    pytest.importorskip("ray")
    code = """
import json, psutil
from plipy.cluster.pool import Cluster, connect
ray = connect(Cluster())
mine = [psutil.Process(), *psutil.Process().children(recursive=True)]
pids = {p.pid for p in mine}
ray.get(ray.remote(lambda: 1).remote())  # a worker is up too
pids |= {p.pid for p in psutil.Process().children(recursive=True)}
conns = psutil.net_connections("inet")
socks = [(c.pid, c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN and c.pid in pids]
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": socks}))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # plipy sets it itself
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["gcs"].startswith("127.0.0.1:") and len(got["listening"]) >= 3, got
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    assert all(ip in loopback for _, ip in got["listening"]), got["listening"]
