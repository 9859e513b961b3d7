"""plipy: attention interpretability for Hugging Face language models.

Notebook use::

    import plipy
    r = plipy.scan("smollm2-135m", layers="0-2")     # ScanResult: .to_pandas(), .summary(), .plot(), .save()
    k = plipy.knockout("smollm2-135m", scan_layers=True)
    ll = plipy.lens("smollm2-135m", "fn add(a: i32, b: i32) -> i32 {")   # LensResult; plipy.emergence, plipy.probe
    d = plipy.steer.dose("smollm2-135m", layer=16)
    plipy.load_result("results/scan-smollm2-135m.json")
    plipy.html_report(["a.json", "b.json"], "report.html")   # interactive, offline; side by side per kind

Everything is imported on first use: `import plipy` stays cheap (no torch), so `plipy --help` is instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

from plipy.errors import CausalEdgeError, MaskedRowError, ParameterError, PlipyError  # noqa: E402

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
    ),
    "plipy.results": (
        "load_result",
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
    ),
    "plipy.models": ("load_model", "LoadedModel"),
    "plipy.corpus": ("load_corpus", "Corpus", "Sample", "token_positions"),
    "plipy.engine": ("Engine", "Capture", "EdgeEdit", "ResidualAdd", "ResidualCapture"),
    "plipy.sae": ("load_sae", "SAE"),
    "plipy.report.html": ("html_report",),
}
_SUBMODULES = (
    "steer",
    "corpus",
    "engine",
    "sae",
    "entities",
    "report",
    "stats",
    "options",
    "experiments",
    "models",
    "chat",
    "corpus_tools",
    "cluster",
)


def __getattr__(name: str):
    import importlib

    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"plipy.{name}")
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
