"""The views of results: console tables, matplotlib figures and the interactive HTML page, one module per kind,
each registered against its result class in `plipy.results.views.VIEWS` when this package is imported.

    base      colours, PNG writing, 95% CIs, number formats, text rendering
    scan      layer curves with nulls, layer × head heatmap, token row
    knockout  condition × sample heatmap, group means per condition
    patching  layer × head heatmap of the normalised metric with CIs, top sites
    steer     dose-response, calibration, generation
    sae       SAE attention: per-head bars, scatter, heatmap, known/unknown boxes
    lens, probe, sweep, corpus, entities   the other kinds' reports
    html      the interactive page and each kind's view in it
"""

from __future__ import annotations

from plipy.report import entities, knockout, lens, patching, probe, qk, sae, scan, steer, sweep  # noqa: F401  (register views)
from plipy.report.base import (
    COLORS,
    fmt_kl,
    fmt_num,
    fmt_p,
    fmt_pct,
    mean_ci,
    png_bytes,
    pyplot,
    render_text,
    save_png,
)
from plipy.report.html import knockout as _html_knockout  # noqa: F401  (the HTML views register themselves)
from plipy.report.html import lens as _html_lens  # noqa: F401
from plipy.report.html import patching as _html_patching  # noqa: F401
from plipy.report.html import qk as _html_qk  # noqa: F401
from plipy.report.html import render as _render_page
from plipy.report.html import sae as _html_sae  # noqa: F401
from plipy.report.html import scan as _html_scan  # noqa: F401
from plipy.report.html import steer as _html_steer  # noqa: F401
from plipy.results.views import VIEWS, Renderers

VIEWS.use(Renderers(text=render_text, png=png_bytes, page=lambda results, title: _render_page(results, title=title)))

__all__ = [
    "COLORS",
    "fmt_kl",
    "fmt_num",
    "fmt_p",
    "fmt_pct",
    "mean_ci",
    "png_bytes",
    "pyplot",
    "render_text",
    "save_png",
]
