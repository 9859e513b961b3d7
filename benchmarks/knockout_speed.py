"""Knockout cost: the cached-baseline runner (fast path) vs one full forward per condition (naive), same run.

Workload: `plipy knockout --scan-layers` (each of the model's layers alone) over every sample of the bundled corpus
(all four groups; samples without edges are skipped by both paths alike). Target: fast ≤ 0.30× naive.
Both paths run each sample back to back (alternating which goes first), so load changes on a shared machine hit
both alike; times include each path's own baseline forward, not the KL measures (identical for both).
Run by hand; paste the printed table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from plipy.corpus import load_corpus, token_positions
from plipy.divergence import kl_divergence
from plipy.engine import Engine
from plipy.engine.runner import ConditionRunner, RunnerStats, layer_windows
from plipy.experiments import knockout as ko
from plipy.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--edges", default="marker-to-targets", choices=ko.EDGE_KINDS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32, help="conditions per batched forward (fast path)")
    ap.add_argument("--unbatched", action="store_true", help="also time the fast path with one condition per call")
    ap.add_argument("--limit", type=int, default=None, help="only the first N samples (quick check)")
    args = ap.parse_args()

    lm = load_model(args.model, dtype="float32", device=args.device)
    engine = Engine(lm.model)
    runners = {
        "fast": ConditionRunner(lm.model, engine, path="fast", max_batch=args.batch),
        "naive": ConditionRunner(lm.model, engine, path="naive"),
    }
    if args.unbatched:
        runners["fast, unbatched"] = ConditionRunner(lm.model, engine, path="fast", max_batch=1)
    conditions = ko.build_conditions("scan-layers", lm.n_layers)
    windows = layer_windows(lm.model, lm.n_layers)
    items = []
    for s in load_corpus().samples():
        sp = token_positions(s, lm.tokenizer)
        edges, status, _ = ko.knockout_edges(sp, args.edges)
        if status == "ok":
            items.append((sp.input_ids, [ko.condition_edits(edges, c.layers, None, windows) for c in conditions]))
    items = items[: args.limit]

    times = {k: 0.0 for k in runners}
    worst = 0.0
    with torch.inference_mode():
        runners["fast"].run(runners["fast"].baseline(items[0][0]), items[0][1][:2])  # warm-up
        runners["fast"].stats = RunnerStats()
        for i, (ids, conds) in enumerate(items):
            logits = {}
            names = list(runners) if i % 2 == 0 else list(reversed(runners))
            for name in names:
                r = runners[name]
                t = time.perf_counter()
                base = r.baseline(ids)
                outs = r.run(base, conds)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name] += time.perf_counter() - t
                logits[name] = (base.logits, outs)
            (bf, of), (bn, on) = logits["fast"], logits["naive"]
            for a, b in zip(of, on, strict=True):
                if a.logits is not None:
                    worst = max(worst, abs(float(kl_divergence(bf, a.logits)) - float(kl_divergence(bn, b.logits))))

    n_tok = sum(len(ids) for ids, _ in items)
    print(
        f"model {args.model}, {len(items)} samples ({n_tok} tokens), {len(conditions)} conditions each "
        f"(--scan-layers, {args.edges}), device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"max |KL fast − KL naive| = {worst:.2e} nats\n")
    naive = times["naive"]
    print("| path | seconds | × naive | forward calls | layer·token units |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runners.items():
        d = r.describe()
        print(
            f"| {name} | {times[name]:.1f} | {times[name] / naive:.3f} | {d['forward_calls']} | "
            f"{d['layer_token_units']} |"
        )


if __name__ == "__main__":
    main()
