"""`plipy patch`: which heads carry the effect — activation patching, ablations, attribution and path patching."""

from __future__ import annotations

from types import SimpleNamespace

import typer

from plipy.cli import common as c

app = typer.Typer(
    help="Which heads carry the effect: activation and attribution patching (heads), path patching (paths).",
    no_args_is_help=True,
)

SHARED = (
    "model",
    "corpus",
    "offsets",
    "out",
    "plot",
    "html",
    "table_format",
    "bos",
    "seed",
    "resamples",
    "runner",
    "condition_batch",
    "dtype",
    "device",
    "fresh",
    "batch_size",
    "device_map",
    "max_memory",
    "ray",
    "workers",
)
POSITIONS = typer.Option("all", "--positions", help="Position classes patched: all | marker | targets | last, …")
METRIC = typer.Option(
    "kl",
    "--metric",
    help="kl (KL(P_clean ‖ P), float64) | prob | logit (of --answer) | logit-diff (--answer − --wrong)",
)
ANSWER = typer.Option(
    None, "--answer", help="The answer token (text of one token).", show_default="each sample's clean top-1"
)
ANSWER_ID = typer.Option(None, "--answer-id", help="The answer token by id.")
WRONG = typer.Option(
    None, "--wrong", help="logit-diff's other token.", show_default="the corrupt run's top other token"
)
PAIRS = typer.Option(
    None,
    "--pairs",
    help="Counterfactuals: a JSON file (sample id → corrupted code) or 'corpus' (each sample's "
    "'counterfactual' field).",
    show_default="the marker replaced by a neutral string of the same token count",
)
LAYERS = c.layers_option("all", "Layers whose sites are patched")
HEADS = typer.Option("all", "--heads", help="Heads patched in those layers: all | A-B | a,b,c.")


def _token(text: str | None, token_id: int | None) -> str | int | None:
    return token_id if token_id is not None else text


@app.command("heads")
@c.shared(*SHARED)
def heads(
    method: str = typer.Option("exact", "--method", help="exact | attribution (gradient estimate, checked)"),
    sites: str = typer.Option("heads,attn,mlp", "--sites", help="heads | attn (attention block) | mlp, …"),
    layers: str = LAYERS,
    heads: str = HEADS,
    positions: str = POSITIONS,
    directions: str = typer.Option("denoising,noising", "--directions", help="denoising | noising | none, …"),
    ablations: str = typer.Option("none", "--ablations", help="none | zero | mean | resample, …"),
    metric: str = METRIC,
    answer: str | None = ANSWER,
    answer_id: int | None = ANSWER_ID,
    wrong: str | None = WRONG,
    pairs: str | None = PAIRS,
    top: int = typer.Option(20, "--top", help="With --method attribution: the heads patched exactly to check it."),
    groups: list[str] | None = c.groups_option("the groups patched.", c.PLIP_GROUPS),
    *,
    o: SimpleNamespace,
) -> None:
    """Patch every head's output (and each layer's attention block and MLP) from the counterfactual run."""
    from plipy.api import patch

    with c.progress_bars() as start:
        result = patch.heads(
            o.model,
            o.corpus,
            method=method,
            sites=sites,
            layers=layers,
            heads=heads,
            positions=positions,
            directions=directions,
            ablations=ablations,
            metric=metric,
            answer=_token(answer, answer_id),
            wrong=wrong,
            pairs=pairs,
            top=top,
            groups=c.split_list(groups),
            bos=o.bos,
            offsets=o.offsets,
            seed=o.seed,
            resamples=o.resamples,
            runner=o.runner,
            condition_batch=o.condition_batch,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)


@app.command("paths")
@c.shared(*SHARED)
def paths(
    receivers: str = typer.Option(..., "--receivers", help="Receiver heads: e.g. 20.3,24.1 or L20H3,L24H1."),
    inputs: str = typer.Option("q,k,v", "--inputs", help="Receiver inputs, one condition each: q | k | v | kv …"),
    layers: str = c.layers_option("all", "Sender layers (those before the last receiver's)"),
    heads: str = typer.Option("all", "--heads", help="Sender heads: all | A-B | a,b,c."),
    positions: str = POSITIONS,
    directions: str = typer.Option("noising", "--directions", help="noising | denoising, …"),
    metric: str = METRIC,
    answer: str | None = ANSWER,
    answer_id: int | None = ANSWER_ID,
    wrong: str | None = WRONG,
    pairs: str | None = PAIRS,
    groups: list[str] | None = c.groups_option("the groups patched.", c.PLIP_GROUPS),
    *,
    o: SimpleNamespace,
) -> None:
    """Path patching: each sender head's direct effect on the receivers' query, key or value input."""
    from plipy.api import patch

    with c.progress_bars() as start:
        result = patch.paths(
            o.model,
            o.corpus,
            receivers=receivers,
            inputs=inputs,
            layers=layers,
            heads=heads,
            positions=positions,
            directions=directions,
            metric=metric,
            answer=_token(answer, answer_id),
            wrong=wrong,
            pairs=pairs,
            groups=c.split_list(groups),
            bos=o.bos,
            offsets=o.offsets,
            seed=o.seed,
            resamples=o.resamples,
            runner=o.runner,
            condition_batch=o.condition_batch,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format)
