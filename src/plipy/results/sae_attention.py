"""The SAE attention result: how steering with an SAE latent changes attention to the entity, per layer and head,
against random latents; its long table (one row per latent, prompt, layer and head) and its file codecs."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from plipy.corpus.prompts import EntityPrompt
from plipy.errors import PlipyError
from plipy.results.base import Result, sibling


class SaeAttentionResult(Result):
    """`plipy.sae_attention`: how steering with an SAE latent changes attention to the entity, per layer and head,
    against random latents. `arrays` = {"original": {measure: [N, L, H]}, "steered": {latent: {measure: …}}}."""

    kind, path_pattern = "sae-attention", "sae-attention-{model}-L{layer}F{latent}.json"

    def __init__(self, data: dict[str, Any], *, arrays: dict[str, Any], extras: dict[str, Any] | None = None):
        super().__init__(data, extras=extras)
        self.arrays = arrays

    def __eq__(self, other: object) -> bool:
        if not super().__eq__(other) or not isinstance(other, SaeAttentionResult):
            return False
        a, b = self.arrays, other.arrays
        same = list(a["original"]) == list(b["original"]) and list(a["steered"]) == list(b["steered"])
        return (
            same
            and all(np.array_equal(a["original"][m], b["original"][m]) for m in a["original"])
            and all(
                np.array_equal(a["steered"][lat][m], b["steered"][lat][m])
                for lat in a["steered"]
                for m in a["steered"][lat]
            )
        )

    def prompts(self) -> list[EntityPrompt]:
        """The analysed prompts as `EntityPrompt`s."""
        fields = ("prompt", "entity", "entity_type", "label", "relation")
        return [EntityPrompt(**{k: p.get(k) for k in fields if k in p}) for p in self._data["prompts"]]

    def columns(self) -> dict[str, Any]:
        """The long table as numpy columns (one row per latent, prompt, layer and head)."""
        return table_columns(self.arrays, self.prompts(), self._data["latent"])

    def rows(self) -> list[dict[str, Any]]:
        cols = self.columns()
        n = len(next(iter(cols.values())))
        return [{k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in cols.items()} for i in range(n)]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.columns())

    def _table_bytes(self, fmt: str) -> bytes:
        return columns_bytes(self.columns(), fmt)

    def boxes_unavailable(self) -> str | None:
        """Why the known-vs-unknown boxes cannot be drawn (None: they can)."""
        labels = {str(p.get("label")) for p in self._data["prompts"] if p.get("label") is not None}
        return None if len(labels) >= 2 else "the known-vs-unknown boxes need prompts of two labels"

    def _extra_files(self, path: Path, outputs: dict[Path, bytes], **options: Any) -> dict[str, Any]:
        if not options.get("npy"):
            return {}
        heads = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in self._data["heads"]]
        files = npy_bytes(self.arrays, heads, self._data["latent"], self._data["random_latents"], path.with_suffix(""))
        outputs.update(files)
        return {"npy": [str(p) for p in files]}

    @classmethod
    def from_file(cls, path: Path, data: dict[str, Any]) -> Result:
        files = data.get("provenance", {}).get("files") or data.get("files", {})  # older files: top level
        table = sibling(path, files.get("table"))
        return cls(data, arrays=arrays_from_table(table, data))


def difference(arrays: dict[str, Any], latent: int, measure: str) -> np.ndarray:
    """steered − original, `[N, layers, heads]`."""
    return arrays["steered"][latent][measure] - arrays["original"][measure]


def table_columns(arrays: dict[str, Any], prompts: Sequence[EntityPrompt], top: int) -> dict[str, np.ndarray]:
    """Long format as columns: one row per (latent, prompt, layer, head), original/steered/difference per measure."""
    measures = list(arrays["original"])
    n, n_layers, n_heads = arrays["original"][measures[0]].shape
    lats = list(arrays["steered"])
    per = n * n_layers * n_heads
    idx = np.arange(per)
    i, la, h = idx // (n_layers * n_heads), (idx // n_heads) % n_layers, idx % n_heads
    cols: dict[str, np.ndarray] = {
        "latent": np.repeat(np.array(lats, dtype=np.int64), per),
        "role": np.repeat(np.array(["top" if lat == top else "random" for lat in lats]), per),
        "prompt_index": np.tile(i, len(lats)),
        "entity": np.tile(np.array([p.entity for p in prompts], dtype=object)[i], len(lats)),
        "entity_type": np.tile(np.array([p.entity_type for p in prompts], dtype=object)[i], len(lats)),
        "label": np.tile(np.array([p.label for p in prompts], dtype=object)[i], len(lats)),
        "layer": np.tile(la, len(lats)),
        "head": np.tile(h, len(lats)),
    }
    for m in measures:
        o = np.tile(arrays["original"][m].reshape(-1), len(lats))
        s = np.concatenate([arrays["steered"][lat][m].reshape(-1) for lat in lats])
        cols[f"{m}_original"], cols[f"{m}_steered"], cols[f"{m}_difference"] = o, s, s - o
    return cols


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


def arrays_from_table(path: str | Path, result: dict[str, Any]) -> dict[str, Any]:
    """The `{original, steered}` arrays back from a saved long table (rows: latent, prompt, layer, head)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = Path(path)
    table = pcsv.read_csv(p) if p.suffix == ".csv" else pq.read_table(p)
    n, n_layers, n_heads = len(result["prompts"]), result["n_layers"], result["n_heads"]
    measures = list(result["measures"])
    lat = table.column("latent").to_numpy()
    latents = list(dict.fromkeys(int(x) for x in lat))
    per = n * n_layers * n_heads
    if len(lat) != per * len(latents):
        raise PlipyError(f"{p}: {len(lat)} rows, expected {per * len(latents)} for this result")
    cols = {m: (table.column(f"{m}_original").to_numpy(), table.column(f"{m}_steered").to_numpy()) for m in measures}
    shape = (n, n_layers, n_heads)
    return {
        "original": {m: cols[m][0][:per].astype(np.float64).reshape(shape) for m in measures},
        "steered": {
            lt: {m: cols[m][1][i * per : (i + 1) * per].astype(np.float64).reshape(shape) for m in measures}
            for i, lt in enumerate(latents)
        },
    }


def npy_bytes(
    arrays: dict[str, Any], heads: Sequence[tuple[int, int]], top: int, randoms: Sequence[int], stem: Path
) -> dict[Path, bytes]:
    """Upstream-compatible `.npy` dicts `{'L{l}H{h}': differences}` per measure (+ a list of dicts for the random
    latents), loadable with `np.load(path, allow_pickle=True).item()` (random: `.tolist()`). These are pickled
    object arrays: load them only from a source you trust."""
    out = {}
    for m in arrays["original"]:

        def as_dict(lat: int, m: str = m) -> dict[str, np.ndarray]:
            d = difference(arrays, lat, m)
            return {f"L{la}H{h}": d[:, la, h] for la, h in heads}

        for name, obj in ((f"{stem}-{m}.npy", as_dict(top)), (f"{stem}-{m}-random.npy", [as_dict(r) for r in randoms])):
            buf = io.BytesIO()
            np.save(buf, np.array(obj, dtype=object), allow_pickle=True)
            out[Path(name)] = buf.getvalue()
    return out
