"""plipy: attention interpretability for Hugging Face language models.

Notebook use::

    import plipy
    r = plipy.scan("smollm2-135m", layers="0-2")     # ScanResult: .to_pandas(), .summary(), .plot(), .save()
    k = plipy.knockout("smollm2-135m", scan_layers=True)
    ll = plipy.lens("smollm2-135m", "fn add(a: i32, b: i32) -> i32 {")   # LensResult; plipy.emergence, plipy.probe
    d = plipy.steer.dose("smollm2-135m", layer=16)
    plipy.load_result("results/scan-smollm2-135m.json")
    plipy.html_report(["a.json", "b.json"], "report.html")   # interactive, offline; side by side per kind
    logits, cache = plipy.trace("smollm2-135m", "def add(a, b):")  # TL-named activations (run_with_cache)

Everything is imported on first use: `import plipy` stays cheap (no torch), so `plipy --help` is instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

from plipy.errors import CausalEdgeError, MaskedRowError, ParameterError, PlipyError  # noqa: E402

# Public names → the module that defines them, imported on first use (PEP 562): `import plipy` stays cheap.
_LAZY = {
    "plipy.api": (
        "scan",
        "knockout",
        "lens",
        "emergence",
        "probe",
        "sae_attention",
        "label_entities",
        "train_sae",
        "score_latents",
        "sae_pipeline",
        "sweep",
        "trace",
        "qk",
        "load_result",
    ),
    "plipy.results": (
        "Result",
        "ScanResult",
        "KnockoutResult",
        "CalibrateResult",
        "DoseResult",
        "GenerateResult",
        "SaeAttentionResult",
        "LensResult",
        "EmergenceResult",
        "ProbeResult",
        "SweepResult",
        "EntityLabelsResult",
        "QkResult",
        "PatchResult",
    ),
    "plipy.models": ("load_model", "LoadedModel"),
    "plipy.corpus": ("load_corpus", "Corpus", "Sample", "token_positions"),
    "plipy.engine": ("Engine", "Capture", "EdgeEdit", "ResidualAdd", "ResidualCapture"),
    "plipy.engine.cache": ("ActivationCache",),
    "plipy.sae": ("load_sae", "SAE"),
    "plipy.report.html": ("html_report",),
}
# Public submodules by their short name.
_SUBMODULES = {
    "steer": "plipy.api.steer",
    "patch": "plipy.api.patch",
    "corpus": "plipy.corpus",
    "engine": "plipy.engine",
    "sae": "plipy.sae",
    "entities": "plipy.entities",
    "report": "plipy.report",
    "stats": "plipy.stats",
    "options": "plipy.options",
    "experiments": "plipy.experiments",
    "models": "plipy.models",
    "chat": "plipy.corpus.chat",
    "corpus_tools": "plipy.corpus.tools",
    "cluster": "plipy.cluster",
    "runtime": "plipy.runtime",
    "results": "plipy.results",
    "workflows": "plipy.workflows",
}


def __getattr__(name: str) -> object:
    import importlib

    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(f"module 'plipy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "__version__",
    "PlipyError",
    "ParameterError",
    "CausalEdgeError",
    "MaskedRowError",
    *(n for names in _LAZY.values() for n in names),
    *_SUBMODULES,
]
