"""`plipy qk`: why the query attends — its attention score split into query-side × key-side components."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import typer

from plipy.cli import common as c


@c.shared(
    "model",
    "corpus",
    "offsets",
    *c.OUTPUT_OPTIONS,
    *c.RUN_OPTIONS,
)
def qk(
    layer: int | None = typer.Option(
        None,
        "--layer",
        help="Layer to decompose.",
        show_default="--scan's largest-effect layer, else the SAE's, else PLIP's",
    ),
    scan: Path | None = typer.Option(None, "--scan", help="A scan result whose largest-effect layer is decomposed."),
    heads: str = typer.Option("all", "--heads", help="Query heads to decompose: all | A-B | a,b,c."),
    groups: list[str] | None = c.groups_option("the groups to decompose; the first two are contrasted.", c.PLIP_GROUPS),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="Entity prompts (JSONL) instead of the corpus: last token → entity tokens."
    ),
    per_head_components: bool = typer.Option(
        False, "--per-head-components", help="Split each earlier attention output into its heads."
    ),
    sae: Path | None = typer.Option(None, "--sae", help="SAE reading the residual entering the layer: latents."),
    hook: str | None = typer.Option(None, "--hook", help="The SAE's hook, when its files do not name it."),
    steer: int | None = typer.Option(None, "--steer", help="Also decompose a run steered with this SAE latent."),
    steer_sae: Path | None = typer.Option(None, "--steer-sae", help="The steering SAE.", show_default="--sae"),
    steer_coeff: float = typer.Option(100.0, "--steer-coeff", help="Steering coefficient (× the decoder row)."),
    steer_pos: str | None = typer.Option(
        None, "--steer-pos", help="Steered positions: targets | marker | all (prompts: entity_last | entity | …)."
    ),
    knockout: str | None = typer.Option(
        None, "--knockout", help="Also decompose a run with the query → key edges knocked out in these earlier layers."
    ),
    knockout_heads: str = typer.Option("all", "--knockout-heads", help="Heads of the knockout: all | A-B | a,b,c."),
    bos: bool | None = typer.Option(
        None, "--bos/--no-bos", help="Prepend BOS.", show_default="no for the corpus, yes for prompts"
    ),
    top: int = typer.Option(10, "--top", help="Top pairs and components reported per side."),
    o: SimpleNamespace | None = None,
) -> None:
    """Split the marker → target attention score (or last token → entity) into query × key component contributions."""
    from plipy import api

    assert o is not None  # c.shared passes the shared options
    with c.progress_bars() as start:
        result = api.qk(
            o.model,
            o.corpus,
            prompts=prompts,
            layer=layer,
            scan=scan,
            heads=heads,
            groups=c.split_list(groups),
            per_head_components=per_head_components,
            sae=sae,
            hook=hook,
            steer=steer,
            steer_sae=steer_sae,
            steer_coeff=steer_coeff,
            steer_pos=steer_pos,
            knockout=knockout,
            knockout_heads=knockout_heads,
            bos=bos,
            offsets=o.offsets,
            top=top,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)
