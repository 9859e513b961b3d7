"""Provenance for every result file: what ran, on what, with which versions, so a number can be traced back."""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plipy.corpus import Corpus
    from plipy.models import LoadedModel

LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "scipy", "gguf", "safetensors")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the numbers."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build(
    *,
    model: LoadedModel | None = None,
    corpus: Corpus | None = None,
    config: dict | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The `provenance` block of a result: plipy version, command line, model and corpus identity, config, seed."""
    from plipy import __version__

    prov: dict[str, Any] = {
        "plipy_version": __version__,
        "command": shlex.join([sys.argv[0].rsplit("/", 1)[-1], *sys.argv[1:]]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "seed": seed,
        "config": config or {},
    }
    if model is not None:
        prov["model"] = model.provenance
    if corpus is not None:
        prov["corpus"] = {
            "path": str(corpus.path),
            "sha256": corpus.sha256,
            "format_version": corpus.format_version,
            "groups": {g: len(s) for g, s in corpus.groups.items()},
        }
    return prov
