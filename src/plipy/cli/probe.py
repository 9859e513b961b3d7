"""`plipy probe`: per-layer linear probes of the residual stream, cross-validated, beside a shuffled control."""

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
    "dtype",
    "device",
    "fresh",
    "device_map",
    "max_memory",
    "ray",
    "workers",
)
def probe(
    groups: list[str] | None = c.groups_option("the groups (classes) to tell apart.", c.PLIP_GROUPS),
    label: str = typer.Option(
        "group", "--label", help="group (each group a class) | prefix (python_doctest and python_baseline → python)."
    ),
    feature: str = typer.Option("last", "--feature", help="last | marker: the token whose residual is probed."),
    layers: str = c.layers_option("all", "Layers to probe"),
    folds: int = typer.Option(5, "--folds", help="Stratified k-fold splits (≥ 2; fewer if a class is smaller)."),
    permutations: int = typer.Option(
        20, "--permutations", help="Shuffled-label refits per layer (the control; 0: none). p ≥ 1/(N+1)."
    ),
    C: float = typer.Option(
        1.0, "--inverse-regularization", help="C of the logistic regression: the inverse of its L2 penalty's strength."
    ),
    old_c: float | None = c.old_spelling("--C", "--inverse-regularization"),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Linear probes (PLIP-rs' plip-rs main): per layer, logistic regression on the residual after that layer, k-fold
    cross-validated, beside a shuffled-label control and the majority baseline. --corpus also takes labelled snippets
    ({"samples": [{"code", "label"}]} or JSON Lines)."""
    from plipy import api

    with c.progress_bars() as start:
        result = api.probe(
            o.model,
            o.corpus,
            groups=c.split_list(groups),
            label=label,
            feature=feature,
            layers=layers,
            folds=folds,
            permutations=permutations,
            C=C if old_c is None else old_c,
            seed=o.seed,
            bos=o.bos,
            offsets=o.offsets,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)
