"""Blocks every report has (the console summary, the provenance) and plotly helpers the views share: group colours,
95% CI bands, layout defaults, the generic view of a result kind that has no view of its own."""

from __future__ import annotations

import json
from typing import Any

from plipy.report.base import COLORS, mean_ci
from plipy.report.html.page import Section, esc, table_html


def go() -> Any:
    """plotly.graph_objects (imported on first use: plotly is only needed for HTML)."""
    import plotly.graph_objects as go

    return go


def layout(title: str | None = None, *, height: int = 380, **more: Any) -> dict[str, Any]:
    """Compact layout defaults for a figure in a report column."""
    out: dict[str, Any] = {
        "height": height,
        "margin": {"l": 60, "r": 20, "t": 40 if title else 20, "b": 50},
        "font": {"size": 11},
        "hovermode": "closest",
        "legend": {"font": {"size": 10}, "orientation": "h", "x": 0, "y": 1.0, "xanchor": "left", "yanchor": "bottom"},
    }
    if title:
        out["title"] = {"text": title, "font": {"size": 13}, "x": 0.01}
    out.update(more)
    return out


def color(i: int) -> str:
    """The i-th group colour (the PNG plots' colours)."""
    return COLORS[i % len(COLORS)]


def rgba(hex_color: str, alpha: float) -> str:
    """`#rrggbb` as an rgba() string (CI bands)."""
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def ci_traces(
    x: list[Any],
    values: list[list[float]],
    *,
    name: str,
    col: str,
    unit: str = "",
    legendgroup: str | None = None,
    fmt: str = ".4g",
) -> list[Any]:
    """A mean line with its t-based 95% CI as a band: three traces (upper edge, lower edge filled to it, mean).
    `values[i]` are the samples at x[i] (an empty list leaves a gap)."""
    g = go()
    m = [mean_ci(v) if v else (None, None, None) for v in values]
    n = [len(v) for v in values]
    lg = legendgroup or name
    hover = (
        f"{esc(name)}<br>%{{x}}: mean %{{y:{fmt}}}{unit}<br>95% CI [%{{customdata[0]:{fmt}}}, "
        f"%{{customdata[1]:{fmt}}}]<br>n = %{{customdata[2]}}<extra></extra>"
    )
    return [
        g.Scatter(
            x=x,
            y=[r[2] for r in m],
            mode="lines",
            line={"width": 0},
            showlegend=False,
            legendgroup=lg,
            hoverinfo="skip",
        ),
        g.Scatter(
            x=x,
            y=[r[1] for r in m],
            mode="lines",
            line={"width": 0},
            fill="tonexty",
            fillcolor=rgba(col, 0.18),
            showlegend=False,
            legendgroup=lg,
            hoverinfo="skip",
        ),
        g.Scatter(
            x=x,
            y=[r[0] for r in m],
            mode="lines+markers",
            name=name,
            legendgroup=lg,
            line={"color": col},
            marker={"size": 5},
            customdata=[[r[1], r[2], k] for r, k in zip(m, n, strict=True)],
            hovertemplate=hover,
        ),
    ]


def summary_block(sec: Section) -> None:
    """The console report, as `plipy` prints it."""
    sec.markup("summary", f'<pre class="summary">{esc(sec.result.summary())}</pre>', title="Console summary")


def provenance_block(sec: Section) -> None:
    """What ran, on what, with which versions: the key facts as a table, the whole block as JSON below."""
    prov = sec.result.provenance
    model, corpus = prov.get("model") or {}, prov.get("corpus") or {}
    libs = prov.get("libraries") or {}
    timing = prov.get("timing") or {}
    rows = [
        ["command", prov.get("command")],
        ["when", prov.get("timestamp")],
        ["plipy", prov.get("plipy_version")],
        ["model", model.get("spec")],
        ["model class", model.get("model_class")],
        ["weights sha256", model.get("weights_sha256")],
        ["dtype / device", f"{model.get('dtype', '?')} / {model.get('device', '?')}"],
        ["corpus", corpus.get("path")],
        ["corpus sha256", corpus.get("sha256")],
        ["versions", ", ".join(f"{k} {v}" for k, v in libs.items())],
        ["python / platform", f"{prov.get('python', '?')} / {prov.get('platform', '?')}"],
        ["seed", prov.get("seed")],
        ["run time", f"{timing['seconds']:.1f} s" if timing.get("seconds") is not None else None],
    ]
    shown = [[k, v] for k, v in rows if v not in (None, "", "? / ?")]
    body = table_html(["", ""], shown).replace('class="data"', 'class="data prov"')
    full = json.dumps(prov, indent=1, ensure_ascii=False)
    body += f'<details><summary>full provenance (JSON)</summary><pre class="json">{esc(full)}</pre></details>'
    sec.markup("provenance", body, title="Provenance")


def generic_view(sec: Section) -> None:
    """A kind without its own HTML view: its matplotlib figures as images (the console summary and provenance
    follow as in every report)."""
    from plipy.report.base import png_bytes

    result = sec.result
    for kind, figure in result.views.figures.items():
        if figure.why_not(result) is not None:
            continue
        try:
            fig = figure.draw(result)
        except Exception as e:  # a figure that cannot be drawn is named; the report goes on
            sec.text(f"figure-{kind}", f"{kind}: not drawn ({e})")
            continue
        sec.image(f"figure-{kind}", png_bytes(fig), title=kind)
