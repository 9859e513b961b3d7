"""Patching cost: exact all-heads activation patching with the cached-run runner (fast path) vs one full forward per
head (naive), attribution patching in forward-equivalents, and what a pair holds in memory.

Workload: every head of the model (SmolLM2-135M: 30 layers × 9 heads = 270), patched at every position, denoising
(the corrupt run with one head's output from the clean run), over the PLIP pairs (the bundled corpus' python_doctest
and rust_test samples with their marker-neutral twins). Targets: fast ≤ 0.35× naive; attribution ≤ 3 forward
equivalents per pair; memory O(T). Both paths run each pair back to back (alternating which goes first), so load
changes on a shared machine hit both alike; times include each path's own unpatched forwards, not the metric.
Run by hand; paste the printed tables into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from plipy.corpus import load_corpus, token_positions
from plipy.divergence import kl_divergence
from plipy.engine import Engine
from plipy.engine.patching import PatchRunner, PatchStats, Run, Site, SitePatch
from plipy.engine.runner import last_logits_only
from plipy.experiments.counterfactual import marker_twin
from plipy.experiments.patching import Metric, first_order
from plipy.models import load_model


def _bytes(run: Run) -> int:
    tensors = [*run.resid, *run.z, *run.attn, *run.mlp, *(t for kv in run.kv or [] for t in kv)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _exact(runners: dict, pairs: list, sites: list[Site], device: str) -> tuple[dict, float, list]:
    times = {k: 0.0 for k in runners}
    worst, held = 0.0, []
    for i, (clean, corrupt) in enumerate(pairs):
        kls = {}
        for name in list(runners) if i % 2 == 0 else list(reversed(runners)):
            r = runners[name]
            t = time.perf_counter()
            c, k = r.baselines([clean, corrupt])
            every = torch.arange(len(clean))
            logits = r.run(k, [[SitePatch(s, every, c.value(s))] for s in sites])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name] += time.perf_counter() - t
            kls[name] = [float(kl_divergence(c.logits, lg)) for lg in logits]
            if name == "fast":
                held.append((len(clean), _bytes(c) + _bytes(k)))
        worst = max(worst, max(abs(a - b) for a, b in zip(kls["fast"], kls["naive"], strict=True)))
    return times, worst, held


def _attribution(lm, runner: PatchRunner, pairs: list, sites: list[Site]) -> list[float]:
    """Per pair: (corrupt forward in grad mode + clean forward of the positions from the first changed token on +
    one backward + the estimates) / one plain forward of the corrupt sequence."""
    keep = last_logits_only(lm.model)
    metric = Metric("kl")
    ratios = []
    for clean, corrupt in pairs:
        ids = torch.tensor([corrupt], device=lm.device)
        t = time.perf_counter()
        with torch.inference_mode(), runner.engine.run():
            lm.model(ids, **keep)
        one = time.perf_counter() - t
        t = time.perf_counter()
        tr = runner.traced(corrupt)
        c = runner.suffix_run(clean, prefix=tr.run)  # from the first token the twins differ in, on tr's K/V
        grads = runner.gradients(tr, metric.value(tr.logits, c.logits, None, None))
        with torch.no_grad():  # the experiment's own estimate of every site, at every position
            first_order(c, tr.run, grads, sites, torch.arange(len(corrupt), device=lm.device), tr.start)
        ratios.append((time.perf_counter() - t) / one)
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32, help="patched conditions per batched forward (fast path)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N pairs (quick check)")
    args = ap.parse_args()

    lm = load_model(args.model, dtype="float32", device=args.device)
    engine = Engine(lm.model)
    runners = {
        "fast": PatchRunner(lm.model, engine, path="fast", max_batch=args.batch),
        "naive": PatchRunner(lm.model, engine, path="naive"),
    }
    corpus = load_corpus()
    pairs = []
    for s in corpus.samples(["python_doctest", "rust_test"]):
        sp = token_positions(s, lm.tokenizer)
        pairs.append((list(sp.input_ids), list(marker_twin(sp, lm.tokenizer).ids)))
    pairs = pairs[: args.limit]
    sites = [Site("head", layer, h) for layer in range(lm.n_layers) for h in range(lm.n_heads)]
    with torch.inference_mode():  # warm-up
        c, k = runners["fast"].baselines(pairs[0])
        runners["fast"].run(k, [[SitePatch(sites[0], torch.arange(len(pairs[0][0])), c.value(sites[0]))]])
    runners["fast"].stats = PatchStats()

    times, worst, held = _exact(runners, pairs, sites, args.device)
    n_tok = sum(len(a) for a, _ in pairs)
    first = sum(len(a) - next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y) for a, b in pairs)
    print(
        f"model {args.model}, {len(pairs)} pairs ({n_tok} tokens; {first / n_tok:.2f} of them at or after the first "
        f"changed token), {len(sites)} heads each, every position, denoising; device {args.device}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"max |KL fast − KL naive| = {worst:.2e} nats\n")
    print("| path | seconds | × naive | forward calls | layer·token units |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runners.items():
        d = r.describe()
        print(
            f"| {name} | {times[name]:.1f} | {times[name] / times['naive']:.3f} | {d['forward_calls']} | "
            f"{d['layer_token_units']} |"
        )
    per_token = [b / t for t, b in held]
    print(
        f"\nheld per pair (both runs: every layer's input, head outputs, sublayer outputs, K/V): "
        f"{statistics.mean(per_token) / 1024:.1f} KiB per token (min {min(per_token) / 1024:.1f}, max "
        f"{max(per_token) / 1024:.1f}) over T = {min(t for t, _ in held)}…{max(t for t, _ in held)}: linear in T"
    )
    ratios = _attribution(lm, PatchRunner(lm.model, engine), pairs, [*sites])
    print(
        f"attribution (corrupt forward in grad mode + clean suffix forward + one backward + {len(sites)} estimates) "
        f"per pair: "
        f"{statistics.median(ratios):.2f} forward-equivalents (median; mean {statistics.mean(ratios):.2f}, max "
        f"{max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
