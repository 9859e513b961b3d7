"""Engine overhead on SmolLM2 over the bundled corpus: plain SDPA vs the idle engine vs row capture vs eager.

Run by hand (`make bench`); paste the printed table into benchmarks/RESULTS.md. Target: idle ≤ 1.05× SDPA.
Each configuration runs every corpus sample once per round; rounds are interleaved so drift hits all alike,
and the median round is reported.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from plipy.corpus import load_corpus, token_positions
from plipy.engine import Capture, Engine
from plipy.models import LoadedModel, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    lm = load_model(args.model, dtype="float32", device=args.device)
    items = corpus_items(lm)
    times = time_rounds(configurations(lm.model, items), args.rounds, args.device)

    base = statistics.median(times["plain SDPA forward"])
    n_tok = sum(ids.shape[1] for ids, _ in items)
    print(
        f"model {args.model}, {len(items)} samples ({n_tok} tokens), {args.rounds} rounds, device {args.device}, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}"
    )
    print("| configuration | median time per corpus pass | × plain SDPA |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1000:.1f} ms | {med / base:.3f} |")


def corpus_items(lm: LoadedModel) -> list[tuple[torch.Tensor, int | None]]:
    """Each bundled corpus sample's token ids (on the model's device) and marker token."""
    items = []
    for s in load_corpus().samples():
        sp = token_positions(s, lm.tokenizer)
        items.append((torch.tensor([sp.input_ids], device=lm.device), sp.marker_token))
    return items


def configurations(sdpa: Any, items: list[tuple[torch.Tensor, int | None]]) -> dict[str, Callable[[], None]]:
    """One corpus pass per configuration: the model as loaded, a copy with the idle engine, the engine capturing
    the marker rows, and a copy in HF eager mode returning its attentions."""
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(sdpa)
    engine = Engine(ours)

    def run_sdpa():
        for ids, _ in items:
            sdpa(ids)

    def run_idle():
        for ids, _ in items:
            ours(ids)

    def run_capture():
        for ids, m in items:
            with engine.run(capture=Capture(rows=[m])):
                ours(ids)

    def run_eager():
        for ids, _ in items:
            eager(ids, output_attentions=True)

    return {
        "plain SDPA forward": run_sdpa,
        "engine idle": run_idle,
        "engine capturing the marker row, all 30 layers": run_capture,
        "HF eager + output_attentions": run_eager,
    }


def time_rounds(configs: dict[str, Callable[[], None]], rounds: int, device: str) -> dict[str, list[float]]:
    """Seconds per pass of each configuration, `rounds` times after a warm-up, rounds interleaved."""
    times: dict[str, list[float]] = {k: [] for k in configs}
    with torch.inference_mode():
        for fn in configs.values():  # warm-up
            fn()
        for _ in range(rounds):
            for name, fn in configs.items():
                t = time.perf_counter()
                fn()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    return times


if __name__ == "__main__":
    main()
