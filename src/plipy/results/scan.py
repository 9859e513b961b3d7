"""The scan's result: marker → target attention per sample, layer and head, beside the uniform and token-0 nulls.

A scan's attention rows and token texts, which its token view needs, are too bulky for the JSON: `save()` writes
them to a sidecar `<stem>-rows.npz` that `load_result` reads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from plipy.errors import ParameterError, PlipyError
from plipy.io import npz_bytes, read_npz
from plipy.options import layer_label
from plipy.results.base import Result, find_sibling

ROWS_SUFFIX = "-rows.npz"


class ScanResult(Result):
    """`plipy.scan`: marker → target attention per sample, layer and head, beside the uniform and token-0 nulls.

    `extras` of a run (or of a file with its rows sidecar): `rows` (sample id → `[layers, heads, keys]` float32),
    `input_ids` and `tokens` (or `tokenizer`) per sample."""

    kind, path_pattern = "scan", "scan-{model}.json"

    def rows(self) -> list[dict[str, Any]]:
        return sample_rows(self._data)

    @property
    def has_rows(self) -> bool:
        """Whether the marker rows are here (a run in this session, or a file saved with its `-rows.npz`)."""
        return "rows" in self.extras

    def rows_unavailable(self) -> str | None:
        """Why the token view cannot be drawn (None: it can)."""
        if self.has_rows:
            return None
        missing = self.extras.get("rows_missing")
        why = f"{missing} is missing" if missing else "this file was saved without them"
        return (
            f"the token plot needs the scan's attention rows, saved beside the JSON as <stem>{ROWS_SUFFIX} ({why}): "
            "rerun the scan"
        )

    def token_texts(self, sample: str) -> list[str]:
        """The text of each token of a measured sample (decoded one token at a time, as the token plot shows)."""
        if "tokens" in self.extras:
            return list(self.extras["tokens"][sample])
        tok = self.extras["tokenizer"]
        return [tok.decode([t]) for t in self.extras["input_ids"][sample]]

    def largest_effect_layer(self) -> int:
        """The scanned layer where the compared groups differ most (largest |Hedges' g| of the attention; the last
        scanned layer when no layer has an effect size)."""
        rows = [r for r in self._data["layers"] if r.get("hedges_g") is not None]
        if not rows:
            return int(self._data["layers_scanned"][-1])
        return int(max(rows, key=lambda r: abs(r["hedges_g"]))["layer"])

    def token_layer(self, layer: int | None = None) -> int:
        """The layer of the token views: `layer`, else the largest-effect layer."""
        layers = self._data["layers_scanned"]
        chosen = layer if layer is not None else self.largest_effect_layer()
        if chosen not in layers:
            raise ParameterError("token_layer", f"layer {chosen} was not scanned (scanned: {layer_label(layers)})")
        return int(chosen)

    def token_sample(self, sample: str | None = None) -> dict[str, Any]:
        """The measured sample record `sample` (default: the first measured one)."""
        measured = [s for s in self._data["samples"] if "attention" in s]
        rec = next((s for s in measured if s["id"] == sample), None) if sample else (measured or [None])[0]
        if rec is None:
            shown = ", ".join(s["id"] for s in measured[:5]) + (" …" if len(measured) > 5 else "")
            raise ParameterError("token_sample", f"{sample!r} is not a measured sample of this scan ({shown})")
        return rec

    def marker_row(self, sample: str, layer: int) -> np.ndarray:
        """The head-mean marker row of `sample` at a scanned `layer` `[keys]`."""
        row: np.ndarray = self.extras["rows"][sample][self._data["layers_scanned"].index(layer)].mean(0)
        return row

    def _extra_files(self, path: Path, outputs: dict[Path, bytes], **options: Any) -> dict[str, Any]:
        if not self.has_rows:
            return {}
        ids = list(self.extras["rows"])
        arrays: dict[str, Any] = {"ids": np.array(ids, dtype=str)}
        for i, sid in enumerate(ids):
            arrays[f"rows_{i}"] = np.asarray(self.extras["rows"][sid], dtype=np.float32)
            arrays[f"input_ids_{i}"] = np.asarray(self.extras["input_ids"][sid], dtype=np.int64)
            arrays[f"tokens_{i}"] = np.array(self.token_texts(sid), dtype=str)
        rows_path = Path(f"{path.with_suffix('')}{ROWS_SUFFIX}")
        outputs[rows_path] = npz_bytes(arrays)
        return {"rows": str(rows_path)}

    @classmethod
    def from_file(cls, path: Path, data: dict[str, Any]) -> Result:
        recorded = (data.get("provenance", {}).get("files") or {}).get("rows")
        if recorded is None:
            return cls(data)
        found = find_sibling(path, recorded)
        if found is None:  # the JSON is the result; only the token view is lost (and says so)
            return cls(data, extras={"rows_missing": recorded})
        return cls(data, extras=read_rows(found, data))


def sample_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (sample, layer) for pandas: the long format is what plotting and groupby want."""
    rows = []
    for s in result["samples"]:
        if "attention" not in s:
            continue
        for i, layer in enumerate(result["layers_scanned"]):
            rows.append(
                {
                    "id": s["id"],
                    "group": s["group"],
                    "layer": layer,
                    "marker_token": s["marker_token"],
                    "n_tokens": s["n_tokens"],
                    "attention": s["attention"][i],
                    "first_token_share": s["first_token_share"][i],
                    "uniform_null": s["uniform_null"],
                    "excess": s["excess"][i],
                    "attention_per_head": s["attention_per_head"][i],
                    "attention_per_target": s["attention_per_target"][i],
                }
            )
    return rows


def read_rows(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A scan's sidecar: marker rows, token ids and token texts per measured sample, checked against the JSON."""
    try:
        z = read_npz(path)
    except (OSError, ValueError) as e:
        raise PlipyError(f"{path}: not a readable rows file ({e})") from None
    by_id = {s["id"]: s for s in data["samples"] if "attention" in s}
    ids = [str(x) for x in z.get("ids", [])]
    n_layers = len(data["layers_scanned"])
    extras: dict[str, Any] = {"rows": {}, "input_ids": {}, "tokens": {}}
    for i, sid in enumerate(ids):
        rows, tokens = z.get(f"rows_{i}"), z.get(f"tokens_{i}")
        rec = by_id.get(sid)
        if rec is None or rows is None or tokens is None or not _fits(rows, tokens, rec, n_layers):
            raise PlipyError(f"{path}: its attention rows do not match the result (sample {sid!r})")
        extras["rows"][sid] = rows
        extras["input_ids"][sid] = [int(t) for t in z[f"input_ids_{i}"]]
        extras["tokens"][sid] = [str(t) for t in tokens]
    return extras


def _fits(rows: np.ndarray, tokens: np.ndarray, rec: dict[str, Any], n_layers: int) -> bool:
    return bool(rows.shape[0] == n_layers and rows.shape[-1] == rec["n_tokens"] and len(tokens) == rec["n_tokens"])
