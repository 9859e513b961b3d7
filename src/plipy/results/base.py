"""What every result offers: its JSON document, its long table, its files, and its views (drawn by `plipy.report`
through the registry in `plipy.results.views`)."""

from __future__ import annotations

import base64
import copy
import html
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, overload

from plipy.errors import OutputError, PlipyError
from plipy.io import json_bytes, jsonable, output_path, table_bytes, write_outputs
from plipy.results.views import VIEWS, KindViews

TABLE_FORMATS = ("parquet", "csv")


class Result(Mapping[str, Any]):
    """A result: a read-only mapping over the JSON document it writes, with its table, files and views.

    A kind names itself (`kind`, also the document's `provenance.kind`), its default file name (`path_pattern`,
    formatted with the document's fields, `model`, `layers_label` and `groups_label`) and its table (`rows`)."""

    kind: ClassVar[str] = ""
    path_pattern: ClassVar[str] = ""

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

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    @property
    def provenance(self) -> dict[str, Any]:
        """What ran, on what, with which versions."""
        prov: dict[str, Any] = self._data.get("provenance", {})
        return prov

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, Result) and self._data == other._data

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        model = self.provenance.get("model", {}).get("spec", "?")
        return f"<{type(self).__name__} model={model!r} {self._describe()}>"

    def _describe(self) -> str:
        return f"samples={len(self._data.get('samples') or self._data.get('prompts') or [])}"

    # -- the table -------------------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """The long per-sample table as a list of flat rows."""
        return []

    def to_pandas(self) -> Any:
        """The long per-sample table as a pandas DataFrame (the same rows as the saved table file)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def _table_bytes(self, fmt: str) -> bytes:
        return table_bytes(self.rows(), fmt)

    # -- views -----------------------------------------------------------------------------------------------

    @property
    def views(self) -> KindViews:
        """This kind's registered views."""
        return VIEWS.of(type(self))

    @property
    def figure_kinds(self) -> tuple[str, ...]:
        """The plots this result draws (`plot(kind)`)."""
        return tuple(self.views.figures)

    def summary_renderables(self) -> list[Any]:
        """The console report as rich renderables (tables and plain-text lines)."""
        fn = self.views.summary
        return [] if fn is None else fn(self)

    def summary(self) -> str:
        """The console report as plain text."""
        return VIEWS.renderers.text(self.summary_renderables())

    def plot(self, kind: str | None = None, **options: Any) -> Any:
        """One matplotlib figure (`kind`, one of `figure_kinds`), or a dict of every figure this result can draw
        when `kind` is None."""
        figures = self.views.figures
        if kind is None:
            return {k: f.draw(self, **options) for k, f in figures.items() if f.why_not(self) is None}
        if kind not in figures:
            shown = ", ".join(figures) or "none"
            raise PlipyError(f"{type(self).__name__} has no plot {kind!r} (plots: {shown})")
        why = figures[kind].why_not(self)
        if why is not None:
            raise PlipyError(why)
        return figures[kind].draw(self, **options)

    def _repr_html_(self) -> str:
        parts = [f"<b>{html.escape(repr(self))}</b>", f"<pre>{html.escape(self.summary())}</pre>"]
        first = next(((k, f) for k, f in self.views.figures.items() if f.why_not(self) is None), None)
        if first is not None:
            b64 = base64.b64encode(VIEWS.renderers.png(first[1].draw(self))).decode()
            parts.append(f'<img src="data:image/png;base64,{b64}" style="max-width:100%">')
        return "\n".join(parts)

    @overload
    def to_html(self, path: None = None, *, title: str | None = None) -> str: ...
    @overload
    def to_html(self, path: str | Path, *, title: str | None = None) -> Path: ...
    def to_html(self, path: str | Path | None = None, *, title: str | None = None) -> str | Path:
        """This result as one self-contained interactive HTML page (plotly, every script inlined, no network):
        the page's text, or, given a `path`, the page written there atomically and its path (a notebook cell then
        shows a path, not megabytes of HTML). Several results in one page: `plipy.html_report`."""
        text = VIEWS.renderers.page([self], title)
        if path is None:
            return text
        write_outputs({Path(path): text.encode()})
        return Path(path)

    # -- files -----------------------------------------------------------------------------------------------

    def default_path(self) -> Path:
        """Where the CLI writes this result when no `--out` is given."""
        d = self._data
        layers = d.get("layers") if isinstance(d.get("layers"), list) else d["provenance"]["config"].get("layers")
        groups: list[str] = d["groups"] if isinstance(d.get("groups"), list) else []
        fields = {
            **d,
            "model": str(self.provenance.get("model", {}).get("name", "model")),
            "layers_label": _layers_label(layers),
            "groups_label": "+".join(groups),
        }
        return Path("results") / self.path_pattern.format(**fields)

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
            stem = path.with_suffix("")
            pngs = {Path(f"{stem}-{k}.png"): VIEWS.renderers.png(f) for k, f in self.plot(**options).items()}
            outputs.update(pngs)
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
        """Files beyond the JSON and the table (a kind's sidecars), added to `outputs`; returns their `files`
        entries."""
        return {}

    @classmethod
    def from_file(cls, path: Path, data: dict[str, Any]) -> Result:
        """The result of a document read from `path` (a kind with sidecar files reads them beside it)."""
        return cls(data)


def _layers_label(layers: Any) -> str:
    if not isinstance(layers, list) or not layers:
        return ""
    return "-".join(map(str, layers)) if len(layers) <= 4 else f"{layers[0]}..{layers[-1]}"


def find_sibling(json_path: Path, recorded: str) -> Path | None:
    """A file the result names: as recorded if it exists, else the same name beside the JSON, else None."""
    for p in (Path(recorded), json_path.parent / Path(recorded).name):
        if p.is_file():
            return p
    return None


def sibling(json_path: Path, recorded: str | None) -> Path:
    """A file the result names: as recorded if it exists, else the same name beside the JSON."""
    if recorded is None:
        raise PlipyError(f"{json_path}: the result names no table file")
    found = find_sibling(json_path, recorded)
    if found is None:
        raise PlipyError(f"{json_path}: its table {recorded} is missing")
    return found


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
