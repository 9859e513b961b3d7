"""Writing results atomically (nothing half-written) and hashing inputs for provenance."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _target(path: str | os.PathLike) -> Path:
    """Where writing `path` lands: through a symlink to its target, as a plain `open(path, "w")` would."""
    p = Path(path)
    return Path(os.path.realpath(p)) if p.is_symlink() else p


def _temp_beside(path: Path, data: bytes) -> str:
    """A complete temporary copy of `data` in `path`'s folder, with the mode a normal write would give it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file should honour the umask
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file beside `path`, then rename: readers never see a partial file. A symlink is written
    through (its target is replaced), and the file gets the umask's mode, as a plain write would."""
    return write_outputs({Path(path): data})[0]


def write_outputs(outputs: dict[Path, bytes]) -> list[Path]:
    """Write a whole output set: every file goes to a temporary beside its destination first, and only when all
    are complete are they renamed into place (in the order given: put the JSON last). On any failure nothing of
    the set is left behind."""
    targets = [_target(p) for p in outputs]
    temps: list[str] = []
    try:
        for t, data in zip(targets, outputs.values(), strict=True):
            temps.append(_temp_beside(t, data))
        for tmp, t in zip(temps, targets, strict=True):
            os.replace(tmp, t)
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    return [Path(p) for p in outputs]


def json_bytes(obj: Any) -> bytes:
    """Indented UTF-8 JSON (NaN and ±inf written as null, so any JSON reader accepts the file)."""
    return (json.dumps(jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic, indented JSON."""
    return atomic_write_bytes(path, json_bytes(obj))


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values: NaN/inf → None, tuples → lists, numpy scalars → Python, paths → str."""
    return _clean(obj)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _clean(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_table(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Per-sample rows as Parquet (`.parquet`) or CSV (`.csv`), atomically; nested lists stay lists in Parquet."""
    return atomic_write_bytes(path, table_bytes(rows, Path(path).suffix.lstrip(".")))


def table_bytes(rows: list[dict[str, Any]], fmt: str = "parquet") -> bytes:
    """Rows as Parquet or CSV bytes (CSV cells holding lists or dicts are JSON)."""
    if fmt == "csv":
        import csv
        import io as _io

        buf = _io.StringIO()
        keys = list(rows[0]) if rows else []
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
        return buf.getvalue().encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([_clean(r) for r in rows])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def npz_bytes(arrays: dict[str, Any]) -> bytes:
    """Arrays as a compressed `.npz` (numpy's format, no pickles) whose bytes depend only on the arrays: numpy's own
    writer stamps the current time into the zip, which would make two identical runs differ."""
    import io as _io
    import zipfile

    import numpy as np

    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = _io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def read_npz(path: str | os.PathLike) -> dict[str, Any]:
    """Every array of an `.npz` file (pickled object arrays are refused, never loaded)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
