"""`plipy knockout`: remove marker ↔ target attention edges in some layers and measure the next-token KL."""

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
    "runner",
    "condition_batch",
    *c.RUN_OPTIONS,
)
def knockout(
    groups: list[str] | None = c.groups_option("the groups to measure; the first two are compared.", c.PLIP_GROUPS),
    layer: int | None = typer.Option(
        None, "--layer", help="Knock out one layer (the mode without a layer option).", show_default=c.PLIP_LAYER
    ),
    layers: str | None = c.layers_option(None, "Knock out these layers together (one condition)"),
    scan_layers: bool = typer.Option(False, "--scan-layers", help="Each layer alone."),
    scan_windows: bool = typer.Option(False, "--scan-windows", help="Expanding windows c±r, r = 0…max-radius."),
    center: int | None = typer.Option(None, "--center", help="Centre of --scan-windows.", show_default=c.PLIP_LAYER),
    max_radius: int | None = typer.Option(
        None, "--max-radius", help="Largest radius of --scan-windows.", show_default="5"
    ),
    slide_window: int | None = typer.Option(None, "--slide-window", help="Every window of W consecutive layers."),
    edges: str = typer.Option(
        "marker-to-targets", "--edges", help="marker-to-targets | to-marker (PLIP's --all-edges) | from-marker"
    ),
    ablation: str = typer.Option(
        "zero",
        "--ablation",
        help="zero (remove the edges) | mean (set each edge row's weight to its group's mean) | resample (to a "
        "donor sample's).",
    ),
    heads: str = typer.Option("all", "--heads", help="Query heads knocked out: all | none | A-B | a,b,c."),
    include_baselines: bool = typer.Option(
        False, "--include-baselines", help="Also measure the *_baseline groups (described, not tested)."
    ),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Knock out attention edges (PLIP-rs' ablation) on every sample; KL of the next-token distribution."""
    from plipy import api

    with c.progress_bars() as start:
        result = api.knockout(
            o.model,
            o.corpus,
            layer=layer,
            layers=layers,
            scan_layers=scan_layers,
            scan_windows=scan_windows,
            slide_window=slide_window,
            center=center,
            max_radius=max_radius,
            edges=edges,
            ablation=ablation,
            heads=heads,
            groups=c.split_list(groups),
            include_baselines=include_baselines,
            bos=o.bos,
            offsets=o.offsets,
            seed=o.seed,
            resamples=o.resamples,
            condition_batch=o.condition_batch,
            runner=o.runner,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)
