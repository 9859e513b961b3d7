"""plipy: attention interpretability for Hugging Face language models.

Notebook use::

    import plipy
    lm = plipy.load_model("smollm2-135m")
    corpus = plipy.load_corpus()          # the bundled PLIP universal corpus
"""

from __future__ import annotations

__version__ = "0.1.0"

from plipy.errors import CausalEdgeError, MaskedRowError, PlipyError  # noqa: E402


def __getattr__(name: str):
    # Lazy: `import plipy` must stay cheap (no torch import) so `plipy --help` is instant.
    if name in ("load_model", "LoadedModel"):
        from plipy import models

        return getattr(models, name)
    if name in ("load_corpus", "Corpus", "Sample"):
        from plipy import corpus

        return getattr(corpus, name)
    if name in ("Engine", "Capture", "EdgeEdit", "ResidualAdd"):
        from plipy import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'plipy' has no attribute {name!r}")


__all__ = [
    "__version__",
    "PlipyError",
    "CausalEdgeError",
    "MaskedRowError",
    "load_model",
    "LoadedModel",
    "load_corpus",
    "Corpus",
    "Sample",
    "Engine",
    "Capture",
    "EdgeEdit",
    "ResidualAdd",
]
