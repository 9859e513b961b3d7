"""HTML views of the logit lens, emergence and linear probes: the same numbers as the PNG plots, with hover."""

from __future__ import annotations

from typing import Any

from plipy.report.html.common import color, go, layout
from plipy.report.html.page import Section
from plipy.results.emergence import EmergenceResult
from plipy.results.lens import LensResult
from plipy.results.probe import ProbeResult
from plipy.results.views import VIEWS


@VIEWS.html(LensResult)
def lens_view(result: Any, sec: Section) -> None:
    """Per position: a layers × rank-1 heatmap of the top-1 probability (hover: the top tokens), and the tracked
    tokens' rank by layer; a table of each position's final top tokens."""
    g = go()
    positions = result["positions"]
    layers = [lay["layer"] for lay in positions[0]["layers"]] if positions else []
    z, text, hover = [], [], []
    for p in positions:
        tops = [lay["top"] for lay in p["layers"]]
        z.append([t[0]["prob"] if t else None for t in tops])
        text.append([t[0]["token"] if t else "" for t in tops])
        hover.append(["<br>".join(f"{x['token']!r}: {x['prob']:.3g}" for x in t[:5]) for t in tops])
    ylabels = [f"{p['position']}: {p['token']!r}" for p in positions]
    fig = g.Figure(
        g.Heatmap(
            z=z,
            x=layers,
            y=ylabels,
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar={"title": "p(top-1)"},
            hovertemplate="layer %{x}, position %{y}<br>%{customdata}<extra></extra>",
        )
    )
    fig.update_layout(
        **layout(
            height=140 + 28 * len(positions), xaxis={"title": "after decoder layer"}, yaxis={"autorange": "reversed"}
        )
    )
    sec.figure(
        "grid",
        fig,
        title="Top-1 token per layer and position",
        note="Cell text: the lens' top-1 token; colour: its probability; hover: the top 5.",
    )
    traces = []
    for i, p in enumerate(positions):
        for j, t in enumerate(p.get("tracked", [])):
            traces.append(
                g.Scatter(
                    x=layers,
                    y=t["ranks"],
                    mode="lines+markers",
                    line={"color": color(i + j)},
                    name=f"{t['token']!r} @ {p['position']} ({t['source']})",
                    customdata=t["probs"],
                    hovertemplate="layer %{x}: rank %{y}, p %{customdata:.3g}<extra></extra>",
                )
            )
    if traces:
        fig = g.Figure(traces)
        fig.update_layout(
            **layout(
                height=360,
                xaxis={"title": "after decoder layer"},
                yaxis={"title": "rank (1 = top)", "type": "log", "autorange": "reversed"},
            )
        )
        fig.add_hline(y=result["top_k"], line={"dash": "dash", "color": "#888"})
        sec.figure("tracked", fig, title="Tracked tokens: rank by layer", note=f"Dashed: the top-{result['top_k']}.")
    rows = [
        [
            p["position"],
            repr(p["token"]),
            repr(p.get("next_token")),
            ", ".join(f"{x['token']!r} {x['prob']:.3f}" for x in p["layers"][-1]["top"][:5]),
        ]
        for p in positions
    ]
    sec.table(
        "final",
        ["position", "token", "next token", "top 5 after the last layer"],
        rows,
        title="Predictions after the last layer",
    )


@VIEWS.html(EmergenceResult)
def emergence_view(result: Any, sec: Section) -> None:
    """Rank of the best-matching token by layer, one line per (prompt, expected string); the first layers."""
    g = go()
    layers = result["layers_shown"]
    traces, rows = [], []
    for i, p in enumerate(result["prompts"]):
        for e in p["expected"]:
            if e.get("ranks"):
                traces.append(
                    g.Scatter(
                        x=layers,
                        y=e["ranks"],
                        mode="lines+markers",
                        line={"color": color(i)},
                        name=f"{p['id']}: {e['string']!r}",
                        customdata=e.get("best_tokens"),
                        hovertemplate="layer %{x}: rank %{y} (%{customdata})<extra></extra>",
                    )
                )
            rows.append(
                [
                    p["id"],
                    repr(e["string"]),
                    e["n_vocab_matches"],
                    "never" if e["first_layer_in_top_k"] is None else e["first_layer_in_top_k"],
                    e.get("note") or "",
                ]
            )
    if traces:
        fig = g.Figure(traces)
        fig.update_layout(
            **layout(
                height=420,
                xaxis={"title": "after decoder layer"},
                yaxis={"title": "rank of the best match", "type": "log", "autorange": "reversed"},
            )
        )
        fig.add_hline(y=result["top_k"], line={"dash": "dash", "color": "#888"})
        sec.figure(
            "ranks",
            fig,
            title="Emergence: rank of the best token containing each expected string",
            note=f"Dashed: the top-{result['top_k']}; a string has emerged where its line crosses it.",
        )
    sec.table(
        "first",
        ["prompt", "expected", "vocabulary matches", "first layer in top-k", "note"],
        rows,
        title="First layer in the top-k",
    )


@VIEWS.html(ProbeResult)
def probe_view(result: Any, sec: Section) -> None:
    """Accuracy by layer (mean ± sd over folds, each fold), the shuffled-label control and the majority baseline."""
    g = go()
    ls = result["layers"]
    x = [r["layer"] for r in ls]
    acc = [r["accuracy"] for r in ls]
    sd = [r["accuracy_std"] for r in ls]
    traces = [
        g.Scatter(
            x=x,
            y=[a + s for a, s in zip(acc, sd, strict=True)],
            mode="lines",
            line={"width": 0},
            showlegend=False,
            hoverinfo="skip",
        ),
        g.Scatter(
            x=x,
            y=[a - s for a, s in zip(acc, sd, strict=True)],
            mode="lines",
            line={"width": 0},
            fill="tonexty",
            fillcolor="rgba(31,119,180,0.18)",
            showlegend=False,
            hoverinfo="skip",
        ),
        g.Scatter(
            x=x,
            y=acc,
            mode="lines+markers",
            name="probe accuracy",
            line={"color": color(0)},
            customdata=[[r["p_holm"], r["train_accuracy"]] for r in ls],
            hovertemplate="layer %{x}: %{y:.3f}<br>p (Holm) %{customdata[0]:.3g}, train "
            "%{customdata[1]:.3f}<extra></extra>",
        ),
        g.Scatter(
            x=[r["layer"] for r in ls for _ in r["fold_accuracies"]],
            y=[a for r in ls for a in r["fold_accuracies"]],
            mode="markers",
            name="folds",
            marker={"size": 4, "color": color(0), "opacity": 0.4},
        ),
        g.Scatter(
            x=x,
            y=[r["shuffled_mean"] for r in ls],
            mode="lines",
            name="shuffled labels (mean)",
            line={"color": color(1)},
        ),
        g.Scatter(
            x=x,
            y=[r["shuffled_p95"] for r in ls],
            mode="lines",
            name="shuffled labels (95th pct)",
            line={"color": color(1), "dash": "dot"},
        ),
        g.Scatter(
            x=x,
            y=[result["majority_baseline"]] * len(x),
            mode="lines",
            name="majority class",
            line={"color": "#888", "dash": "dash"},
        ),
    ]
    fig = g.Figure(traces)
    fig.update_layout(
        **layout(
            height=400,
            xaxis={"title": "after decoder layer"},
            yaxis={"title": "cross-validated accuracy", "range": [0, 1.05]},
        )
    )
    sec.figure(
        "accuracy",
        fig,
        title=f"Linear probe on the {result['feature']} token's residual",
        note=f"{result['folds']}-fold stratified CV; classes {', '.join(result['classes'])}.",
    )
