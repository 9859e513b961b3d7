"""Steering cost: the default dose run (6 doses, one layer) on the cached baseline vs one full forward per dose.

Workload: `plipy steer dose` defaults — group rust_test, PLIP's default layer (16 on 30 layers), doses
0.5,1,2,3,4,6, every head, attention achieved captured — over every sample of the group. Target: fast ≤ 0.35× naive.
Both paths run each sample back to back (alternating which goes first), so load changes on a shared machine hit
both alike; times include each path's baseline forward (with its capture), not the KL measures (identical for both).
Run by hand; paste the printed table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from plipy.corpus import load_corpus, token_positions
from plipy.divergence import kl_divergence
from plipy.engine import Capture, Engine
from plipy.engine.runner import ConditionRunner, RunnerStats
from plipy.experiments import edge_steering as es
from plipy.models import load_model
from plipy.options import plip_default_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group", default="rust_test")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--doses", default="0.5,1,2,3,4,6")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--unbatched", action="store_true", help="also time the fast path with one dose per call")
    ap.add_argument("--limit", type=int, default=None, help="only the first N samples (quick check)")
    args = ap.parse_args()

    lm = load_model(args.model, dtype="float32", device=args.device)
    engine = Engine(lm.model)
    runners = {
        "fast (one batch per sample)": ConditionRunner(lm.model, engine, path="fast"),
        "naive (full forward per dose)": ConditionRunner(lm.model, engine, path="naive"),
    }
    if args.unbatched:
        runners["fast, one dose per call"] = ConditionRunner(lm.model, engine, path="fast", max_batch=1)
    layer = plip_default_layer(lm.n_layers) if args.layer is None else args.layer
    doses = [float(x) for x in args.doses.split(",")]
    items = []
    for s in load_corpus().samples(args.group):
        ss = es.steer_sample(token_positions(s, lm.tokenizer))
        if ss.status == "ok":
            cap = Capture(rows=[ss.positions.marker_token], layers=[layer])
            items.append((ss.positions.input_ids, cap, [es.edge_edits(ss, [layer], d, None) for d in doses]))
    items = items[: args.limit]

    names = list(runners)
    times = {k: 0.0 for k in runners}
    worst_kl = worst_att = 0.0
    with torch.inference_mode():
        r0 = runners[names[0]]
        r0.run(r0.baseline(items[0][0], items[0][1]), items[0][2][:2], capture=items[0][1])  # warm-up
        r0.stats = RunnerStats()
        for i, (ids, cap, conds) in enumerate(items):
            got = {}
            for name in names if i % 2 == 0 else list(reversed(names)):
                r = runners[name]
                t = time.perf_counter()
                base = r.baseline(ids, capture=cap)
                outs = r.run(base, conds, capture=cap)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name] += time.perf_counter() - t
                got[name] = (base, outs)
            (bf, of), (bn, on) = got[names[0]], got[names[1]]
            for a, b in zip(of, on, strict=True):
                worst_kl = max(
                    worst_kl, abs(float(kl_divergence(bf.logits, a.logits)) - float(kl_divergence(bn.logits, b.logits)))
                )
                worst_att = max(worst_att, float((a.attn[layer] - b.attn[layer]).abs().max()))

    n_tok = sum(len(ids) for ids, _, _ in items)
    print(
        f"model {args.model}, {len(items)} samples of {args.group} ({n_tok} tokens), layer {layer}, doses "
        f"{args.doses}, device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"max |KL fast − KL naive| = {worst_kl:.2e} nats, max |attention row fast − naive| = {worst_att:.2e}\n")
    naive = times[names[1]]
    print("| path | seconds | × naive | forward calls | layer·token units |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runners.items():
        d = r.describe()
        print(
            f"| {name} | {times[name]:.2f} | {times[name] / naive:.3f} | {d['forward_calls']} | "
            f"{d['layer_token_units']} |"
        )


if __name__ == "__main__":
    main()
