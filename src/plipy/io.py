"""Writing results atomically (nothing half-written) and hashing inputs for provenance."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from plipy.errors import OutputError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safetensors_whole(path: str | os.PathLike) -> bool:
    """Whether a .safetensors file is as long as its header says (a truncated copy fails this before torch reads it)."""
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                return False
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        return size == 8 + n + end
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
        return False


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask's set-and-restore would give a file
    another thread creates meanwhile mode 0666)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_path(path: str | os.PathLike) -> Path:
    """Where writing `path` lands, resolved once: a symlink (a chain too) is written through to its target, but only
    into a folder that exists (plipy creates no folder a link points into); any other path is the path as named,
    whose missing folders are created. OutputError for a link into a missing folder or a dangling link above it."""
    p = Path(path)
    if p.is_symlink():
        target = Path(os.path.realpath(p))
        if not target.parent.is_dir():
            raise OutputError(
                f"{p} is a symlink to {target}, whose folder does not exist: plipy writes through a link only into "
                "an existing folder (create it, or name another output)"
            )
        return target
    for parent in p.parents:
        if parent.is_symlink() and not parent.exists():
            raise OutputError(f"{p}: its folder {parent} is a symlink to {os.readlink(parent)}, which does not exist")
    return p


def _temp_beside(path: Path, data: bytes) -> str:
    """A complete temporary copy of `data` in `path`'s folder, with the mode a normal write would give it."""
    path.parent.mkdir(parents=True, exist_ok=True)  # the named path's own folders (`output_path` checked links)
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
    are complete are they renamed into place (in the order given: put the JSON last). A set of several files is
    renamed under an exclusive lock on the folder of the last file, so concurrent writers of one set replace it one
    whole set after the other (a lock on the folder itself leaves no lock file behind; a single file needs none,
    its rename is atomic). On any failure
    nothing of the set is replaced and no temporary is left; a failed write (disk full, read-only) is an
    OutputError naming the file."""
    targets = [output_path(p) for p in outputs]
    if len(set(targets)) < len(targets):
        raise OutputError(f"two files of one output set would be written to one name: {', '.join(map(str, targets))}")
    temps: list[str] = []
    current = targets[0]
    try:
        for current, data in zip(targets, outputs.values(), strict=True):
            temps.append(_temp_beside(current, data))
        with _set_lock(targets[-1]) if len(targets) > 1 else contextlib.nullcontext():  # one rename is atomic
            for tmp, current in zip(temps, targets, strict=True):
                os.replace(tmp, current)
    except OSError as e:
        _remove(temps)
        if isinstance(e, OutputError):
            raise
        kept = "nothing of this output set was replaced" if len(temps) < len(targets) else "the set may be partial"
        raise OutputError(f"could not write {current}: {e.strerror or e} ({kept})") from None
    except BaseException:
        _remove(temps)
        raise
    return [Path(p) for p in outputs]


def _remove(paths: list[str]) -> None:
    for tmp in paths:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def _set_lock(last: Path) -> Iterator[None]:
    """An exclusive `flock` on the folder holding `last` while a set's files are renamed into place (renames take
    microseconds, so serialising every set written to one folder costs nothing)."""
    import fcntl

    fd = os.open(last.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
