"""Scale-out on a real local Ray cluster (2 CPUs): every runtime experiment (scan, knockout and its mean ablation,
steering, lens, probe, qk, patching, sae attention) run on two actors
give the JSON (provenance aside) and table bytes of a local run; a worker killed mid-run and a driver killed mid-run
lose nothing and count nothing twice; `plipy sweep` writes each model's result and the comparison table.

Workers use the driver's torch thread count (`Cluster.threads`): fp32 sums split over another number of threads
round differently, so the local reference runs with the same count (one thread here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import gammaln

from conftest import cli_exit_code, corpus_subset, tiny_llama_dir

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs for the module; plipy joins it (`ray.is_initialized()`)."""
    import logging

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers get the driver's count: local references are computed alike
    ray.init(  # on loopback only (conftest sets Ray's loopback mode before anything imports it)
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        namespace="plipy",
        _node_ip_address="127.0.0.1",
    )
    yield ray.get_runtime_context().gcs_address
    from plipy.cluster import shutdown

    shutdown()
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_subset(tmp_path_factory.mktemp("ray-corpus"), {"python_doctest": 5, "rust_test": 5})


def _doc(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("provenance")
    return data


def _same_files(a: Path, b: Path) -> None:
    assert _doc(a) == _doc(b)
    assert a.with_suffix(".csv").read_bytes() == b.with_suffix(".csv").read_bytes()


CORPUS, RESAMPLES = "{corpus}", ["--resamples", "300"]
CASES = {
    "scan": ["scan", CORPUS, *RESAMPLES],
    "knockout": ["knockout", "--scan-layers", CORPUS, *RESAMPLES],
    "steer calibrate": ["steer", "calibrate", CORPUS],
    "steer dose": ["steer", "dose", "--groups", "rust_test,python_doctest", "--doses", "2,8", CORPUS],
    "steer generate": ["steer", "generate", "--limit", "3", "--max-tokens", "5"],
    "lens": ["lens", "fn add(a: i32) -> i32 {\n}\n\n#[", "--positions", "all", "--top-k", "5", "--token", " test"],
    "lens emergence": ["lens", "emergence", "--top-k", "20"],
    "probe": ["probe", CORPUS, "--permutations", "3", "--folds", "2"],
    "knockout mean": ["knockout", "--layers", "12-14", "--ablation", "mean", CORPUS, *RESAMPLES],
    "qk": ["qk", "--layer", "13", CORPUS],
    "patch heads": ["patch", "heads", "--layers", "13-14", "--positions", "last", CORPUS, *RESAMPLES],
}
ONE_INPUT_PER_FORWARD = ("lens", "lens emergence", "probe", "qk")  # no --batch-size: batching would change them
SLOW = {"knockout mean", "qk", "patch heads"}  # the newer experiments: in `make test-slow`


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in CASES])
def test_ray_run_equals_local_run(kind, cluster, corpus, tmp_path):
    args = [a for x in CASES[kind] for a in (["--corpus", str(corpus.path)] if x == CORPUS else [x])]
    common = [*args, "--table-format", "csv", *([] if kind in ONE_INPUT_PER_FORWARD else ["-b", "2"])]
    assert cli_exit_code([*common, "-o", str(tmp_path / "local.json")]) == 0
    assert cli_exit_code([*common, "--ray", "--workers", "2", "-o", str(tmp_path / "ray.json")]) == 0
    _same_files(tmp_path / "local.json", tmp_path / "ray.json")
    prov = json.loads((tmp_path / "ray.json").read_text())["provenance"]
    assert prov["cluster"]["workers"] == 2 and prov["cluster"]["address"] == cluster
    assert "cluster" not in json.loads((tmp_path / "local.json").read_text())["provenance"]
    assert prov["model"]["loaded_from"].startswith("none: meta device")  # the driver held no weights
    if kind == "scan":  # the attention rows of the token view too
        assert (tmp_path / "local-rows.npz").read_bytes() == (tmp_path / "ray-rows.npz").read_bytes()


def test_sae_attention_on_ray_equals_local(cluster, tmp_path):
    from plipy import sae as saes

    sae = saes.random_sae(576, 32, hook_name="blocks.4.hook_resid_post", seed=9)
    saes.save_saelens(sae, tmp_path / "sae", model_name="smollm2-135m")
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        ("The player Lionel Messi has played for", "Lionel Messi", "player", "known"),
        ("The city Paris is located in", "Paris", "city", "known"),
        ("The player Zorvak Plinth has played for", "Zorvak Plinth", "player", "unknown"),
        ("The city Velmorath is located in", "Velmorath", "city", "unknown"),
        ("The movie Titanic is directed by", "Titanic", "movie", "known"),
    ]
    prompts.write_text(
        "".join(json.dumps({"prompt": p, "entity": e, "entity_type": t, "label": lab}) + "\n" for p, e, t, lab in rows)
    )
    common = [
        "sae",
        "attention",
        "--sae",
        str(tmp_path / "sae"),
        "--latent",
        "3",
        "--prompts",
        str(prompts),
        "--random",
        "2",
        "--batch-size",
        "2",
        "--table-format",
        "csv",
    ]
    assert cli_exit_code([*common, "-o", str(tmp_path / "local.json")]) == 0
    assert cli_exit_code([*common, "--ray", "--workers", "2", "-o", str(tmp_path / "ray.json")]) == 0
    _same_files(tmp_path / "local.json", tmp_path / "ray.json")
    assert json.loads((tmp_path / "ray.json").read_text())["provenance"]["cluster"]["workers"] == 2


def test_entity_labels_on_ray_equal_local(cluster, smollm, tmp_path):
    import plipy

    kw = {"types": ["city"], "limit": 2, "k": 2, "max_new_tokens": 6, "batch_size": 3, "cache": False}
    local = plipy.label_entities(smollm, **kw).to_dict()
    on_ray = plipy.label_entities(smollm, **kw, ray=plipy_cluster(workers=2)).to_dict()
    assert on_ray["provenance"]["cluster"]["workers"] == 2
    for doc in (local, on_ray):
        doc.pop("provenance"), doc["cache"].pop("generation_seconds")
    assert on_ray == local and local["cache"]["generated_queries"] == 8


def plipy_cluster(**kw):
    from plipy.cluster import Cluster

    return Cluster(**kw)


def test_a_killed_worker_is_replaced_and_nothing_counts_twice(cluster, corpus, tmp_path):
    """`ray.kill` of a busy actor after the first unit arrives: Ray restarts it, its queued batches are retried,
    and the driver stores each unit once, so the result is the local one."""
    import plipy

    killed: list[int] = []

    def progress(desc: str, total: int):
        def step() -> None:
            if killed:
                return
            names = [
                a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("plipy-")
            ]
            actor = ray.get_actor(sorted(names)[-1], namespace="plipy")
            killed.append(ray.get(actor.pid.remote()))
            ray.kill(actor, no_restart=False)  # the process dies; Ray starts another

        return step

    kw = {"scan_layers": True, "resamples": 300, "batch_size": 1, "resume": False}
    got = plipy.knockout("smollm2-135m", corpus.path, ray=True, workers=2, progress=progress, **kw)
    assert killed  # the kill happened while batches were still queued (10 batches, 2 in flight per actor)
    ref = plipy.knockout("smollm2-135m", corpus.path, **kw)
    a, b = got.to_dict(), ref.to_dict()
    a.pop("provenance"), b.pop("provenance")
    assert a == b
    assert sum(len(r["samples"]) for r in got["runs"]) == len(got["runs"]) * len(got["samples"])


def _units(runs: Path) -> int:
    return sum(1 for _ in runs.glob("*/unit-*.json"))


def test_a_killed_driver_resumes_on_the_cluster(cluster, corpus, tmp_path):
    """SIGKILL of the driver once 2 units are checkpointed; the same command resumes (its actors died with it)."""
    from plipy.cluster import shutdown

    shutdown()  # this process's warm pool holds both CPUs: the subprocess's workers need them
    runs = tmp_path / "runs"
    env = {**os.environ, "PLIPY_RUNS": str(runs), "OMP_NUM_THREADS": "1"}  # the reference's thread count
    out = tmp_path / "ray.json"
    cmd = [
        sys.executable,
        "-m",
        "plipy",
        "knockout",
        "--scan-layers",
        "--corpus",
        str(corpus.path),
        "--resamples",
        "300",
        "--table-format",
        "csv",
        "-b",
        "1",
        "--ray",
        cluster,
        "--workers",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while _units(runs) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not out.exists() and 2 <= _units(runs) < 10
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed)" in done.stderr
    assert (
        cli_exit_code(
            [
                "knockout",
                "--scan-layers",
                "--corpus",
                str(corpus.path),
                "--resamples",
                "300",
                "--table-format",
                "csv",
                "-b",
                "1",
                "-o",
                str(tmp_path / "local.json"),
            ]
        )
        == 0
    )
    _same_files(out, tmp_path / "local.json")
    t0 = time.monotonic()  # the two drivers' actors die with them: their CPUs return to the cluster
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() - t0 < 120, ray.available_resources()
        time.sleep(0.5)
    print(f"CPUs back after {time.monotonic() - t0:.1f} s")


def test_a_ray_driver_holds_no_weights_and_its_runs_resume_locally(smollm):
    """The driver's model is on the meta device (tokenizer, config and weight hashes only); its run identity is a
    local run's, so units a Ray run left resume without Ray and vice versa."""
    from plipy.cluster.pool import Cluster, driver_model
    from plipy.runtime.checkpoint import run_identity

    lm = driver_model("smollm2-135m", "auto", "auto", Cluster(gpus=0), prestart=False)
    assert next(lm.model.parameters()).device.type == "meta" and lm.device == torch.device("cpu")
    assert (lm.n_layers, lm.n_heads, lm.max_positions) == (smollm.n_layers, smollm.n_heads, smollm.max_positions)
    assert run_identity("scan", model=lm) == run_identity("scan", model=smollm)
    gpu = driver_model("smollm2-135m", "auto", "auto", Cluster(gpus=8), prestart=False)
    assert gpu.device == torch.device("cuda") and next(gpu.model.parameters()).dtype == torch.bfloat16


def test_the_test_clusters_ray_processes_listen_on_loopback_only(cluster):
    """Every socket the Ray processes this test session started listen on is loopback (and there are some)."""
    import psutil

    me = psutil.Process()
    pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
    conns = psutil.net_connections("inet")
    listening = [(c.pid, c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert cluster.startswith("127.0.0.1:") and len(listening) >= 3, (cluster, listening)
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in listening), listening


def test_bad_ray_options_fail_before_the_model_loads(tmp_path, capsys):
    assert cli_exit_code(["scan", "--workers", "2"]) == 2
    assert "error: --workers: needs ray" in capsys.readouterr().err
    assert cli_exit_code(["knockout", "--ray", "--workers", "0"]) == 2
    assert "error: --workers: must be an integer ≥ 1, got 0" in capsys.readouterr().err


def test_a_worker_that_cannot_load_the_model_is_one_error_line(cluster, smollm, monkeypatch):
    import plipy
    from plipy.cluster.pool import Cluster, RayPool
    from plipy.errors import PlipyError
    from plipy.models import wrap_model

    pool = RayPool({"spec": "/nonexistent/model"}, Cluster(workers=1))
    with pytest.raises(PlipyError, match=r"^ray: a worker could not start: no such file or directory: /nonexistent"):
        pool.ready()
    deadline = time.monotonic() + 30  # its actors are gone (killed asynchronously)
    while set(pool.names) & {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    plipy.knockout("smollm2-135m", layer=3, ray=True, workers=2, resamples=100, resume=False)  # a warm pool …
    crowded = RayPool({"spec": "smollm2-135m", "dtype": "float32"}, Cluster(workers=2))
    monkeypatch.setenv("PLIPY_RAY_PLACE_GRACE", "3")
    with pytest.raises(PlipyError, match=r"^ray: 2 of 2 workers cannot be placed: each needs 1 CPU"):
        crowded.ready()  # … holds both CPUs: a second pool cannot be placed, and says so
    monkeypatch.setenv("PLIPY_RAY_PLACE_GRACE", "999")  # past the start timeout, whatever the cause: one line
    monkeypatch.setenv("PLIPY_RAY_START_TIMEOUT", "1")
    with pytest.raises(PlipyError, match=r"^ray: 2 of 2 workers did not start within 1 s .* raise PLIPY_RAY_START"):
        RayPool({"spec": "smollm2-135m", "dtype": "float32"}, Cluster(workers=2)).ready()
    with pytest.raises(PlipyError, match="workers load the model from its spec"):
        plipy.scan(wrap_model(smollm.model, smollm.tokenizer), layers="0", ray=True, resume=False)


# ---------------------------------------------------------------------------------------------- sweep


@pytest.fixture(scope="module")
def tiny_dir(smollm, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local model folder."""
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), smollm.tokenizer)


def _values(doc: dict, group: str, layer: int) -> np.ndarray:
    return np.array([s["attention"][layer] for s in doc["samples"] if s["group"] == group and "attention" in s])


def _hedges(a: np.ndarray, b: np.ndarray) -> float:
    """Hedges' g with the exact small-sample factor J = Γ(df/2) / (√(df/2) Γ((df−1)/2)), in float64."""
    na, nb = len(a), len(b)
    df = na + nb - 2
    sp = np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / df)
    j = np.exp(gammaln(df / 2) - gammaln((df - 1) / 2)) / np.sqrt(df / 2)
    return float((a.mean() - b.mean()) / sp * j)


def test_sweep_writes_each_result_and_the_comparison(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = cli_exit_code(
        [
            "sweep",
            "--models",
            f"smollm2-135m,{tiny_dir}",
            "-d",
            str(out),
            "scan",
            "--corpus",
            str(corpus.path),
            "--resamples",
            "300",
            "--table-format",
            "csv",
        ]
    )
    assert code == 0
    names = ["smollm2-135m", tiny_dir.name]
    docs = [json.loads((out / f"scan-{n}.json").read_text()) for n in names]
    sweep = json.loads((out / "sweep-scan.json").read_text())
    assert sweep["provenance"]["kind"] == "sweep" and len(sweep["comparison"]) == 2
    assert [m["file"] for m in sweep["models"]] == [str(out / f"scan-{n}.json") for n in names]
    for doc, row, n_layers in zip(docs, sweep["comparison"], (30, 4), strict=True):
        assert row["n_layers"] == n_layers == len(doc["layers_scanned"])
        # the layer of the largest |Hedges' g|, recomputed from the per-sample values of the model's own result
        ga, gb = doc["groups_compared"]
        hedges = [_hedges(_values(doc, ga, i), _values(doc, gb, i)) for i in range(n_layers)]
        best = int(np.argmax(np.abs(hedges)))
        assert row["max_effect_layer"] == best
        assert row["hedges_g"] == pytest.approx(hedges[best], rel=1e-9)
        a, b = _values(doc, ga, best), _values(doc, gb, best)
        assert row["mean_a"] == pytest.approx(a.mean(), rel=1e-12)
        assert row["ratio"] == pytest.approx(a.mean() / b.mean(), rel=1e-12)
        nulls = {g: np.mean([s["uniform_null"] for s in doc["samples"] if s["group"] == g]) for g in (ga, gb)}
        assert row["null_ratio"] == pytest.approx(nulls[ga] / nulls[gb], rel=1e-12)
    table = (out / "sweep-scan.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("model,")
    assert "Sweep: scan over 2 models" in capsys.readouterr().out


def test_sweep_refuses_per_model_options(tmp_path, capsys):
    assert cli_exit_code(["sweep", "--models", "a,b", "scan", "-o", str(tmp_path / "x.json")]) == 2
    assert "the sweep sets the model and output" in capsys.readouterr().err
    assert cli_exit_code(["sweep", "--models", "a", "lens"]) == 2
    assert "experiment" in capsys.readouterr().err


def test_sweep_checks_every_model_before_the_first_runs(tiny_dir, tmp_path, capsys):
    # the first model is real and would run for a while; the typo in the second must stop the sweep before it
    missing = tmp_path / "no-such-model"
    code = cli_exit_code(["sweep", "--models", f"{tiny_dir},{missing}", "--out-dir", str(tmp_path / "o"), "scan"])
    err = capsys.readouterr().err
    assert code != 0 and f"no such file or directory: {missing}" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
