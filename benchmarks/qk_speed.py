"""QK attribution cost on SmolLM2: the capture forward against a plain forward, and the decomposition's time against
the number of components.

Run by hand; paste the printed tables into benchmarks/RESULTS.md. Part 1 runs every sample of the two compared
groups once per round, the configurations interleaved so drift hits all alike, and reports the median round:
  - a plain SDPA forward (the model alone);
  - plipy's capture at one layer (the residual entering it and every earlier component's output, at the query and
    key rows only, the scores as the check) — sublayer components, then per-head components;
  - the same hooks at every position (what a full cache of them costs);
  - capture + the decomposition of every head (the whole per-sample work of `plipy.qk`).
Part 2 times the decomposition alone (projection of both sides, then the pair matrix) on random components at the
real layer's weights, for growing numbers of components: on one side only (the other fixed), and on both.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from functools import partial

import torch

from plipy.corpus import load_corpus, token_positions
from plipy.engine import qk as eq
from plipy.engine.cache import TraceSpec
from plipy.engine.cache import capture as trace_capture
from plipy.experiments.qk import Item, decompose
from plipy.models import load_model


def _items(lm, layer: int) -> list[Item]:
    out = []
    for s in load_corpus().samples(["python_doctest", "rust_test"]):
        sp = token_positions(s, lm.tokenizer)
        keys = [t for t, a in zip(sp.target_tokens, sp.after_marker, strict=True) if t is not None and not a]
        if sp.marker_token is not None and keys:
            out.append(Item({"id": s.id}, list(sp.input_ids), sp.marker_token, keys, []))
    return out


def _plain(model, ids, items) -> None:
    for x in ids:
        model(x)


def _capture(model, ids, items, layer: int, per_head: bool) -> None:
    for x, it in zip(ids, items, strict=True):
        eq.capture(model, x, layer, [it.query, *it.keys], per_head=per_head)


def _every_position(model, ids, items, spec: TraceSpec) -> None:
    for x in ids:
        trace_capture(model, x, spec)


def _whole(model, ids, items, layer: int, qmap: eq.QkMap) -> None:
    heads = list(range(qmap.n_heads))
    for x, it in zip(ids, items, strict=True):
        decompose(qmap, eq.capture(model, x, layer, [it.query, *it.keys]), it, heads, None)


def _median_rounds(configs: dict, args: tuple, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in configs}
    with torch.inference_mode():
        for fn in configs.values():
            fn(*args)  # warm-up
        for _ in range(rounds):
            for name, fn in configs.items():
                t = time.perf_counter()
                fn(*args)
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def part1(lm, layer: int, rounds: int) -> None:
    items = _items(lm, layer)
    qmap = eq.qk_map(lm.model, layer)
    ids = [torch.tensor([it.input_ids]) for it in items]
    earlier = tuple(range(layer))
    spec = TraceSpec(
        {"hook_resid_pre": (0, layer), "hook_attn_scores": (layer,), "hook_attn_out": earlier, "hook_mlp_out": earlier}
    )
    configs = {
        "plain SDPA forward": _plain,
        f"capture at layer {layer} (query + key rows)": partial(_capture, layer=layer, per_head=False),
        f"capture at layer {layer}, per-head components": partial(_capture, layer=layer, per_head=True),
        "the same hooks at every position": partial(_every_position, spec=spec),
        "capture + decomposition of all heads": partial(_whole, layer=layer, qmap=qmap),
    }
    medians = _median_rounds(configs, (lm.model, ids, items), rounds)
    base = medians["plain SDPA forward"]
    n_tok = sum(x.shape[1] for x in ids)
    print(f"\n{len(items)} samples ({n_tok} tokens), layer {layer}, {rounds} rounds, median round\n")
    print("| configuration | median time | × plain forward |")
    print("|---|---|---|")
    for name, m in medians.items():
        print(f"| {name} | {m:.2f} s | {m / base:.3f} |")


def part2(lm, layer: int, repeats: int) -> None:
    qmap = eq.qk_map(lm.model, layer)
    d_model = qmap.w_q.shape[-1]
    g = torch.Generator().manual_seed(0)
    heads = list(range(qmap.n_heads))

    def timed(n_q: int, n_k: int) -> float:
        q_parts = torch.randn(n_q, d_model, generator=g, dtype=torch.float64)
        k_parts = torch.randn(n_k, d_model, generator=g, dtype=torch.float64)
        rope = (torch.ones(qmap.head_dim, dtype=torch.float64), torch.zeros(qmap.head_dim, dtype=torch.float64))
        best = []
        for _ in range(repeats):
            t = time.perf_counter()
            _, q = eq.project(qmap, "q", [""] * n_q, q_parts, q_parts.sum(0), rope)
            _, k = eq.project(qmap, "k", [""] * n_k, k_parts, k_parts.sum(0), rope)
            eq.terms(qmap, q, k, heads)
            best.append(time.perf_counter() - t)
        return min(best)

    print(f"\nDecomposition alone (one query, one key, {len(heads)} heads, d_model {d_model}), best of {repeats}\n")
    print("| components | one side (other: 64) | per component | both sides | per pair |")
    print("|---:|---:|---:|---:|---:|")
    for n in (16, 64, 256, 1024, 4096):
        one, both = timed(n, 64), timed(n, n)
        print(
            f"| {n} | {1e3 * one:.2f} ms | {1e6 * one / n:.1f} µs | {1e3 * both:.2f} ms | {1e9 * both / n**2:.1f} ns |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=13)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    lm = load_model(args.model, dtype="float32", device="cpu")
    print(
        f"load average before: {os.getloadavg()}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    part1(lm, args.layer, args.rounds)
    part2(lm, args.layer, args.repeats)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
