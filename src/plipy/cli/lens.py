"""`plipy lens`: the logit lens of a text or corpus sample; `plipy lens emergence`: PLIP-rs' test_emergence."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import typer
from typer.core import TyperGroup

from plipy.cli import common as c
from plipy.errors import PlipyError


class _DefaultRun(TyperGroup):
    """`plipy lens TEXT …` runs `plipy lens run TEXT …`: the lens is the group's default command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    no_args_is_help=True,
    help="The logit lens: what each layer would predict. `plipy lens TEXT` (= `plipy lens run TEXT`) "
    "or `plipy lens emergence`.",
)

TOP_K = "Tokens listed per layer (ranks beyond it are still reported for tracked tokens)."


@app.command("run")
@c.shared(
    "model",
    "corpus",
    "offsets",
    *c.OUTPUT_OPTIONS,
    "bos",
    "dtype",
    "device",
    "fresh",
    "device_map",
    "max_memory",
    "ray",
    "workers",
)
def run(
    text: str | None = typer.Argument(None, help="The text (or use --file / --sample)."),
    file: Path | None = typer.Option(None, "--file", help="Read the text from this file (UTF-8)."),
    sample: str | None = typer.Option(None, "--sample", help="A corpus sample id instead of a text."),
    positions: str = typer.Option(
        "last",
        "--positions",
        help="last | all | marker (with --sample) | token indices such as 0,5,-1 (negative: from the end).",
    ),
    top_k: int = typer.Option(10, "--top-k", "-k", help=TOP_K),
    token: list[str] | None = typer.Option(
        None, "--token", help="A token to track (one token's text, e.g. ' test'; repeatable)."
    ),
    token_id: list[int] | None = typer.Option(None, "--token-id", help="A token id to track (repeatable)."),
    layers: str = c.layers_option("all", "Layers to show"),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Logit lens: per layer, the residual after that decoder layer → the model's final norm → unembedding →
    softmax; top-k tokens, tracked tokens' ranks, and the first layer where each enters the top-k."""
    from plipy import api

    given = [x for x in (text, file, sample) if x is not None]
    if len(given) != 1:
        raise PlipyError("give one of TEXT, --file or --sample")
    if file is not None:
        if not file.is_file():
            raise PlipyError(f"--file {file}: no such file")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PlipyError(f"--file {file}: not UTF-8 text ({e.reason})") from None
    with c.progress_bars() as start:
        result = api.lens(
            o.model,
            text,
            sample=sample,
            corpus=o.corpus,
            positions=positions,
            top_k=top_k,
            tokens=[*(token or []), *(token_id or [])],
            layers=layers,
            bos=o.bos,
            offsets=o.offsets,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)


@app.command("emergence")
@c.shared(
    "model",
    *c.OUTPUT_OPTIONS,
    "bos",
    "dtype",
    "device",
    "fresh",
    "device_map",
    "max_memory",
    "ray",
    "workers",
)
def emergence(
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        help="JSON / JSON Lines of {id, prompt, expect: [...]}.",
        show_default="PLIP-rs' test_emergence prompts",
    ),
    top_k: int = typer.Option(
        100, "--top-k", "-k", help="A string has emerged when a token containing it is in the top-k (PLIP-rs used 100)."
    ),
    layers: str = c.layers_option("all", "Layers to look at"),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """PLIP-rs' test_emergence: per prompt and expected string, the first layer where a token containing it enters
    the lens' top-k, and its rank by layer."""
    from plipy import api

    with c.progress_bars() as start:
        result = api.emergence(
            o.model,
            prompts,
            top_k=top_k,
            layers=layers,
            bos=o.bos,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)
