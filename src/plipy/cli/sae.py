"""`plipy sae …`: SAE commands. `attention` steers with an SAE latent and measures what it does to attention;
`train` trains an SAE, `latents` scores its latents on known/unknown entities, `pipeline` runs everything."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import typer

from plipy.cli import common as c
from plipy.cli.common import console, err_console, progress_bars, split_list
from plipy.errors import PlipyError

app = typer.Typer(help="SAE steering and analyses (Do I know this entity?).", no_args_is_help=True)


@app.command("attention")
@c.shared(
    "model",
    *c.OUTPUT_OPTIONS,
    "dtype",
    "device",
    "fresh",
    "device_map",
    "max_memory",
    "ray",
    "workers",
)
def attention(
    latent: int = typer.Option(..., "--latent", "-l", help="Index of the SAE latent to steer with."),
    sae: Path | None = typer.Option(
        None, "--sae", help="SAELens folder (cfg.json + sae_weights.safetensors) or Gemma Scope params.npz."
    ),
    sae_release: str | None = typer.Option(None, "--sae-release", help="SAELens release (needs plipy\\[saelens])."),
    sae_id: str | None = typer.Option(None, "--sae-id", help="SAE id within --sae-release."),
    hook: str | None = typer.Option(None, "--hook", help="Override the SAE's hook, e.g. blocks.4.hook_resid_post."),
    layer: int | None = typer.Option(
        None,
        "--layer",
        help="Steer at the input of this decoder layer (resid_post of L-1 = input of L).",
        show_default="from the SAE's hook",
    ),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        help="JSONL/JSON rows {prompt, entity, entity_type, "
        "label}; rows without prompt use the template × base relations.",
    ),
    entities: Path | None = typer.Option(
        None,
        "--entities",
        help="Entity list (one per line or JSON list), expanded with the template; needs --entity-type.",
    ),
    entity_type: str | None = typer.Option(None, "--entity-type", help="Entity type of --entities."),
    label: str | None = typer.Option(None, "--entity-label", help="Label of --entities (known / unknown)."),
    old_label: str | None = c.old_spelling("--label", "--entity-label"),
    template: str = typer.Option("The {entity_type} {entity} {relation}", "--template", help="Prompt template."),
    labels: list[str] | None = typer.Option(None, "--labels", help="Keep only prompts with these labels."),
    limit: int | None = typer.Option(
        None, "--limit", help="First N prompts per (entity type, label); upstream used 100.", show_default="all"
    ),
    coeff: str = typer.Option(
        "100",
        "--coeff",
        "-c",
        help="A number, 'norm' (× residual norm) or 'mean' (× the latent's mean activation from --latent-file).",
    ),
    latent_file: Path | None = typer.Option(None, "--latent-file", help="Latent file with mean activations."),
    direction: str = typer.Option("decoder", "--direction", help="decoder (W_dec row) or encoder (W_enc column)."),
    ablate: list[str] | None = typer.Option(None, "--ablate", help="Latents to project out at the same positions."),
    pos: str = typer.Option(
        "entity_last", "--pos", help="entity_last | entity | entity_to_end | entity_last_to_end | all"
    ),
    measures: list[str] | None = typer.Option(
        None,
        "--measures",
        help="attn_weights, value_weighted, output_value_weighted, distance_based.",
        show_default="all four",
    ),
    ovw_norm: str = typer.Option("l1", "--ovw-norm", help="Norm of output_value_weighted: l1 (upstream) or l2."),
    heads: str | None = typer.Option(
        None,
        "--heads",
        help="Saved/tested heads: L12H3,L14H0 (from the steering layer on), A-B | a,b,c (those heads of every "
        "layer from the steering layer on) or all (every head of every layer).",
        show_default="every head from the steering layer on",
    ),
    expect: str = typer.Option(
        "auto", "--expect", help="auto (known ↓, unknown ↑ as upstream) | increase | decrease | two-sided"
    ),
    n_random: int = typer.Option(10, "--random", help="Random latents for the baseline (0: none)."),
    random_candidates: Path | None = typer.Option(
        None,
        "--random-candidates",
        help="Candidate latents: JSON list, upstream {L..F..: score} dict (score 0 kept) or text.",
    ),
    seed: int = typer.Option(42, "--seed", help="Seed of the random-latent draw."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level of the Welch tests, in (0, 1)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", "-b", help="Inputs (prompts, left-padded) per model forward.", show_default="16"
    ),
    bos: bool = typer.Option(
        True, "--bos/--no-bos", help="Prepend BOS (as TransformerLens does, unlike the PLIP experiments)."
    ),
    attn: str = typer.Option("eager", "--attn", help="eager (HF eager numerics) or sdpa (faster idle layers)."),
    npy: bool = typer.Option(
        False,
        "--npy",
        help="Also write upstream-style .npy dicts {'L{l}H{h}': values} "
        "(pickled object arrays: load only files you trust).",
    ),
    keep_partial: bool = typer.Option(
        False, "--keep-partial", hidden=True, help="Ignored (finished batches now live in the runs folder)."
    ),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Steer with an SAE latent and measure attention from the last position to the steered positions."""
    from plipy import api

    if keep_partial:  # kept for one release so scripts do not break
        err_console.print("--keep-partial is ignored: interrupted runs resume from $PLIPY_RUNS", highlight=False)
    with progress_bars() as start:
        result = api.sae_attention(
            o.model,
            sae,
            latent,
            prompts,
            entities=entities,
            entity_type=entity_type,
            label=label if old_label is None else old_label,
            template=template,
            labels=split_list(labels),
            limit=limit,
            sae_release=sae_release,
            sae_id=sae_id,
            layer=layer,
            hook=hook,
            coeff=coeff,
            latent_means=latent_file,
            direction=direction,
            ablate=split_list(ablate),
            pos=pos,
            measures=split_list(measures),
            ovw_norm=ovw_norm,
            heads=heads,
            expect=expect,
            random=n_random,
            random_candidates=random_candidates,
            seed=seed,
            alpha=alpha,
            batch_size=batch_size,
            bos=bos,
            attn=attn,
            fresh=o.fresh,
            progress=start,
            **c.load_options(o),
        )
    c.save_and_report(result, o.out, plot=o.plot, html=o.html, table_format=o.table_format, npy=npy)


# ------------------------------------------------------------------------------------------- train, latents, pipeline


@contextmanager
def _metric_bars() -> Iterator[Callable[[str, int], Callable[..., None]]]:
    """Progress bars whose `step(n=1, **metrics)` also shows the latest metrics (fvu, L0, dead latents) beside them."""
    from rich import progress as rp

    columns = (
        rp.TextColumn("[bold]{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(),
        rp.TimeRemainingColumn(),
        rp.TextColumn("{task.fields[metrics]}"),
    )
    with rp.Progress(*columns, console=err_console) as prog:

        def start(desc: str, total: int) -> Callable[..., None]:
            task = prog.add_task(desc, total=total, metrics="")

            def step(n: int = 1, **metrics: float) -> None:
                text = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
                if metrics:
                    prog.update(task, advance=n, metrics=text)
                else:  # the last metrics stay shown
                    prog.update(task, advance=n)

            return step

        yield start


@app.command("train")
@c.shared("model", "dtype", "device")
def train(
    layer: int = typer.Option(
        9,
        "--layer",
        help="Train on resid_post of this decoder layer (blocks.L.hook_resid_post;"
        " its latents steer at the input of L+1); 9 is a third of SmolLM2's 30 layers.",
    ),
    arch: str = typer.Option("topk", "--arch", help="topk or jumprelu."),
    width: int = typer.Option(4096, "--width", help="Number of latents."),
    k: int = typer.Option(32, "--k", help="TopK: active latents per token."),
    l0_coeff: float = typer.Option(2.0, "--l0-coeff", help="JumpReLU: weight of the L0 penalty."),
    lr: float = typer.Option(2e-3, "--lr", help="Adam learning rate (linear decay over the last 20 %)."),
    tokens: int = typer.Option(50_000, "--n-tokens", help="Activation tokens to collect (BOS excluded)."),
    old_tokens: int | None = c.old_spelling("--tokens", "--n-tokens"),
    epochs: int = typer.Option(3, "--epochs", help="Passes over the collected activations."),
    train_batch: int = typer.Option(512, "--train-batch", help="Activations per optimiser step."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per text sequence (BOS included)."),
    model_batch: int = c.batch_size_option(16, "text sequences"),
    auxk: bool = typer.Option(True, "--auxk/--no-auxk", help="TopK: AuxK loss on dead latents."),
    entity_text: int = typer.Option(
        500,
        "--entity-text",
        help="Entities per type whose attribute sentences join the training text (0: standard library text only).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the text order, init and batches."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder.", show_default="saes/<model>-L<layer>-<arch>"
    ),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Train an SAE on one layer's residual stream (offline text) and save it in SAELens format."""
    from plipy import api
    from plipy.report import sae as report_sae

    with _metric_bars() as start:
        sae, result = api.train_sae(
            o.model,
            layer=layer,
            out=out or True,
            entity_text=entity_text,
            batch_size=model_batch,
            train_batch=train_batch,
            arch=arch,
            width=width,
            k=k,
            lr=lr,
            n_tokens=tokens if old_tokens is None else old_tokens,
            epochs=epochs,
            seq_len=seq_len,
            seed=seed,
            auxk=auxk,
            l0_coeff=l0_coeff,
            progress=start,
            dtype=o.dtype,
            device=o.device,
        )
    c.print_report(report_sae.training_summary(result, result["provenance"]["model"]["name"], layer, width))
    console.print(
        f"wrote {sae.source} (cfg.json, sae_weights.safetensors, sparsity.safetensors, training.json)",
        highlight=False,
        soft_wrap=True,
    )


@app.command("latents")
@c.shared("model", "dtype", "device")
def latents(
    sae: Path = typer.Option(..., "--sae", help="SAELens folder or params.npz (with a residual hook)."),
    labels: Path | None = typer.Option(None, "--labels-file", help="Labels JSON from `plipy entities label`."),
    old_labels: Path | None = c.old_spelling("--labels", "--labels-file"),
    hook: str | None = typer.Option(None, "--hook", help="Override the SAE's hook, e.g. blocks.9.hook_resid_post."),
    split: str = typer.Option("train", "--split", help="Entities to score: train or all (upstream)."),
    general_filter: bool = typer.Option(
        True,
        "--general-text-filter/--no-general-text-filter",
        help="Drop latents active on ≥ --max-general-freq of general offline text.",
    ),
    max_general_freq: float = typer.Option(0.02, "--max-general-freq", help="Threshold of the general-text filter."),
    general_tokens: int = typer.Option(4096, "--general-tokens", help="General-text tokens for the filter."),
    top: int = typer.Option(20, "--top", help="Top latents kept per label."),
    batch_size: int = c.batch_size_option(32, "prompts"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Latent file.", show_default="results/sae-latents-<model>-L<layer>.json"
    ),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Score SAE latents on known vs unknown entities (`The {entity_type} '{entity}'`, last entity token)."""
    from plipy import api
    from plipy.report import sae as report_sae
    from plipy.workflows import sae_latents as sl

    labels = labels if old_labels is None else old_labels
    if labels is None:
        raise PlipyError("--labels-file is required: the labels JSON from `plipy entities label`")
    with _metric_bars() as start:
        doc = api.score_latents(
            o.model,
            sae,
            labels,
            split=split,
            general_filter=general_filter,
            general_tokens=general_tokens,
            max_general_freq=max_general_freq,
            top=top,
            batch_size=batch_size,
            hook=hook,
            progress=start,
            dtype=o.dtype,
            device=o.device,
        )
    paths = sl.write_latents(doc, out or sl.default_path(doc))
    c.print_report(report_sae.latents_summary(doc, split))
    console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False, soft_wrap=True)


@app.command("pipeline")
@c.shared("model", "dtype", "device")
def pipeline(
    quick: bool = typer.Option(False, "--quick", help="Tiny profile for tests (2 entities per type, tiny SAE)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder.", show_default="results/sae-pipeline-<model>"
    ),
    limit: int | None = typer.Option(
        None, "--limit", help="Entities per type to label.", show_default="24; --quick: 2"
    ),
    layer: int | None = typer.Option(None, "--layer", help="SAE layer (resid_post).", show_default="9"),
    coeff: str | None = typer.Option(
        None, "--coeff", help="Steering coefficient: a number, norm or mean.", show_default="norm"
    ),
    n_random: int | None = typer.Option(
        None, "--random", help="Random latents for the baseline.", show_default="10; --quick: 2"
    ),
    o: SimpleNamespace = c.OPTIONS,
) -> None:
    """Data → labels → SAE → latents → attention analysis → plots, in one folder (a rerun resumes)."""
    from plipy import api
    from plipy.workflows.sae_pipeline import summary_markdown

    with _metric_bars() as start:
        summary = api.sae_pipeline(
            o.model,
            out,
            quick=quick,
            label_limit=limit,
            layer=layer,
            coeff=coeff,
            n_random=n_random,
            progress=start,
            log=lambda s: err_console.print(s, highlight=False),
            dtype=o.dtype,
            device=o.device,
        )
    console.print(summary_markdown(summary), highlight=False, soft_wrap=True)
    console.print(f"wrote {summary['folder']}/summary.md, summary.json", highlight=False)
