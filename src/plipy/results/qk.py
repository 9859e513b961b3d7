"""The QK attribution result: one attention score per input split into query-side × key-side components.

The document holds the run's settings, every input's scores and exactness check, and per head the statistics over
inputs (top pairs, each side's top components, a heatmap of the largest components, the group contrast and the
intervention's change). The long table holds every contribution: one row per (input, head, query component, key
component); it is the table file `save()` writes and `load_result` reads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from plipy.errors import PlipyError
from plipy.results.base import Result, sibling

COLUMNS = ("sample", "group", "head", "query_component", "key_component", "contribution")
INTERVENED = ("intervened", "difference")
TEXT = ("sample", "group", "query_component", "key_component")


class QkResult(Result):
    """`plipy.qk`: attention scores split into query-side × key-side contributions (residual components or SAE
    features), per input and head, with statistics over inputs. `columns` is the long table as numpy columns."""

    kind, path_pattern = "qk", "qk-{model}-L{layer}.json"

    def __init__(self, data: dict[str, Any], *, columns: dict[str, np.ndarray], extras: dict[str, Any] | None = None):
        super().__init__(data, extras=extras)
        self.columns = columns

    def __eq__(self, other: object) -> bool:
        if not super().__eq__(other) or not isinstance(other, QkResult):
            return False
        a, b = self.columns, other.columns
        return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)

    def _describe(self) -> str:
        return f"layer={self._data['layer']} heads={self._data['heads']} samples={len(self._data['samples'])}"

    def rows(self) -> list[dict[str, Any]]:
        cols = self.columns
        n = len(cols["sample"])
        return [{k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in cols.items()} for i in range(n)]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.columns)

    def _table_bytes(self, fmt: str) -> bytes:
        return columns_bytes(self.columns, fmt)

    def head_keys(self) -> list[str]:
        """The heads the statistics cover (`H3`, …, and `mean` for the mean over several heads), in order."""
        return list(self._data["decomposition"])

    def block(self, head: str | None = None, part: str = "groups", group: str | None = None) -> dict[str, Any] | None:
        """One statistics block: `part` is "groups" (with `group`, default the first), "contrast" or "intervention"
        (with `group`); `head` defaults to the first head key. None when the run has no such block."""
        dec = self._data["decomposition"]
        entry = dec[head or next(iter(dec))]
        found = entry.get(part)
        if found is None or part == "contrast":
            return found
        return found.get(group or next(iter(found)))

    def headline(self, head: str | None = None) -> str:
        """The head key the views show: `head` (`H3`, `3` or `mean`), else the mean over heads when there are
        several, else the one head."""
        keys = self.head_keys()
        if head is None:
            return "mean" if "mean" in keys else keys[0]
        key = f"H{head}" if str(head).isdigit() else str(head)
        if key not in keys:
            raise PlipyError(f"head {head!r} was not decomposed (heads: {', '.join(keys)})")
        return key

    def per_sample(self, query: str, key: str, head: str, column: str = "contribution") -> dict[str, float]:
        """One pair's value per input (sample id → value) from the long table; `head` `mean` averages the heads."""
        cols = self.columns
        keep = (cols["query_component"] == query) & (cols["key_component"] == key)
        if head != "mean":
            keep &= cols["head"] == int(head.lstrip("H"))
        sums: dict[str, list[float]] = {}
        for sid, v in zip(cols["sample"][keep], cols[column][keep], strict=True):
            sums.setdefault(str(sid), []).append(float(v))
        return {sid: float(np.mean(v)) for sid, v in sums.items()}

    @classmethod
    def from_file(cls, path: Path, data: dict[str, Any]) -> Result:
        files = data.get("provenance", {}).get("files") or {}
        return cls(data, columns=read_columns(sibling(path, files.get("table"))))


def columns_bytes(cols: dict[str, np.ndarray], fmt: str = "parquet") -> bytes:
    """Columns as Parquet or CSV bytes."""
    import pyarrow as pa

    table = pa.table({k: pa.array(v.tolist() if v.dtype == object else v) for k, v in cols.items()})
    sink = pa.BufferOutputStream()
    if fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, sink)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_columns(path: str | Path) -> dict[str, np.ndarray]:
    """The long table's columns back from its Parquet or CSV file."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = Path(path)
    if p.suffix == ".csv":  # ids and names stay text even where they look like numbers
        text = {c: pa.string() for c in TEXT}
        table = pcsv.read_csv(p, convert_options=pcsv.ConvertOptions(column_types=text))
    else:
        table = pq.read_table(p)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise PlipyError(f"{p}: not a qk table (no column {', '.join(missing)})")
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).to_numpy(zero_copy_only=False)
        if name in TEXT:
            col = np.array([str(x) for x in col], dtype=object)
        elif name == "head":
            col = col.astype(np.int64)
        else:
            col = col.astype(np.float64)
        out[name] = col
    return out
