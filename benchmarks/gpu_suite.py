"""GPU suite: plipy's scan, `--scan-layers` knockout and 6-dose steering on a 7B-sized model, against plain SDPA
forwards of the same work. Run by hand on a CUDA machine; prints a markdown table for benchmarks/RESULTS.md.

The model is random-init with the exact config of Qwen2.5-Coder-7B-Instruct in bf16 (no weights to download:
speed does not depend on their values). Workloads: the bundled corpus (30 short samples) and one 2k- and one 8k-token
input (a corpus sample followed by more code). For each: plipy's time, the time of plain SDPA forwards doing the same
work (the scan: one forward per batch; knockout and doses: one forward per condition, batched like plipy batches
them), their ratio, tokens/s and peak GPU memory. Finishes in under 5 minutes on one H100-class GPU.

    python benchmarks/gpu_suite.py              # CUDA, Qwen2.5-Coder-7B config (skips without CUDA)
    python benchmarks/gpu_suite.py --smoke      # CPU, a 2-layer config: checks the script itself (the tests run it)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

# Qwen/Qwen2.5-Coder-7B-Instruct config.json (the fields that shape compute)
QWEN25_CODER_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    use_sliding_window=False,
)
SMOKE = dict(
    QWEN25_CODER_7B,
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
DOSES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)


def build_model(config: dict[str, Any], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random-init Qwen2 causal LM of `config` on `device` (initialised in place: no CPU copy of 7B weights)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def tokenizer() -> Any:
    """SmolLM2's tokenizer (its ids are < 49152, valid for Qwen's 152k vocabulary): only lengths matter here."""
    from plipy.models import load_model

    return load_model("smollm2-135m", device="cpu").tokenizer


def long_corpus(tok: Any, n_tokens: int) -> Any:
    """A one-group-pair corpus whose samples are corpus samples followed by more code, about `n_tokens` long: the
    marker and targets stay early, so the knockout and steering suffix is most of the input."""
    from plipy.corpus import Corpus, load_corpus

    full = load_corpus()
    filler = "\n".join(s.code for g in full.group_names for s in full.groups[g])
    per = max(1, len(tok(filler, add_special_tokens=False)["input_ids"]))
    reps = n_tokens // per + 1
    groups = {}
    for g in ("python_doctest", "rust_test"):
        out = []
        for s in full.groups[g][:2]:
            code = s.code + "\n" + "\n".join([filler] * reps)
            ids = tok(code, add_special_tokens=False, return_offsets_mapping=True)
            cut = ids["offset_mapping"][min(n_tokens, len(ids["input_ids"])) - 1][1]
            out.append(replace(s, code=code[:cut]))
        groups[g] = out
    return Corpus(
        path=Path(f"<long-{n_tokens}>"),
        sha256=f"long-{n_tokens}",
        format_version=full.format_version,
        description=None,
        groups=groups,
    )


def timed(fn: Callable[[], Any], device: str) -> tuple[float, int]:
    """(seconds, peak bytes allocated on the GPU, 0 on CPU) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() if device == "cuda" else 0


def plain_forwards(model: torch.nn.Module, seqs: list[list[int]], copies: int, batch: int, device: str) -> None:
    """`copies` plain SDPA forwards of every sequence, `batch` inputs per call (last-position logits only)."""
    from plipy.engine.batch import pad_left, plan_batches

    items = [s for s in seqs for _ in range(copies)]
    with torch.inference_mode():
        for b in plan_batches([len(s) for s in items], batch):
            p = pad_left([items[i] for i in b], 0, device)
            model(p.ids, **p.forward_kwargs(), logits_to_keep=1)


def workloads(
    model: torch.nn.Module, tok: Any, corpus: Any, device: str, batch: int, cond_batch: int
) -> list[tuple[str, Callable[[], Any], Callable[[], Any], int]]:
    """(name, plipy call, plain-forward call of the same work, tokens processed by the plain work)."""
    import plipy
    from plipy.corpus import token_positions

    n_layers = model.config.num_hidden_layers
    layer = n_layers // 2
    seqs = [token_positions(s, tok).input_ids for g in ("python_doctest", "rust_test") for s in corpus.groups[g]]
    rust = [token_positions(s, tok).input_ids for s in corpus.groups["rust_test"]]
    common = dict(tokenizer=tok, corpus=corpus, resume=False, batch_size=batch)
    n = sum(map(len, seqs))
    return [
        (
            "scan, all layers",
            lambda: plipy.scan(model, resamples=200, **common),
            lambda: plain_forwards(model, seqs, 1, batch, device),
            n,
        ),
        (
            f"knockout --scan-layers ({n_layers} conditions)",
            lambda: plipy.knockout(model, scan_layers=True, condition_batch=cond_batch, resamples=200, **common),
            lambda: plain_forwards(model, seqs, n_layers, cond_batch, device),
            n * n_layers,
        ),
        (
            f"steer dose, {len(DOSES)} doses, layer {layer}",
            lambda: plipy.steer.dose(model, layer=layer, doses=list(DOSES), condition_batch=cond_batch, **common),
            lambda: plain_forwards(model, rust, len(DOSES), cond_batch, device),
            sum(map(len, rust)) * len(DOSES),
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, a 2-layer config: check the script runs")
    ap.add_argument("--lengths", default="2048,8192", help="long-input lengths in tokens ('' for none)")
    ap.add_argument("--batch-size", type=int, default=None, help="samples per forward (default: plipy's)")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: skipped, no CUDA device (run it on a GPU machine; --smoke checks it on the CPU)")
        return
    from plipy.corpus import load_corpus
    from plipy.engine.batch import default_batch_size

    config = SMOKE if args.smoke else QWEN25_CODER_7B
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(config, device, dtype)
    tok = tokenizer()
    batch = args.batch_size or default_batch_size(device)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if args.smoke:
        lengths = [min(x, 256) for x in lengths]
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(
        f"model: random-init {'smoke config' if args.smoke else 'Qwen2.5-Coder-7B-Instruct config'} in "
        f"{str(dtype).removeprefix('torch.')}, {device} ({gpu}), torch {torch.__version__}, batch {batch}"
    )
    print("\n| workload | plipy | plain SDPA, same work | × plain | tokens/s (plain work) | peak GPU memory |")
    print("|---|---:|---:|---:|---:|---:|")
    t_start = time.perf_counter()
    for label, corpus, cond_batch in [("corpus", load_corpus(), 32)] + [
        (f"{n // 1024}k input" if n >= 1024 else f"{n}-token input", long_corpus(tok, n), 8) for n in lengths
    ]:
        for name, ours, plain, n_tok in workloads(model, tok, corpus, device, batch, cond_batch):
            ours()  # warm-up: kernels, allocator
            t_ours, peak = timed(ours, device)
            t_plain, _ = timed(plain, device)
            print(
                f"| {label}: {name} | {t_ours:.2f} s | {t_plain:.2f} s | {t_ours / t_plain:.3f} | "
                f"{n_tok / t_ours:,.0f} | {peak / 2**30:.1f} GiB |"
            )
            sys.stdout.flush()
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
