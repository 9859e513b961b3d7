"""Interactive HTML reports: one self-contained file per run (plotly with its JS inlined, no network).

    r.to_html("scan.html")                               # one result
    plipy.html_report(["a.json", "b.json"], "cmp.html")  # several: results of one kind side by side
    plipy report a.json b.json -o cmp.html               # the same from the shell; `--html` on every command

A result kind draws its view with one function registered against its class (`@VIEWS.html(ScanResult)`), called
as `function(result, section)`; `section` collects figures, tables, a token view and detail panels
(`plipy.report.html.page.Section`). Kinds without one get the generic view (their PNG plots). Every report adds the
console summary and the provenance. How to add a view: docs/report.md.

    page      the page: blocks, side-by-side layout, inlined plotly.js / CSS / JS and data
    common    summary and provenance blocks, CI bands, layout defaults, the generic view
    tokens    the token view's data (marker rows as float32, token texts)
    scan, knockout, steer, sae   the views of each result kind
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from plipy.errors import PlipyError


def _view(result: Any) -> Callable[[Any, Any], None]:
    from plipy.report.html.common import generic_view
    from plipy.results.views import VIEWS

    fn = VIEWS.of(type(result)).html
    return fn if fn is not None else (lambda r, sec: generic_view(sec))


def render(results: Sequence[Any], *, title: str | None = None) -> str:
    """The HTML page of `results` (Result objects): grouped by kind, each kind's results side by side."""
    from plipy.report.html.common import provenance_block, summary_block
    from plipy.report.html.page import Page

    if not results:
        raise PlipyError("a report needs at least one result")
    kinds = list(dict.fromkeys(r.kind or type(r).__name__ for r in results))
    models = list(dict.fromkeys(str(r.provenance.get("model", {}).get("name", "?")) for r in results))
    page = Page(title or f"plipy {' + '.join(kinds)} — {', '.join(models)}")
    for r in results:
        sec = page.section(r)
        _view(r)(r, sec)
        summary_block(sec)
        provenance_block(sec)
    return page.render()


def html_report(results: Any, path: str | Path | None = None, *, title: str | None = None) -> str | Path:
    """One report of several results (Result objects or result files, or one of them): results of one kind side by
    side. Given `path`, the page is written there atomically and its path returned; else the page's text."""
    from plipy.io import atomic_write_bytes
    from plipy.results import Result, load_result

    items = [results] if isinstance(results, (str, Path, Result)) else list(results)
    loaded = [r if isinstance(r, Result) else load_result(r) for r in items]
    text = render(loaded, title=title)
    if path is None:
        return text
    atomic_write_bytes(path, text.encode())
    return Path(path)


__all__ = ["html_report", "render"]
