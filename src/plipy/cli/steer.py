"""`plipy steer`: calibrate, dose-response and steered generation (post-softmax ×α on marker → target edges)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import typer

from plipy.cli import common as c

app = typer.Typer(help="Attention steering: calibrate, dose-response, steered generation.", no_args_is_help=True)

LAYER = typer.Option(None, "--layer", help="Steer one layer.", show_default=c.PLIP_LAYER)
HEADS = typer.Option("all", "--heads", help="Query heads steered: all | none | A-B | a,b,c.")


@app.command("calibrate")
@c.shared(
    "model",
    "corpus",
    "offsets",
    *c.OUTPUT_OPTIONS,
    "skip_invalid",
    "bos",
    *c.RUN_OPTIONS,
)
def calibrate(
    layer: int | None = LAYER,
    groups: list[str] | None = c.groups_option("A,B — the scale brings B to A's level.", "python_doctest,rust_test"),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Baseline attention of two groups at one layer, their ratio, and the scale that brings B to A's level."""
    from plipy.api import steer

    with c.progress_bars() as start:
        result = steer.calibrate(
            o.model,
            o.corpus,
            layer=layer,
            groups=c.split_list(groups),
            skip_invalid=o.skip_invalid,
            bos=o.bos,
            offsets=o.offsets,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)


@app.command("dose")
@c.shared(
    "model",
    "corpus",
    "offsets",
    *c.OUTPUT_OPTIONS,
    "skip_invalid",
    "bos",
    "runner",
    "condition_batch",
    *c.RUN_OPTIONS,
)
def dose(
    groups: list[str] | None = c.groups_option("the groups to steer.", "rust_test"),
    layer: int | None = LAYER,
    layers: str | None = c.layers_option(None, "Steer several layers at once"),
    doses: str = typer.Option("0.5,1,2,3,4,6", "--doses", help="Comma-separated scales α."),
    heads: str = HEADS,
    target_attention: float | None = typer.Option(
        None, "--target-attention", help="Also find, per sample, the α reaching this attention."
    ),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Dose-response: KL(base ‖ steered) and attention achieved per dose and sample, group mean/std/n."""
    from plipy.api import steer

    with c.progress_bars() as start:
        result = steer.dose(
            o.model,
            o.corpus,
            groups=c.split_list(groups),
            layer=layer,
            layers=layers,
            doses=doses,
            heads=heads,
            target_attention=target_attention,
            skip_invalid=o.skip_invalid,
            bos=o.bos,
            offsets=o.offsets,
            condition_batch=o.condition_batch,
            runner=o.runner,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)


@app.command("generate")
@c.shared(
    "model",
    *c.OUTPUT_OPTIONS,
    *c.RUN_OPTIONS,
)
def generate(
    prompts: Path | None = typer.Option(None, "--prompts", help="Prompts JSON.", show_default="bundled Rust prompts"),
    layer: int | None = LAYER,
    layers: str | None = c.layers_option(None, "Steer several layers at once"),
    scale: float = typer.Option(3.0, "--scale", help="α on the steered edge."),
    max_tokens: int = typer.Option(64, "--max-new-tokens", help="New tokens per generation."),
    old_max_tokens: int | None = c.old_spelling("--max-tokens", "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sampling (same seed for both)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler (set before each of the two generations)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt in the tokenizer's chat template."),
    detect: list[str] | None = typer.Option(None, "--detect", help="Regex of a test marker (repeatable)."),
    query_text: str = typer.Option("fn ", "--query-text", help="Edge query: the token of its last occurrence."),
    key_text: str = typer.Option("#[test]", "--key-text", help="Edge key: the token of its first occurrence."),
    heads: str = HEADS,
    limit: int | None = typer.Option(None, "--limit", help="Only the first N prompts (N ≥ 1).", show_default="all"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Leave out prompts whose key is after the query."),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Baseline vs steered generation side by side (same decoding path), test-marker counts, Fisher's exact test."""
    from plipy.api import steer

    with c.progress_bars() as start:
        result = steer.generate(
            o.model,
            prompts,
            layer=layer,
            layers=layers,
            scale=scale,
            max_tokens=max_tokens if old_max_tokens is None else old_max_tokens,
            temperature=temperature,
            seed=seed,
            chat=chat,
            detect=detect,
            query_text=query_text,
            key_text=key_text,
            heads=heads,
            limit=limit,
            skip_invalid=skip_invalid,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)
