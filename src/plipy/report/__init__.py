"""Reports of results: plots (matplotlib, returned as figures) and console tables, one module per result kind.

base      colours, PNG writing, 95% CIs, number formats, text rendering
scan      layer curves with nulls, layer × head heatmap, token row
knockout  condition × sample heatmap, group means per condition
steer     dose-response, calibration, generation
sae       SAE attention: per-head bars, scatter, heatmap, known/unknown boxes
"""

from __future__ import annotations

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
