"""`plipy scan`: the attention layer scan with positional controls and full statistics."""

from __future__ import annotations

from types import SimpleNamespace

import typer

from plipy.cli import common as c


@c.shared(
    "model",
    "corpus",
    "offsets",
    *c.OUTPUT_OPTIONS,
    "bos",
    "seed",
    "resamples",
    *c.RUN_OPTIONS,
)
def scan(
    groups: list[str] | None = c.groups_option("the groups to measure; the first two are compared.", c.PLIP_GROUPS),
    layers: str = c.layers_option("all", "Layers to scan"),
    heads: str = typer.Option("all", "--heads", help="Query heads the metric averages: all | A-B | a,b,c."),
    token_sample: str | None = typer.Option(
        None, "--token-sample", help="Sample id for the token-level plot.", show_default="the first measured sample"
    ),
    token_layer: int | None = typer.Option(
        None, "--token-layer", help="Layer for the token-level plot.", show_default="the largest-effect layer"
    ),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Measure marker → target attention on every layer and head, beside the uniform and token-0 nulls."""
    from plipy import api
    from plipy.api.scan import check_token_view

    check_token_view(o.corpus, sample=token_sample, layer=token_layer, offsets=o.offsets)  # before any work
    with c.progress_bars() as start:
        result = api.scan(
            o.model,
            o.corpus,
            groups=c.split_list(groups),
            layers=layers,
            heads=heads,
            bos=o.bos,
            offsets=o.offsets,
            seed=o.seed,
            resamples=o.resamples,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    if o.plot:
        result.token_layer(token_layer)  # a bad --token-layer fails before anything is written
    c.save_and_report(
        result, o.out, plot=o.plot, html=o.html, table_format=o.table_format, sample=token_sample, layer=token_layer
    )
