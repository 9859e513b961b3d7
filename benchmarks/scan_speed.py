"""Layer-scan cost on SmolLM2 over the bundled corpus: the scan (`plipy.scan`) vs plain SDPA forwards vs HF eager
attentions.

Targets (issue 3): the whole scan (all layers, statistics included) ≤ 1.10× the plain SDPA forwards of the same
samples; peak RSS ≤ fp32 weights + 0.5 GB. Timing rounds are interleaved in one process (drift hits all alike,
median reported); peak RSS is measured in a fresh subprocess per configuration. Run by hand (`make bench`); paste
the printed tables into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

import plipy
from plipy.corpus import load_corpus, token_positions
from plipy.experiments.samples import choose_groups
from plipy.models import load_model

CONFIGS = ("plain SDPA forwards", "plipy scan (forwards + statistics)", "HF eager + output_attentions")


def _setup(model: str, device: str):
    lm = load_model(model, dtype="float32", device=device)
    corpus = load_corpus()
    groups, _ = choose_groups(corpus, None)
    ids = [torch.tensor([token_positions(s, lm.tokenizer).input_ids], device=lm.device) for s in corpus.samples(groups)]
    return lm, corpus, ids


def _runners(lm, corpus, ids, resamples: int, with_eager: bool = True):
    def sdpa():
        for x in ids:
            lm.model(x)

    def scan():
        plipy.scan(lm, corpus, resamples=resamples)

    eager_model = copy.deepcopy(lm.model) if with_eager else None
    if eager_model is not None:
        eager_model.set_attn_implementation("eager")

    def eager():
        for x in ids:
            eager_model(x, output_attentions=True)

    return dict(zip(CONFIGS, (sdpa, scan, eager), strict=True))


def _rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (/proc: unlike ru_maxrss, not inherited from the parent over exec)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak(args) -> None:
    """Child: set up, run one configuration once, print peak RSS (bytes) as JSON."""
    before = _rss("VmRSS")
    lm, corpus, ids = _setup(args.model, args.device)
    runs = _runners(lm, corpus, ids, args.resamples, with_eager=False) if args.child != CONFIGS[2] else None
    if runs is None:  # eager: no deep copy in the child, the model itself switches
        lm.model.set_attn_implementation("eager")
    loaded = _rss("VmRSS")
    with torch.inference_mode():
        if runs is None:
            for x in ids:
                lm.model(x, output_attentions=True)
        else:
            runs[args.child]()
    peak = _rss("VmHWM")
    weights = sum(p.numel() * 4 for p in lm.model.parameters())
    print(json.dumps({"before_load": before, "after_load": loaded, "peak": peak, "weights_fp32": weights}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--resamples", type=int, default=10000, help="bootstrap/permutation resamples of the scan")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _peak(args)

    lm, corpus, ids = _setup(args.model, args.device)
    runs = _runners(lm, corpus, ids, args.resamples)
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)

    base = statistics.median(times[CONFIGS[0]])
    n_tok = sum(x.shape[1] for x in ids)
    print(
        f"model {args.model}, {len(ids)} samples ({n_tok} tokens), all {lm.n_layers} layers, {args.rounds} rounds, "
        f"{args.resamples} resamples, device {args.device}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}"
    )
    print("| configuration | median time | × plain SDPA |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1000:.0f} ms | {med / base:.3f} |")

    print("\n| configuration | peak RSS | RSS after load | fp32 weights | peak − weights − RSS before load |")
    print("|---|---|---|---|---|")
    for name in CONFIGS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--device",
                args.device,
                "--resamples",
                str(args.resamples),
                "--child",
                name,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        m = json.loads(out.strip().splitlines()[-1])
        mb = 1 / 2**20
        print(
            f"| {name} | {m['peak'] * mb:.0f} MiB | {m['after_load'] * mb:.0f} MiB | {m['weights_fp32'] * mb:.0f} MiB"
            f" | {(m['peak'] - m['weights_fp32'] - m['before_load']) * mb:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
