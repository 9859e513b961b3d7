"""Logit-lens reports: the layer × position grid of top-1 tokens, tracked tokens' rank by layer, the emergence
rank plot, and their console tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from rich.table import Table

from plipy.report.base import COLORS, Note, pyplot
from plipy.results.emergence import EmergenceResult
from plipy.results.lens import LensResult
from plipy.results.views import VIEWS

TOP_SHOWN = 3  # top tokens per layer in the console table
MAX_POSITION_TABLES = 4  # more positions: one compact table


def show(token: str) -> str:
    """A token as printable text: Python's repr (quotes around it, newlines and tabs escaped)."""
    return repr(token)


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def _position_table(result: Mapping[str, Any], pos: dict) -> Table:
    k = min(TOP_SHOWN, result["top_k"])
    nxt = f", next token {show(pos['next_token'])}" if pos["next_token"] is not None else ""
    t = Table(title=f"Logit lens at position {pos['position']} (token {show(pos['token'])}{nxt})", header_style="bold")
    t.add_column("layer", justify="right")
    for i in range(k):
        t.add_column(f"top {i + 1}")
        t.add_column("p", justify="right")
    for lay in pos["layers"]:
        cells = [c for e in lay["top"][:k] for c in (show(e["token"]), _pct(e["prob"]))]
        t.add_row(str(lay["layer"]), *cells)
    return t


def _tracked_table(result: Mapping[str, Any], pos: dict) -> Table:
    layers = result["layers_shown"]
    marks = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    t = Table(
        title=f"Tracked tokens at position {pos['position']} (rank 1 = top; top-k = {result['top_k']})",
        header_style="bold",
    )
    for col in (
        "token",
        "id",
        "why",
        f"first layer in top-{result['top_k']}",
        *(f"rank L{m}" for m in marks),
        f"p L{layers[-1]}",
    ):
        t.add_column(col, justify="left" if col in ("token", "why") else "right")
    for tr in pos["tracked"]:
        ranks = [tr["ranks"][layers.index(m)] for m in marks]
        first = tr["first_layer_in_top_k"]
        t.add_row(
            show(tr["token"]),
            str(tr["id"]),
            ",".join(tr["source"]),
            "—" if first is None else str(first),
            *map(str, ranks),
            _pct(tr["probs"][-1]),
        )
    return t


def _compact_table(result: Mapping[str, Any]) -> Table:
    t = Table(
        title=f"Logit lens at {len(result['positions'])} positions: the final prediction and where it appears",
        header_style="bold",
    )
    for col in (
        "position",
        "token",
        "next token",
        "final top-1",
        "p",
        f"first layer in top-{result['top_k']}",
        "next token: first layer",
    ):
        t.add_column(col, justify="right" if col in ("position", "p") else "left")
    for pos in result["positions"]:
        final = next(tr for tr in pos["tracked"] if "final-top1" in tr["source"])
        nxt = next((tr for tr in pos["tracked"] if "next-token" in tr["source"]), None)
        t.add_row(
            str(pos["position"]),
            show(pos["token"]),
            "—" if nxt is None else show(nxt["token"]),
            show(final["token"]),
            _pct(final["probs"][-1]),
            str(final["first_layer_in_top_k"]),
            "—" if nxt is None else str(nxt["first_layer_in_top_k"]),
        )
    return t


@VIEWS.summary(LensResult)
def lens_summary(result: Mapping[str, Any]) -> list[Any]:
    """Per position the top tokens of each layer and the tracked tokens (a compact table for many positions)."""
    out: list[Any] = []
    if len(result["positions"]) > MAX_POSITION_TABLES:
        out.append(_compact_table(result))
    else:
        for pos in result["positions"]:
            out += [_position_table(result, pos), _tracked_table(result, pos)]
    c = result["check"]
    out.append(
        f"layer L = after decoder layer L; last layer = the model's own logits (max |Δ| "
        f"{c['last_layer_vs_model_logits_max_abs']:.2g}; logit transform: {c['logit_transform']})"
    )
    return out


@VIEWS.figure(LensResult, "grid")
def grid_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Layers × positions: each cell the lens' top-1 token, coloured by its probability."""
    plt = pyplot()
    positions = result["positions"]
    layers = result["layers_shown"]
    prob = np.array([[lay["top"][0]["prob"] for lay in pos["layers"]] for pos in positions]).T  # [L, P]
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(positions), 1.2 + 0.28 * len(layers)))
    im = ax.imshow(prob, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    fs = 7 if len(positions) < 12 else 5
    for j, pos in enumerate(positions):
        for i, lay in enumerate(pos["layers"]):
            ax.text(
                j,
                i,
                show(lay["top"][0]["token"])[:12],
                ha="center",
                va="center",
                fontsize=fs,
                color="white" if prob[i, j] > 0.6 else "black",
            )
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xticks(range(len(positions)), [f"{p['position']}\n{show(p['token'])[:10]}" for p in positions], fontsize=6)
    ax.set(
        xlabel="position (input token)",
        ylabel="layer (after decoder layer L)",
        title="logit lens: top-1 token per layer (colour: its probability)",
    )
    fig.colorbar(im, ax=ax, fraction=0.04)
    return fig


@VIEWS.figure(LensResult, "tracked")
def tracked_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Rank (log scale, 1 at the top) of every tracked token by layer, one panel per position (at most 6)."""
    plt = pyplot()
    positions = result["positions"][:6]
    layers = result["layers_shown"]
    fig, axes = plt.subplots(1, len(positions), figsize=(5.2 * len(positions), 3.8), squeeze=False)
    for ax, pos in zip(axes[0], positions, strict=False):
        for i, tr in enumerate(pos["tracked"]):
            ax.plot(
                layers,
                tr["ranks"],
                "-o",
                ms=3,
                color=COLORS[i % len(COLORS)],
                label=f"{show(tr['token'])} ({','.join(tr['source'])})",
            )
        ax.axhline(result["top_k"], color="grey", ls="--", lw=1, label=f"top-{result['top_k']}")
        ax.set_yscale("log")
        ax.invert_yaxis()
        ax.set(xlabel="layer", ylabel="rank (1 = top)", title=f"position {pos['position']} ({show(pos['token'])})")
        ax.legend(fontsize=7)
    return fig


# -- emergence -------------------------------------------------------------------------------------------------------


@VIEWS.summary(EmergenceResult)
def emergence_summary(result: Mapping[str, Any]) -> list[Any]:
    """Per prompt and expected string: the first layer in the top-k, the token found there, the final rank."""
    k = result["top_k"]
    last = result["layers_shown"][-1]
    t = Table(
        title=f"Test-marker emergence: first layer where a token containing the string is in the top-{k}",
        header_style="bold",
    )
    for col in (
        "prompt",
        "expected",
        "first layer",
        "token there",
        "p there",
        f"rank L{last}",
        f"p L{last}",
        "matches in vocab",
    ):
        t.add_column(col, justify="left" if col in ("prompt", "expected", "token there") else "right")
    out: list[Any] = [t]
    for p in result["prompts"]:
        for e in p["expected"]:
            at = e["at_first_layer"]
            t.add_row(
                p["id"],
                show(e["string"]),
                "—" if at is None else str(e["first_layer_in_top_k"]),
                "—" if at is None else show(at["token"]),
                "—" if at is None else _pct(at["prob"]),
                str(e["ranks"][-1]) if e["ranks"] else "—",
                _pct(e["probs"][-1]) if e["probs"] else "—",
                str(e["n_vocab_matches"]),
            )
    for p in result["prompts"]:
        top = ", ".join(show(x["token"]) for x in p["final_top"][:5])
        first = p["earliest_layer"]
        out.append(f"{p['id']}: earliest layer {'—' if first is None else first}; the model's top 5: {top}")
        out += [Note(f"{p['id']}: {show(e['string'])}: {e['note']}") for e in p["expected"] if e.get("note")]
    return out


@VIEWS.figure(EmergenceResult, "ranks")
def emergence_figure(result: Mapping[str, Any], **_options: Any) -> Any:
    """Rank of the best token containing each expected string, by layer; one panel per prompt."""
    plt = pyplot()
    prompts = result["prompts"]
    layers = result["layers_shown"]
    cols = min(4, len(prompts))
    rows = (len(prompts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), squeeze=False)
    for ax, p in zip(axes.flat, prompts, strict=False):
        for i, e in enumerate(p["expected"]):
            if e["ranks"]:
                ax.plot(layers, e["ranks"], "-", lw=1.3, color=COLORS[i % len(COLORS)], label=show(e["string"]))
        ax.axhline(result["top_k"], color="grey", ls="--", lw=1)
        ax.set_yscale("log")
        ax.invert_yaxis()
        ax.set_title(p["id"], fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("rank of best match", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(prompts) :]:
        ax.axis("off")
    fig.suptitle(f"emergence: rank by layer (dashed: top-{result['top_k']})", fontsize=10)
    fig.tight_layout()
    return fig
