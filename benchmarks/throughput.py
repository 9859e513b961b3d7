"""Throughput on one CPU (issue 15): the scan against plain SDPA forwards on short and long inputs, batched vs
one-by-one, peak RSS against input length, and the cost of a `to-marker` knockout edit on a long input.

Every ratio is measured within one run, the configurations it compares interleaved round by round (median of the
rounds), so load on a shared machine hits both alike. "Plain SDPA" is the model's own forward computing only the
last position's logits (`logits_to_keep=1`, as plipy does): the strictest baseline. Peak RSS comes from a fresh
process per configuration (/proc VmHWM). Run by hand; paste the printed tables into benchmarks/RESULTS.md.

    python benchmarks/throughput.py                     # everything (~15 min on 2 idle cores)
    python benchmarks/throughput.py --only short        # short corpus only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import plipy
from plipy.corpus import load_corpus, token_positions
from plipy.engine import EdgeEdit, Engine
from plipy.engine.batch import pad_left, plan_batches
from plipy.experiments import samples as sc
from plipy.models import load_model

LENGTHS = (512, 2048, 4096, 8192)


def _lm(model: str):
    return load_model(model, dtype="float32", device="cpu")


def _corpus_positions(lm):
    corpus = load_corpus()
    groups, _ = sc.choose_groups(corpus, None)
    return [token_positions(s, lm.tokenizer) for s in corpus.samples(groups)]


def long_positions(lm, n_tokens: int):
    """A corpus sample followed by more corpus code, cut at `n_tokens`: the marker and its targets stay early."""
    corpus = load_corpus()
    sample = corpus.groups["python_doctest"][0]
    filler = "\n".join(s.code for g in corpus.group_names for s in corpus.groups[g])
    code = sample.code
    while len(lm.tokenizer(code, add_special_tokens=False)["input_ids"]) < n_tokens:
        code += "\n" + filler
    enc = lm.tokenizer(code, add_special_tokens=False, return_offsets_mapping=True)
    code = code[: enc["offset_mapping"][n_tokens - 1][1]]
    from dataclasses import replace

    return token_positions(replace(sample, code=code), lm.tokenizer)


def plain(lm, sps, batch: int) -> None:
    """Plain SDPA forwards of the samples in plipy's batches, last-position logits only."""
    for b in plan_batches([sp.seq_len for sp in sps], batch):
        p = pad_left([sps[i].input_ids for i in b], lm.tokenizer.eos_token_id, lm.device)
        lm.model(p.ids, **p.forward_kwargs(), logits_to_keep=1)


def scan_forwards(lm, engine, sps, batch: int, layers) -> None:
    """The scan's forwards (marker row captured at every layer), in the same batches."""
    for b in plan_batches([sp.seq_len for sp in sps], batch):
        sc.marker_rows(lm, engine, [sps[i] for i in b], layers)


def interleave(configs: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per configuration, configurations interleaved round by round after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in configs}
    with torch.inference_mode():
        for fn in configs.values():
            fn()
        for r in range(rounds):
            names = list(configs) if r % 2 == 0 else list(reversed(configs))
            for name in names:
                t = time.perf_counter()
                configs[name]()
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def short(args) -> None:
    lm = _lm(args.model)
    engine = Engine(lm.model)
    sps = _corpus_positions(lm)
    layers = list(range(lm.n_layers))
    corpus = load_corpus()
    t = interleave(
        {
            "plain SDPA, one by one": lambda: plain(lm, sps, 1),
            "scan forwards, one by one": lambda: scan_forwards(lm, engine, sps, 1, layers),
            "plain SDPA, batches of 16": lambda: plain(lm, sps, 16),
            "scan forwards, batches of 16": lambda: scan_forwards(lm, engine, sps, 16, layers),
            "plipy.scan (all: forwards, measures, statistics), batches of 16": lambda: plipy.scan(
                lm, corpus, batch_size=16, resume=False
            ),
        },
        args.rounds,
    )
    n_tok = sum(sp.seq_len for sp in sps)
    print(f"\n### Short corpus: {len(sps)} samples, {n_tok} tokens, all {lm.n_layers} layers, {args.rounds} rounds\n")
    print("| configuration | median | × plain SDPA (same batching) | samples/s |")
    print("|---|---:|---:|---:|")
    ref = {"one by one": t["plain SDPA, one by one"], "16": t["plain SDPA, batches of 16"]}
    for name, sec in t.items():
        base = ref["one by one"] if "one by one" in name else ref["16"]
        print(f"| {name} | {sec:.2f} s | {sec / base:.3f} | {len(sps) / sec:.1f} |")
    gain = t["scan forwards, one by one"] / t["scan forwards, batches of 16"]
    print(f"\nbatched scan throughput: {gain:.2f}× one-by-one")


def long(args) -> None:
    lm = _lm(args.model)
    engine = Engine(lm.model)
    layers = list(range(lm.n_layers))
    print(f"\n### Long inputs: one sample, all {lm.n_layers} layers, {args.rounds} rounds\n")
    print("| tokens | plain SDPA | scan forward | × plain | to-marker knockout, one layer | edit overhead |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.lengths:
        sp = long_positions(lm, n)
        t = interleave(_long_configs(lm, engine, sp, layers), args.rounds)
        print(
            f"| {n} | {t['plain']:.2f} s | {t['scan']:.2f} s | {t['scan'] / t['plain']:.3f} | "
            f"{t['knock']:.2f} s | {100 * (t['knock'] / t['plain'] - 1):+.1f}% |"
        )
        sys.stdout.flush()


def _long_configs(lm, engine, sp, layers) -> dict[str, Callable[[], None]]:
    """Plain forward, the scan's forward, and a forward knocking out every query → marker edge in one layer."""
    ids = torch.tensor([sp.input_ids])
    m, n = sp.marker_token, sp.seq_len
    knock = [EdgeEdit(layers=[lm.n_layers // 2], edges=torch.tensor([[q, m] for q in range(m, n)]), scale=0.0)]

    def knocked() -> None:
        with engine.run(edits=knock):
            lm.model(ids, logits_to_keep=1)

    return {
        "plain": lambda: lm.model(ids, logits_to_keep=1),
        "scan": lambda: sc.marker_rows(lm, engine, [sp], layers),
        "knock": knocked,
    }


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(args) -> None:
    """One configuration in a fresh process: peak RSS above the loaded, paged-in model."""
    lm = _lm(args.model)
    sp = long_positions(lm, args.child_len)
    engine = Engine(lm.model)
    with torch.inference_mode():  # page in the (memory-mapped) weights with a 16-token forward
        lm.model(torch.tensor([sp.input_ids[:16]]), logits_to_keep=1)
    # reset the high-water mark to the current RSS (Linux ≥ 4.0): the peak is then the forward's own
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loaded = _rss("VmRSS")
    with torch.inference_mode():
        if args.child == "plain":
            lm.model(torch.tensor([sp.input_ids]), logits_to_keep=1)
        else:
            sc.marker_rows(lm, engine, [sp], list(range(lm.n_layers)))
    print(json.dumps({"loaded": loaded, "peak": _rss("VmHWM")}))


# glibc serves blocks under its (adaptive) mmap threshold from the heap and keeps them after free, so RSS would
# measure fragmentation, not live tensors; a fixed 1 MiB threshold returns every large tensor to the OS on free.
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def memory(args) -> None:
    print("\n### Peak RSS above the loaded model, weights paged in (fresh process each)\n")
    print("| tokens | plain SDPA | scan forward |")
    print("|---:|---:|---:|")
    for n in args.lengths:
        row = []
        for what in ("plain", "scan"):
            out = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--child", what, "--child-len", str(n)],
                check=True,
                capture_output=True,
                text=True,
                env=MALLOC_ENV,
            ).stdout
            m = json.loads(out.strip().splitlines()[-1])
            row.append(f"{(m['peak'] - m['loaded']) / 2**20:.0f} MiB")
        print(f"| {n} | {row[0]} | {row[1]} |")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(LENGTHS))
    ap.add_argument("--only", choices=("short", "long", "memory"))
    ap.add_argument("--child", choices=("plain", "scan"), help=argparse.SUPPRESS)
    ap.add_argument("--child-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(
        f"model {args.model} fp32 on CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    for part, fn in (("short", short), ("long", long), ("memory", memory)):
        if args.only in (None, part):
            fn(args)


if __name__ == "__main__":
    main()
