"""The Python API: one function per experiment, the same options as the CLI flags, typed results.

    import plipy
    r = plipy.scan("smollm2-135m", layers="0-2")        # ScanResult
    k = plipy.knockout("smollm2-135m", layer=14)         # KnockoutResult
    d = plipy.steer.dose("smollm2-135m", layer=16)       # DoseResult
    p = plipy.patch.heads("smollm2-135m")                # PatchResult (plipy.patch.paths: path patching)
    s = plipy.sae_attention("smollm2-135m", "saes/L9", latent=12, prompts="prompts.jsonl")
    logits, cache = plipy.trace("smollm2-135m", "def add(a, b):", names=["hook_pattern"], rows="last")

`model` is a spec (alias, local dir, .gguf file, hub id), a `LoadedModel` from `plipy.load_model`, or a loaded HF
causal LM with `tokenizer=`. `corpus` is a path, a `Corpus` or None (the bundled PLIP corpus). `layers`/`heads`
take ints, lists or the CLI grammar (`all | plip | A-B | a,b,c`). `progress` is `start(description, total) ->
step()`; `runner` is "auto" | "fast" | "naive" or a `ConditionRunner` to reuse.

This is the top of the library: it imports the experiments and the views (`plipy.report`, which registers them),
so every result it returns can draw itself.
"""

from __future__ import annotations

from plipy import report  # noqa: F401  (registers every result kind's views)
from plipy.api import patch, steer
from plipy.api.entities import label_entities
from plipy.api.front import DEFAULT_MODEL, as_corpus, as_model
from plipy.api.knockout import knockout
from plipy.api.lens import emergence, lens, probe
from plipy.api.qk import qk
from plipy.api.sae import as_prompts, as_sae, sae_attention, sae_pipeline, score_latents, train_sae
from plipy.api.scan import scan
from plipy.api.sweep import sweep
from plipy.api.trace import trace
from plipy.errors import PlipyError
from plipy.results import load_result

__all__ = [
    "DEFAULT_MODEL",
    "PlipyError",
    "as_corpus",
    "as_model",
    "as_prompts",
    "as_sae",
    "emergence",
    "knockout",
    "label_entities",
    "lens",
    "load_result",
    "patch",
    "probe",
    "qk",
    "sae_attention",
    "sae_pipeline",
    "scan",
    "score_latents",
    "steer",
    "sweep",
    "trace",
    "train_sae",
]
