"""Typed results: one small class per experiment around the JSON document it writes.

    r = plipy.scan("smollm2-135m", layers="0-2")
    r.to_pandas()          # the long per-sample table (what the .parquet file holds)
    r.summary()            # the console report as text
    r.plot("layers")       # a matplotlib figure
    r.save("results/scan.json", plots=True)      # JSON + table (+ PNGs, + HTML), each written atomically
    r.to_html("results/scan.html")               # one self-contained interactive report (docs/report.md)
    plipy.load_result("results/scan.json") == r  # True

`r.to_dict()` is exactly the JSON the CLI writes (schemas: docs/results.md). A scan's attention rows and token
texts, which its token view needs, are too bulky for the JSON: `save()` writes them to a sidecar
`<stem>-rows.npz` that `load_result` reads back.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from plipy.errors import OutputError, ParameterError, PlipyError
from plipy.io import json_bytes, jsonable, output_path, table_bytes, write_outputs

TABLE_FORMATS = ("parquet", "csv")


class Result:
    """What every result offers. Subclasses name their kind, table rows, figures and console report."""

    kind: ClassVar[str] = ""
    # "module:function" of the table rows, the console report and each figure, each called with the document
    rows_fn: ClassVar[str] = ""
    summary_fn: ClassVar[str] = ""
    figure_fns: ClassVar[dict[str, str]] = {}
    path_pattern: ClassVar[str] = ""  # default output path, formatted with the document's fields and `model`
    # "module:function(result, section)" drawing the interactive HTML view; "" = the generic view (docs/report.md)
    html_fn: ClassVar[str] = ""

    def __init__(self, data: dict[str, Any], *, extras: dict[str, Any] | None = None):
        self._data: dict[str, Any] = jsonable(data)
        prov = self._data.get("provenance")
        if isinstance(prov, dict):
            prov.setdefault("kind", self.kind)
        self.extras: dict[str, Any] = extras or {}

    # -- the document ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (a deep copy), exactly as `save()` writes it."""
        return copy.deepcopy(self._data)

    def annotate(self, **fields: Any) -> None:
        """Add top-level fields to the document (e.g. a pipeline's fingerprint)."""
        self._data.update(jsonable(fields))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __contains__(self, key: str) -> bool:
        return key in self._data

    @property
    def provenance(self) -> dict[str, Any]:
        """What ran, on what, with which versions."""
        return self._data.get("provenance", {})

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._data == other._data  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        model = self.provenance.get("model", {}).get("spec", "?")
        return f"<{type(self).__name__} model={model!r} {self._describe()}>"

    def _describe(self) -> str:
        return f"samples={len(self._data.get('samples') or self._data.get('prompts') or [])}"

    # -- views -----------------------------------------------------------------------------------------------

    @property
    def figure_kinds(self) -> tuple[str, ...]:
        """The plots this result draws (`plot(kind)`)."""
        return tuple(self.figure_fns)

    def rows(self) -> list[dict[str, Any]]:
        """The long per-sample table as a list of flat rows."""
        return _call(self.rows_fn, self._data)

    def to_pandas(self) -> Any:
        """The long per-sample table as a pandas DataFrame (the same rows as the saved table file)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def summary_renderables(self) -> list[Any]:
        """The console report as rich renderables (tables and plain-text lines)."""
        return _call(self.summary_fn, self._data)

    def summary(self) -> str:
        """The console report as plain text."""
        from plipy.report.base import render_text

        return render_text(self.summary_renderables())

    def _figure(self, kind: str, **options: Any) -> Any:
        return _call(self.figure_fns[kind], self._data)

    def plot(self, kind: str | None = None, **options: Any) -> Any:
        """One matplotlib figure (`kind`, one of `figure_kinds`), or a dict of all figures when `kind` is None."""
        if kind is None:
            return {k: f for k in self.figure_kinds if (f := self._optional_figure(k, **options)) is not None}
        if kind not in self.figure_kinds:
            shown = ", ".join(self.figure_kinds) or "none"
            raise PlipyError(f"{type(self).__name__} has no plot {kind!r} (plots: {shown})")
        return self._figure(kind, **options)

    def _optional_figure(self, kind: str, **options: Any) -> Any:
        return self._figure(kind, **options)

    def _repr_html_(self) -> str:
        import base64
        import html

        from plipy.report.base import png_bytes

        parts = [f"<b>{html.escape(repr(self))}</b>", f"<pre>{html.escape(self.summary())}</pre>"]
        if self.figure_kinds:
            fig = self._optional_figure(self.figure_kinds[0])
            if fig is not None:
                b64 = base64.b64encode(png_bytes(fig)).decode()
                parts.append(f'<img src="data:image/png;base64,{b64}" style="max-width:100%">')
        return "\n".join(parts)

    def to_html(self, path: str | Path | None = None, *, title: str | None = None) -> str:
        """This result as one self-contained interactive HTML page (plotly, every script inlined, no network);
        written atomically to `path` when given. Several results in one page: `plipy.html_report`."""
        from plipy.report import html

        return html.report([self], path, title=title)

    # -- files -----------------------------------------------------------------------------------------------

    def default_path(self) -> Path:
        """Where the CLI writes this result when no `--out` is given."""
        d = self._data
        layers = d.get("layers") if isinstance(d.get("layers"), list) else d["provenance"]["config"].get("layers")
        groups = d.get("groups") if isinstance(d.get("groups"), list) else []
        fields = {
            **d,
            "model": _model_name(self),
            "layers_label": _layers_label(layers),
            "groups_label": "+".join(groups),
        }
        return Path("results") / self.path_pattern.format(**fields)

    def _table_bytes(self, fmt: str) -> bytes:
        return table_bytes(self.rows(), fmt)

    def _plot_files(self, stem: Path, **options: Any) -> dict[Path, Any]:
        """PNG path → figure, for `save(plots=True)`."""
        return {Path(f"{stem}-{k}.png"): f for k, f in self.plot(**options).items()}

    def save(
        self,
        path: str | Path | None = None,
        *,
        plots: bool = False,
        table_format: str = "parquet",
        html: bool = False,
        **options: Any,
    ) -> dict[str, Any]:
        """Write the JSON, the per-sample table beside it (`.parquet` or `.csv`), with `plots` PNGs named
        `<stem>-<kind>.png` and with `html` the interactive report `<stem>.html`. Everything is rendered first and
        each file written atomically, JSON last.
        Returns the `files` block (also stored in the JSON's provenance: where a result was written is not part of
        what it says, so two runs that agree give identical documents outside provenance)."""
        from plipy.report.base import png_bytes

        if table_format not in TABLE_FORMATS:
            raise PlipyError(f"table format must be parquet or csv, got {table_format!r}")
        path = output_path(path if path is not None else self.default_path())  # siblings go beside a link's target
        clash = sibling_clash(path, table_format, html)
        if clash:
            raise OutputError(f"{path}: {clash}")
        table = path.with_suffix(f".{table_format}")
        outputs: dict[Path, bytes] = {table: self._table_bytes(table_format)}
        files: dict[str, Any] = {"json": str(path), "table": str(table)}
        files.update(self._extra_files(path, outputs, **options))
        if plots:
            pngs = self._plot_files(path.with_suffix(""), **options)
            outputs.update({p: png_bytes(f) for p, f in pngs.items()})
            files["plots"] = [str(p) for p in pngs]
        if html:
            files["html"] = str(path.with_suffix(".html"))
        data = {**self._data, "provenance": {**self._data.get("provenance", {}), "files": files}}
        data.pop("files", None)  # older documents kept it at the top level
        if html:  # drawn from the document as written, so the page lists its own files
            final = copy.copy(self)
            final._data = jsonable(data)
            outputs[Path(files["html"])] = final.to_html().encode()
        outputs[path] = json_bytes(data)
        write_outputs(outputs)
        self._data = jsonable(data)
        return files

    def _extra_files(self, path: Path, outputs: dict[Path, bytes], **options: Any) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_file(cls, path: Path, data: dict[str, Any]) -> Result:
        return cls(data)


def sibling_clash(path: Path, table_format: str, html: bool = False) -> str | None:
    """Why `save(path)` would write two of its files to one name, or None. The table and the HTML take the JSON's
    name with their own suffix; plots and sidecars end in `-<kind>.<ext>` and never take the JSON's name."""
    path = Path(path)
    siblings = {f"the {table_format} table": path.with_suffix(f".{table_format}")}
    if html:
        siblings["the HTML report"] = path.with_suffix(".html")
    for what, p in siblings.items():
        if p == path:
            return f"{what} would take the JSON's own name; give the JSON another suffix, e.g. {path.stem}.json"
    return None


# ---------------------------------------------------------------------------------------------- the kinds


def _call(ref: str, *args: Any) -> Any:
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)(*args)


def _model_name(result: Result) -> str:
    return str(result.provenance.get("model", {}).get("name", "model"))


def _layers_label(layers: Any) -> str:
    if not isinstance(layers, list) or not layers:
        return ""
    return "-".join(map(str, layers)) if len(layers) <= 4 else f"{layers[0]}..{layers[-1]}"


class ScanResult(Result):
    """`plipy.scan`: marker → target attention per sample, layer and head, beside the uniform and token-0 nulls."""

    kind, path_pattern = "scan", "scan-{model}.json"
    rows_fn, summary_fn = "plipy.experiments.scan:sample_rows", "plipy.report.scan:summary"
    figure_fns = {"layers": "plipy.report.scan:layers_figure", "heads": "plipy.report.scan:heads_figure", "tokens": ""}
    html_fn = "plipy.report.html.scan:view"

    @property
    def has_rows(self) -> bool:
        """Whether the marker rows are here (a run in this session, or a file saved with its `-rows.npz`)."""
        return "rows" in self.extras

    def token_texts(self, sample: str) -> list[str]:
        """The text of each token of a measured sample (decoded one token at a time, as the token plot shows)."""
        if "tokens" in self.extras:
            return list(self.extras["tokens"][sample])
        tok = self.extras["tokenizer"]
        return [tok.decode([t]) for t in self.extras["input_ids"][sample]]

    def _extra_files(self, path: Path, outputs: dict[Path, bytes], **options: Any) -> dict[str, Any]:
        if not self.has_rows:
            return {}
        import numpy as np

        from plipy.io import npz_bytes

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
    def _from_file(cls, path: Path, data: dict[str, Any]) -> Result:
        recorded = (data.get("provenance", {}).get("files") or {}).get("rows")
        if recorded is None:
            return cls(data)
        found = _find_sibling(path, recorded)
        if found is None:  # the JSON is the result; only the token view is lost (and says so)
            return cls(data, extras={"rows_missing": recorded})
        return cls(data, extras=_read_rows(found, data))

    def _figure(self, kind: str, **options: Any) -> Any:
        if kind == "tokens":
            return self._tokens_figure(options.get("sample"), options.get("layer"))
        return super()._figure(kind)

    def _optional_figure(self, kind: str, **options: Any) -> Any:
        if kind == "tokens" and not self.has_rows:
            return None  # loaded from a file whose rows sidecar is missing
        return self._figure(kind, **options)

    def token_layer(self, layer: int | None = None) -> int:
        """The layer of the token plot: `layer`, else the best layer by Holm-corrected p, else the last scanned."""
        layers = self._data["layers_scanned"]
        chosen = layer if layer is not None else self._data["best"]["holm"]["layer"]
        chosen = layers[-1] if chosen is None else chosen
        if chosen not in layers:
            from plipy.experiments.knockout import layer_label

            raise ParameterError("token_layer", f"layer {chosen} was not scanned (scanned: {layer_label(layers)})")
        return chosen

    def _tokens_figure(self, sample: str | None, layer: int | None) -> Any:
        from plipy.report import scan

        if not self.has_rows:
            missing = self.extras.get("rows_missing")
            why = f"{missing} is missing" if missing else "this file was saved without them"
            raise PlipyError(
                f"the token plot needs the scan's attention rows, saved beside the JSON as "
                f"<stem>{ROWS_SUFFIX} ({why}): rerun the scan"
            )
        measured = [s for s in self._data["samples"] if "attention" in s]
        rec = next((s for s in measured if s["id"] == sample), None) if sample else (measured or [None])[0]
        if rec is None:
            shown = ", ".join(s["id"] for s in measured[:5]) + (" …" if len(measured) > 5 else "")
            raise ParameterError("token_sample", f"{sample!r} is not a measured sample of this scan ({shown})")
        lay = self.token_layer(layer)
        row = self.extras["rows"][rec["id"]][self._data["layers_scanned"].index(lay)].mean(0)
        title = f"{rec['id']} — layer {lay}, head-mean attention of the marker row"
        tokens = self.token_texts(rec["id"])
        return scan.token_row_figure(tokens, row.tolist(), rec["marker_token"], rec["measured_targets"], title)


class KnockoutResult(Result):
    """`plipy.knockout`: next-token KL (and more) when attention edges are removed, per condition and sample."""

    kind, path_pattern = "knockout", "knockout-{model}-{mode}-{edges}.json"
    rows_fn, summary_fn = "plipy.experiments.knockout:sample_rows", "plipy.report.knockout:summary"
    figure_fns = {"heatmap": "plipy.report.knockout:heatmap_figure", "means": "plipy.report.knockout:means_figure"}
    html_fn = "plipy.report.html.knockout:view"


class CalibrateResult(Result):
    """`plipy.steer.calibrate`: two groups' baseline attention at one layer and the scale that closes the gap."""

    kind, path_pattern = "calibrate", "calibrate-{model}-L{layer}.json"
    rows_fn, summary_fn = "plipy.experiments.steer:calibrate_rows", "plipy.report.steer:calibrate_summary"
    figure_fns = {"groups": "plipy.report.steer:calibrate_figure"}
    html_fn = "plipy.report.html.steer:calibrate_view"


class DoseResult(Result):
    """`plipy.steer.dose`: KL and attention achieved per dose α and sample (and per target attention)."""

    kind, path_pattern = "dose", "steer-{model}-{groups_label}-L{layers_label}.json"
    rows_fn, summary_fn = "plipy.experiments.steer:sample_rows", "plipy.report.steer:dose_summary"
    figure_fns = {"dose": "plipy.report.steer:dose_figure"}
    html_fn = "plipy.report.html.steer:dose_view"


class GenerateResult(Result):
    """`plipy.steer.generate`: baseline vs steered generations by the same decoding call, and Fisher's test."""

    kind, path_pattern = "generate", "generate-{model}-L{layers_label}.json"
    rows_fn, summary_fn = "plipy.experiments.steer:generate_rows", "plipy.report.steer:generate_summary"
    figure_fns = {"preserved": "plipy.report.steer:generate_figure"}
    html_fn = "plipy.report.html.steer:generate_view"


class SaeAttentionResult(Result):
    """`plipy.sae_attention`: how steering with an SAE latent changes attention to the entity, per layer and head,
    against random latents. `arrays` = {"original": {measure: [N, L, H]}, "steered": {latent: {measure: …}}}."""

    kind, path_pattern = "sae-attention", "sae-attention-{model}-L{layer}F{latent}.json"
    summary_fn = "plipy.report.sae:summary"
    figure_fns = {"bars": "", "scatter": "", "heatmap": "", "boxes": ""}  # drawn from `arrays`, see _optional_figure
    html_fn = "plipy.report.html.sae:view"

    def __init__(self, data: dict[str, Any], *, arrays: dict[str, Any], extras: dict[str, Any] | None = None):
        super().__init__(data, extras=extras)
        self.arrays = arrays

    def __eq__(self, other: object) -> bool:
        import numpy as np

        if not super().__eq__(other):
            return False
        a, b = self.arrays, other.arrays  # type: ignore[attr-defined]
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

    def prompts(self) -> list[Any]:
        """The analysed prompts as `EntityPrompt`s."""
        from plipy.sae.inputs import EntityPrompt

        fields = ("prompt", "entity", "entity_type", "label", "relation")
        return [EntityPrompt(**{k: p.get(k) for k in fields if k in p}) for p in self._data["prompts"]]

    def columns(self) -> dict[str, Any]:
        """The long table as numpy columns (one row per latent, prompt, layer and head)."""
        from plipy.sae.attention import table_columns

        return table_columns(self.arrays, self.prompts(), self._data["latent"])

    def rows(self) -> list[dict[str, Any]]:
        cols = self.columns()
        n = len(next(iter(cols.values())))
        return [{k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in cols.items()} for i in range(n)]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.columns())

    def _table_bytes(self, fmt: str) -> bytes:
        from plipy.sae.attention import columns_bytes

        return columns_bytes(self.columns(), fmt)

    def _figure(self, kind: str, **options: Any) -> Any:
        fig = self._optional_figure(kind, **options)
        if fig is None:
            raise PlipyError("the known-vs-unknown boxes need prompts of two labels")
        return fig

    def _optional_figure(self, kind: str, **options: Any) -> Any:
        from plipy.report import sae

        m = options.get("measure") or next(iter(self._data["measures"]))
        if kind == "bars":
            return sae.bars(self._data, self.arrays, m)
        if kind == "scatter":
            return sae.scatter(self._data, self.arrays, self.prompts(), m)
        if kind == "heatmap":
            return sae.heatmap(self._data, m)
        return sae.boxes(self._data, self.arrays, self.prompts(), m)

    def _extra_files(self, path: Path, outputs: dict[Path, bytes], **options: Any) -> dict[str, Any]:
        if not options.get("npy"):
            return {}
        from plipy.sae.attention import npy_bytes

        heads = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in self._data["heads"]]
        files = npy_bytes(self.arrays, heads, self._data["latent"], self._data["random_latents"], path.with_suffix(""))
        outputs.update(files)
        return {"npy": [str(p) for p in files]}

    @classmethod
    def _from_file(cls, path: Path, data: dict[str, Any]) -> Result:
        from plipy.sae.attention import arrays_from_table

        files = data.get("provenance", {}).get("files") or data.get("files", {})  # older files: top level
        table = _sibling(path, files.get("table"))
        return cls(data, arrays=arrays_from_table(table, data))


class LensResult(Result):
    """`plipy.lens`: per position and layer, the top-k tokens of the logit lens and the tracked tokens' ranks."""

    kind, path_pattern = "lens", "lens-{model}.json"
    rows_fn, summary_fn = "plipy.experiments.lens:lens_rows", "plipy.report.lens:lens_summary"
    figure_fns = {"grid": "plipy.report.lens:grid_figure", "tracked": "plipy.report.lens:tracked_figure"}
    html_fn = "plipy.report.html.lens:lens_view"

    def _describe(self) -> str:
        return f"positions={[p['position'] for p in self._data['positions']]} top_k={self._data['top_k']}"


class EmergenceResult(Result):
    """`plipy.emergence`: per prompt and expected string, the first layer where a matching token is in the top-k."""

    kind, path_pattern = "emergence", "emergence-{model}.json"
    rows_fn, summary_fn = "plipy.experiments.emergence:emergence_rows", "plipy.report.lens:emergence_summary"
    figure_fns = {"ranks": "plipy.report.lens:emergence_figure"}
    html_fn = "plipy.report.html.lens:emergence_view"


class ProbeResult(Result):
    """`plipy.probe`: per layer, cross-validated linear-probe accuracy beside a shuffled-label control and the
    majority-class baseline."""

    kind, path_pattern = "probe", "probe-{model}-{feature}.json"
    rows_fn, summary_fn = "plipy.experiments.probe:probe_rows", "plipy.report.probe:summary"
    figure_fns = {"accuracy": "plipy.report.probe:accuracy_figure"}
    html_fn = "plipy.report.html.lens:probe_view"

    def _describe(self) -> str:
        return f"samples={len(self._data['samples'])} layers={len(self._data['layers'])}"


class SweepResult(Result):
    """`plipy.sweep`: one experiment over several models; the comparison table, one row per model (the per-model
    results are their own files)."""

    kind, path_pattern = "sweep", "sweep-{experiment}.json"
    rows_fn, summary_fn = "plipy.cluster.sweep:comparison_rows", "plipy.cluster.sweep:summary"
    figure_fns = {"ratios": "plipy.cluster.sweep:ratios_figure"}

    def __repr__(self) -> str:
        return f"<SweepResult experiment={self._data['experiment']} models={[m['spec'] for m in self._data['models']]}>"


KINDS: dict[str, type[Result]] = {
    c.kind: c
    for c in (
        ScanResult,
        KnockoutResult,
        CalibrateResult,
        DoseResult,
        GenerateResult,
        SaeAttentionResult,
        LensResult,
        EmergenceResult,
        ProbeResult,
        SweepResult,
    )
}
_SHAPES: list[tuple[str, Callable[[dict], bool]]] = [
    ("scan", lambda d: "layers_scanned" in d),
    ("knockout", lambda d: "runs" in d and "mode" in d),
    ("calibrate", lambda d: "dose_table" in d),
    ("dose", lambda d: "doses" in d and "monotonicity" in d),
    ("generate", lambda d: "summary" in d and "fisher_exact_p" in (d.get("summary") or {})),
    ("sae-attention", lambda d: "measures" in d and "latent" in d),
    ("lens", lambda d: "positions" in d and "top_k" in d),
    ("emergence", lambda d: "prompts" in d and "top_k" in d),
    ("probe", lambda d: "majority_baseline" in d),
    ("sweep", lambda d: "comparison" in d and "experiment" in d),
]


def kind_of(data: dict[str, Any]) -> str:
    """The result kind of a JSON document (its provenance says; older files are recognised by shape)."""
    kind = (data.get("provenance") or {}).get("kind")
    if kind in KINDS:
        return kind
    for name, test in _SHAPES:
        if test(data):
            return name
    raise PlipyError("not a plipy result file (no known result kind)")


ROWS_SUFFIX = "-rows.npz"


def _read_rows(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A scan's sidecar: marker rows, token ids and token texts per measured sample, checked against the JSON."""
    from plipy.io import read_npz

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
        if (
            rec is None
            or rows is None
            or tokens is None
            or rows.shape[0] != n_layers
            or rows.shape[-1] != rec["n_tokens"]
            or len(tokens) != rec["n_tokens"]
        ):
            raise PlipyError(f"{path}: its attention rows do not match the result (sample {sid!r})")
        extras["rows"][sid] = rows
        extras["input_ids"][sid] = [int(t) for t in z[f"input_ids_{i}"]]
        extras["tokens"][sid] = [str(t) for t in tokens]
    return extras


def _find_sibling(json_path: Path, recorded: str) -> Path | None:
    """A file the result names: as recorded if it exists, else the same name beside the JSON, else None."""
    for p in (Path(recorded), json_path.parent / Path(recorded).name):
        if p.is_file():
            return p
    return None


def _sibling(json_path: Path, recorded: str | None) -> Path:
    """A file the result names: as recorded if it exists, else the same name beside the JSON."""
    if recorded is None:
        raise PlipyError(f"{json_path}: the result names no table file")
    found = _find_sibling(json_path, recorded)
    if found is None:
        raise PlipyError(f"{json_path}: its table {recorded} is missing")
    return found


def load_result(path: str | Path) -> Result:
    """Read any saved result back into its class (`ScanResult`, `KnockoutResult`, …)."""
    p = Path(path)
    if not p.is_file():
        raise PlipyError(f"{p}: no such result file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlipyError(f"{p}: not a JSON result file ({e})") from None
    if not isinstance(data, dict):
        raise PlipyError(f"{p}: not a plipy result file")
    try:
        kind = kind_of(data)
    except PlipyError as e:
        raise PlipyError(f"{p}: {e}") from None
    return KINDS[kind]._from_file(p, data)
