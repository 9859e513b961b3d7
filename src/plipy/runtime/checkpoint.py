"""Resumable runs: every finished unit of a long run (a sample, a batch, a prompt) is kept on disk until the result
is complete, so a run killed at any moment restarts where it stopped and gives the same bytes.

A run's folder is named by a fingerprint of everything that shapes its numbers (kind, plipy and library versions,
model identity and weights hash, corpus hash, config), so only the very same run resumes from it; a different run
gets its own folder. Units are plain JSON (NaN kept, so values round-trip exactly) plus an optional `.npz` of
arrays; each file is written atomically and the JSON last, so a unit either exists whole or not at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from plipy.errors import PlipyError
from plipy.io import atomic_write_bytes, write_json

if TYPE_CHECKING:
    from plipy.corpus import Corpus
    from plipy.models import LoadedModel


def runs_dir() -> Path:
    """Where interrupted runs keep their units: $PLIPY_RUNS, else $PLIPY_CACHE/runs (~/.cache/plipy/runs)."""
    env = os.environ.get("PLIPY_RUNS")
    if env:
        return Path(env).expanduser()
    from plipy.models import cache_dir

    return cache_dir() / "runs"


def check_runs_writable() -> None:
    """PlipyError (one line naming the variable and the folder) unless `runs_dir()` can be written: checked before
    a model loads, not found out when the first sample is done."""
    folder = runs_dir()
    var = "PLIPY_RUNS" if os.environ.get("PLIPY_RUNS") else "PLIPY_CACHE"
    existing = next((a for a in (folder, *folder.parents) if a.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PlipyError(
            f"{var}: {folder} is not writable ({existing} is read-only or not a folder): plipy keeps a run's finished "
            f"samples there so that a killed run resumes; point {var} at a writable folder"
        )


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able description (keys sorted; unknown types by `str`)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(
    kind: str,
    *,
    model: LoadedModel | None = None,
    corpus: Corpus | None = None,
    config: dict | None = None,
    **more: Any,
) -> dict[str, Any]:
    """What a run's numbers depend on; equal identities may share finished units."""
    from plipy import __version__
    from plipy.runtime import provenance

    ident: dict[str, Any] = {
        "kind": kind,
        "plipy": __version__,
        "libraries": provenance.library_versions(),
        "config": config or {},
        **more,
    }
    if model is not None:
        # not the file paths, nor how the weights were read: the same weights found via PLIPY_MODELS or the cache,
        # dequantized now or earlier, or held only by Ray workers (a driver's meta model) are the same model
        ident["model"] = {k: v for k, v in model.provenance.items() if k not in ("resolved_files", "loaded_from")}
    if corpus is not None:
        ident["corpus"] = {"sha256": corpus.sha256, "format_version": corpus.format_version}
    return ident


class Units:
    """The finished units of one run. `folder=None` (resume off) keeps nothing and finds nothing."""

    def __init__(self, folder: Path | None, fp: str, *, fresh: bool = False):
        self.folder = folder
        self.fingerprint = fp
        self.resumed = 0  # units found on disk so far
        if folder is None:
            return
        if fresh and folder.exists():
            shutil.rmtree(folder)
        meta = folder / "meta.json"
        if meta.is_file():
            try:
                old = json.loads(meta.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                raise PlipyError(f"{meta} is corrupt: delete {folder} or pass --fresh") from None
            if old != fp:
                raise PlipyError(f"{folder} holds partial results of a different run: delete it or pass --fresh")

    @classmethod
    def for_run(cls, kind: str, identity: dict[str, Any], *, resume: bool = True, fresh: bool = False) -> Units:
        """The units of the run `identity` under `runs_dir()` (nothing kept when `resume` is False)."""
        fp = fingerprint(identity)
        return cls(runs_dir() / f"{kind}-{fp}" if resume else None, fp, fresh=fresh)

    def count(self) -> int:
        """How many units are on disk."""
        return 0 if self.folder is None or not self.folder.is_dir() else len(list(self.folder.glob("unit-*.json")))

    def get(self, i: int) -> tuple[Any, dict[str, np.ndarray]] | None:
        """Unit `i` (its JSON value and arrays) if it finished earlier."""
        if self.folder is None or not (f := self.folder / f"unit-{i:06d}.json").is_file():
            return None
        try:
            value = json.loads(f.read_text())
            arrays: dict[str, np.ndarray] = {}
            if (z := self.folder / f"unit-{i:06d}.npz").is_file():
                with np.load(z, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a unit written by a broken disk
            raise PlipyError(f"checkpoint {f} is unreadable ({e}): delete {self.folder} or pass --fresh") from None
        self.resumed += 1
        return value, arrays

    def put(self, i: int, value: Any, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Keep unit `i`: arrays first, the JSON last (its presence means the unit is whole)."""
        if self.folder is None:
            return
        if not (meta := self.folder / "meta.json").is_file():  # made with the first unit: a run that fails
            write_json(meta, {"fingerprint": self.fingerprint})  # before finishing any leaves no folder behind
        if arrays:
            buf = io.BytesIO()
            np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its bool flag
            atomic_write_bytes(self.folder / f"unit-{i:06d}.npz", buf.getvalue())
        data = json.dumps(value, allow_nan=True, default=_plain).encode()
        atomic_write_bytes(self.folder / f"unit-{i:06d}.json", data)

    def batched(
        self,
        batches: Sequence[Sequence[int]],
        compute: Callable[[list[int]], list[tuple[Any, dict[str, np.ndarray] | None]]] | None,
        pool: Any = None,
    ) -> Iterator[tuple[int, tuple[Any, dict[str, np.ndarray]]]]:
        """`(i, unit)` for every unit, batch by batch. A batch missing any unit is computed whole by `compute`
        (the same inputs in the same batch give the same bits, so a resumed run matches an uninterrupted one) and
        only its missing units are stored. With a `pool` (`plipy.cluster.pool.Execution`) the missing batches run on
        its Ray workers; each is stored as it arrives and the units still come back in this order."""
        if pool is not None:
            yield from self._pooled(batches, pool)
            return
        if compute is None:
            raise ValueError("a local run needs its compute function")
        for batch in batches:
            got = {i: self.get(i) for i in batch}
            if any(v is None for v in got.values()):
                for i, (value, arrays) in zip(batch, compute(list(batch)), strict=True):
                    if got[i] is None:
                        self.put(i, value, arrays)
                        got[i] = (value, arrays or {})
            for i in batch:
                yield i, got[i]  # type: ignore[misc]

    def _pooled(
        self, batches: Sequence[Sequence[int]], pool: Any
    ) -> Iterator[tuple[int, tuple[Any, dict[str, np.ndarray]]]]:
        got = [{i: self.get(i) for i in batch} for batch in batches]
        todo = [k for k, g in enumerate(got) if any(v is None for v in g.values())]
        waiting = set(todo)
        ready = [k not in waiting for k in range(len(batches))]
        nxt = 0
        results = pool.map([list(batches[k]) for k in todo])
        while True:
            while nxt < len(batches) and ready[nxt]:
                for i in batches[nxt]:
                    yield i, got[nxt][i]  # type: ignore[misc]
                got[nxt] = {}  # handed over: the caller keeps what it needs
                nxt += 1
            if nxt == len(batches):
                return
            j, out = next(results)
            k = todo[j]
            for i, (value, arrays) in zip(batches[k], out, strict=True):
                if got[k][i] is None:  # stored once: a retried batch never counts twice
                    # Ray hands arrays over read-only (zero-copy from its object store): own a copy
                    arrays = {name: np.array(a) for name, a in (arrays or {}).items()}
                    self.put(i, value, arrays)
                    got[k][i] = (value, arrays)
            ready[k] = True

    def finish(self) -> None:
        """The result is complete: drop the units."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def label(self, desc: str) -> str:
        """A progress description that says how much of it was done earlier."""
        n = self.count()
        return f"{desc} ({n} resumed)" if n else desc


def _plain(obj: Any) -> Any:
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-able")


def open_run(
    kind: str,
    lm: LoadedModel,
    corpus: Corpus | None,
    settings: dict[str, Any],
    *,
    resume: bool = True,
    fresh: bool = False,
    **more: Any,
) -> Units:
    """The units of an experiment run. Resume needs the weights' identity: a model plipy did not load itself
    (`wrap_model`) has no weights hash, so nothing is kept for it (two such models may share a config)."""
    known = getattr(lm, "provenance", {}).get("weights_sha256") is not None
    ident = run_identity(kind, model=lm, corpus=corpus, config=settings, **more)
    return Units.for_run(kind, ident, resume=resume and known, fresh=fresh)
