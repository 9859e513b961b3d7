"""Ray overhead: `plipy knockout --scan-layers` locally vs on a local Ray instance with 1 and 2 workers.

Workload: every sample of the bundled corpus's two PLIP groups, each of the model's layers alone (the issue's
workload), each run from the model spec like a command (the local run loads the model; a Ray driver loads none and
its workers load it). Configurations alternate per round (then reversed) so load drift on a shared machine hits
all alike; the Ray instance starts once, before the rounds (a cluster exists before a run), and each Ray run
includes its own actor start and model load (part of what a run costs), except the "warm" one, which reuses the
pool the run before it left (a sweep's or a notebook's next run on the same model). Also: the round trip of
one unit through an actor (scheduling + a typical knockout unit's result) in ms, and a check that every Ray
result equals the local one (provenance aside). Run by hand; paste the printed table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time

import torch


def _unit_roundtrip_ms(ray, payload: list, n: int = 300) -> float:
    @ray.remote(num_cpus=0)
    class Echo:
        def run(self, tag: int, batch: list[int]) -> tuple[int, list]:
            return tag, payload

    a = Echo.remote()
    ray.get(a.run.remote(0, [0]))
    t0 = time.perf_counter()
    for i in range(n):
        ray.get(a.run.remote(i, [i]))
    ms = (time.perf_counter() - t0) / n * 1e3
    ray.kill(a)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="only the first N samples per group (quick check)")
    args = ap.parse_args()

    import ray

    import plipy
    from plipy.corpus import load_corpus

    corpus = load_corpus()
    if args.limit:
        import tempfile

        from plipy.io import write_json

        keep = {g: [s for s in corpus.samples([g])][: args.limit] for g in ("python_doctest", "rust_test")}
        path = os.path.join(tempfile.mkdtemp(), "corpus.json")
        write_json(
            path,
            {
                "_format_version": "2.0",
                **{
                    g: [
                        {
                            "id": s.id,
                            "code": s.code,
                            "marker_char_pos": s.marker_char_pos,
                            "marker_pattern": s.marker_pattern,
                            "target_char_positions": list(s.target_char_positions),
                        }
                        for s in ss
                    ]
                    for g, ss in keep.items()
                },
            },
        )
        corpus = load_corpus(path)
    cpus = os.cpu_count() or 2
    t0 = time.perf_counter()
    ray.init(
        num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, namespace="plipy"
    )
    init_s = time.perf_counter() - t0
    from plipy.cluster import Cluster, shutdown

    n_layers = plipy.load_model(args.model, dtype="float32", device="cpu", weights=False).n_layers
    kw = {"scan_layers": True, "resume": False, "resamples": 1000, "dtype": "float32"}
    # every configuration starts from the spec, as a command does: the model load is part of each run
    configs = {
        "local": {},
        "ray, 1 worker": {"ray": True, "workers": 1},
        "ray, 1 worker, warm pool (the run after)": {"ray": True, "workers": 1},
        "ray, 2 workers": {"ray": True, "workers": 2},
        "ray, 2 workers × 1 thread, batches of 4": {"ray": Cluster(threads=1), "workers": 2, "batch_size": 4},
    }
    blocks = [
        ["local"],
        ["ray, 1 worker", "ray, 1 worker, warm pool (the run after)"],
        ["ray, 2 workers"],
        ["ray, 2 workers × 1 thread, batches of 4"],
    ]
    times: dict[str, list[float]] = {k: [] for k in configs}
    docs: dict[str, str] = {}
    for r in range(args.rounds):
        for block in blocks if r % 2 == 0 else blocks[::-1]:
            shutdown()  # each block starts cold; "warm" reuses the pool of the run just before it
            for name in block:
                t = time.perf_counter()
                res = plipy.knockout(args.model, corpus, **kw, **configs[name])
                times[name].append(time.perf_counter() - t)
                d = res.to_dict()
                d.pop("provenance")
                docs.setdefault(name, json.dumps(d, sort_keys=True))
                print(f"round {r}: {name}: {times[name][-1]:.1f} s", flush=True)
    shutdown()
    n_samples = sum(s["status"] == "ok" for s in json.loads(docs["local"])["samples"])
    unit = json.loads(docs["local"])["runs"]  # a unit's value: one row per condition of one sample
    payload = [run["samples"][0] for run in unit]
    rt = _unit_roundtrip_ms(ray, payload)
    base = statistics.median(times["local"])
    print(
        f"\n{platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__}, "
        f"ray {ray.__version__}; {args.model}, {n_samples} samples × {n_layers} conditions, "
        f"{args.rounds} rounds (median); Ray instance start {init_s:.1f} s (not counted)\n"
    )
    print("| configuration | median time | × local | result equals local |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        same = "yes" if docs[name] == docs["local"] else "no"
        same = (
            "—"
            if name == "local"
            else (same + " (other threads: fp32 sums round differently)" if "1 thread" in name else same)
        )
        print(f"| {name} | {statistics.median(ts):.1f} s | {statistics.median(ts) / base:.3f} | {same} |")
    print(f"\nper-unit round trip through an actor (schedule + return a {len(payload)}-row unit): {rt:.2f} ms")


if __name__ == "__main__":
    main()
