"""`plipy sae …`: SAE commands. `attention` steers with an SAE latent and measures what it does to attention."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.table import Table

from plipy.cli.common import console, err_console, progress_bars, split_list

app = typer.Typer(help="SAE steering and analyses (Do I know this entity?).", no_args_is_help=True)


@app.command("attention")
def attention(
    latent: int = typer.Option(..., "--latent", "-l", help="Index of the SAE latent to steer with."),
    sae: Path | None = typer.Option(None, "--sae", help="SAELens folder (cfg.json + sae_weights.safetensors) "
                                    "or Gemma Scope params.npz."),
    sae_release: str | None = typer.Option(None, "--sae-release", help="SAELens release (needs plipy[saelens])."),
    sae_id: str | None = typer.Option(None, "--sae-id", help="SAE id within --sae-release."),
    hook: str | None = typer.Option(None, "--hook", help="Override the SAE's hook, e.g. blocks.4.hook_resid_post."),
    layer: int | None = typer.Option(None, "--layer", help="Steer at the input of this decoder layer "
                                     "(default: from the SAE's hook; resid_post of L-1 = input of L)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Alias, local dir, .gguf file or HF id."),
    prompts: Path | None = typer.Option(None, "--prompts", help="JSONL/JSON rows {prompt, entity, entity_type, "
                                        "label}; rows without prompt use the template × base relations."),
    entities: Path | None = typer.Option(None, "--entities", help="Entity list (one per line or JSON list), "
                                         "expanded with the template; needs --entity-type."),
    entity_type: str | None = typer.Option(None, "--entity-type", help="Entity type of --entities."),
    label: str | None = typer.Option(None, "--label", help="Label of --entities (known / unknown)."),
    template: str = typer.Option("The {entity_type} {entity} {relation}", "--template", help="Prompt template."),
    labels: list[str] | None = typer.Option(None, "--labels", help="Keep only prompts with these labels."),
    limit: int | None = typer.Option(None, "--limit", help="First N prompts per (entity type, label); upstream 100."),
    coeff: str = typer.Option("100", "--coeff", "-c", help="A number, 'norm' (× residual norm) or 'mean' "
                              "(× the latent's mean activation from --latent-file)."),
    latent_file: Path | None = typer.Option(None, "--latent-file", help="Latent file with mean activations."),
    direction: str = typer.Option("decoder", "--direction", help="decoder (W_dec row) or encoder (W_enc column)."),
    ablate: list[str] | None = typer.Option(None, "--ablate", help="Latents to project out at the same positions."),
    pos: str = typer.Option("entity_last", "--pos", help="entity_last | entity | entity_to_end | "
                            "entity_last_to_end | all"),
    measures: list[str] | None = typer.Option(None, "--measures", help="attn_weights, value_weighted, "
                                              "output_value_weighted, distance_based (default: all)."),
    ovw_norm: str = typer.Option("l1", "--ovw-norm", help="Norm of output_value_weighted: l1 (upstream) or l2."),
    heads: str | None = typer.Option(None, "--heads", help="Saved/tested heads: L12H3,L14H0 or all "
                                     "(default: every head of layers ≥ the steering layer)."),
    expect: str = typer.Option("auto", "--expect", help="auto (known ↓, unknown ↑ as upstream) | increase | "
                               "decrease | two-sided"),
    n_random: int = typer.Option(10, "--random", help="Random latents for the baseline (0: none)."),
    random_candidates: Path | None = typer.Option(None, "--random-candidates", help="Candidate latents: JSON list, "
                                                  "upstream {L..F..: score} dict (score 0 kept) or text."),
    seed: int = typer.Option(42, "--seed", help="Seed of the random-latent draw."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level of the Welch tests."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Prompts per forward (left-padded)."),
    bos: bool = typer.Option(True, "--bos/--no-bos", help="Prepend BOS (TransformerLens does)."),
    attn: str = typer.Option("eager", "--attn", help="eager (HF eager numerics) or sdpa (faster idle layers)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="JSON result (default results/sae-attention-…json)."),
    table_format: str = typer.Option("parquet", "--table-format", help="Per-prompt/head rows: parquet or csv."),
    npy: bool = typer.Option(False, "--npy", help="Also write upstream-style .npy dicts {'L{l}H{h}': values}."),
    plot: bool = typer.Option(False, "--plot", help="Write PNG plots beside the JSON."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard partial results of an earlier interrupted run."),
    keep_partial: bool = typer.Option(False, "--keep-partial", help="Keep the per-batch checkpoint folder."),
    dtype: str = typer.Option("float32", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Steer with an SAE latent and measure attention from the last position to the steered positions."""
    from plipy import sae as saes
    from plipy.errors import PlipyError
    from plipy.experiments import sae_attention as sa
    from plipy.experiments import sae_inputs as si
    from plipy.io import write_json
    from plipy.models import load_model

    if table_format not in ("parquet", "csv"):
        raise PlipyError(f"--table-format must be parquet or csv, got {table_format!r}")
    items = _prompts(si, prompts, entities, entity_type, label, template, split_list(labels), limit)
    for i, p in enumerate(items):  # fail before loading the model
        if not p.entity or p.entity not in p.prompt:
            raise PlipyError(f"prompt {i}: entity {p.entity!r} not found in its prompt {p.prompt!r}")
    if sae is not None:
        the_sae = saes.load_sae(sae, hook_name=hook)
    elif sae_release and sae_id:
        the_sae = saes.load_saelens_release(sae_release, sae_id)
        if hook:
            the_sae.hook_name = hook
    else:
        raise PlipyError("give --sae PATH, or --sae-release and --sae-id")
    the_sae.check_latent(latent)
    norms = the_sae.norm_summary()
    err_console.print(
        f"SAE {the_sae.source}: {the_sae.architecture}, d_in {the_sae.d_in}, d_sae {the_sae.d_sae}, hook "
        f"{the_sae.hook_name}; decoder row norms min {norms['min']:.4g} / mean {norms['mean']:.4g} / max "
        f"{norms['max']:.4g}" + ("" if norms["unit_norm"] else " (not unit norm: steering scales with them)"),
        highlight=False,
    )
    c = sa.parse_coeff(coeff)
    lm = load_model(model, dtype=dtype, device=device)
    saes.check_model(the_sae, lm.hidden_size, lm.n_layers)
    steer_at = sa.resolve_layer(the_sae, layer, lm.n_layers)
    means = si.read_latent_means(latent_file, layer=steer_at) if latent_file else {}
    if c == "mean" and latent_file is None:
        raise PlipyError("--coeff mean needs --latent-file (mean activations per latent)")
    cands = si.read_candidates(random_candidates, layer=steer_at) if random_candidates else None
    cfg = sa.AttentionConfig(
        latent=latent, layer=steer_at, coeff=c, direction=direction,
        ablate=tuple(int(a) for a in split_list(ablate) or []), pos_type=pos,
        measures=tuple(split_list(measures) or sa.MEASURES), ovw_norm=ovw_norm,
        heads=sa.parse_heads(heads, lm.n_layers, lm.n_heads), expect=expect, n_random=n_random,
        random_candidates=cands, seed=seed, alpha=alpha, batch_size=batch_size, bos=bos, attn_impl=attn,
        latent_means=means,
    )  # fmt: skip
    out = out or Path("results") / f"sae-attention-{lm.name}-L{steer_at}F{latent}.json"
    partial = out.with_name(out.stem + ".partial")
    if fresh and partial.exists():
        shutil.rmtree(partial)
    with progress_bars() as start:
        result, arrays = sa.run_attention(lm, the_sae, items, cfg, checkpoint_dir=partial, progress=start)
    stem = out.with_suffix("")
    table_path = out.with_suffix(f".{table_format}")
    sa.write_columns(table_path, sa.table_columns(arrays, items, latent))
    files: dict = {"json": str(out), "table": str(table_path)}
    heads_used = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in result["heads"]]
    if npy:
        files["npy"] = [str(p) for p in sa.save_npy(arrays, heads_used, latent, result["random_latents"], stem)]
    if plot:
        from plipy.experiments import sae_attention_plots as plots

        files["plots"] = [str(p) for p in plots.all_plots(result, arrays, items, stem)]
    result["files"] = files
    write_json(out, result)
    if not keep_partial:
        shutil.rmtree(partial, ignore_errors=True)
    _print(result)
    console.print("\nwrote " + ", ".join([files["json"], files["table"], *files.get("npy", []),
                                         *files.get("plots", [])]), highlight=False, soft_wrap=True)  # fmt: skip


def _prompts(si, prompts, entities, entity_type, label, template, labels, limit):
    from plipy.errors import PlipyError

    items = []
    if prompts is not None:
        items += si.load_prompts(prompts, template=template)
    if entities is not None:
        if not entity_type:
            raise PlipyError("--entities needs --entity-type")
        items += si.template_prompts(si.load_entity_list(entities, entity_type, label), template=template)
    if prompts is None and entities is None:
        raise PlipyError("give --prompts FILE and/or --entities FILE")
    if labels:
        items = [p for p in items if str(p.label) in labels]
    if limit is not None:
        seen: dict = {}
        kept = []
        for p in items:
            key = (p.entity_type, p.label)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= limit:
                kept.append(p)
        items = kept
    if not items:
        raise PlipyError("no prompts left to analyse")
    return items


def _print(result: dict) -> None:
    from plipy.report import fmt_num, fmt_p

    for m, r in result["measures"].items():
        top = sorted(r["per_head"], key=lambda h: -abs(h["mean_difference"]))[:8]
        t = Table(title=f"{m}: latent {result['latent']} at the input of layer {result['layer']} "
                  "(largest mean differences, steered − original)", header_style="bold")  # fmt: skip
        for col in ("head", "original", "steered", "difference", "std"):
            t.add_column(col, justify="right")
        for h in top:
            t.add_row(h["head"], fmt_num(h["mean_original"], ".4f"), fmt_num(h["mean_steered"], ".4f"),
                      fmt_num(h["mean_difference"], "+.4f"), fmt_num(h["std_difference"], ".4f"))  # fmt: skip
        console.print(t)
        for lab, g in r["by_label"].items():
            ps = ", ".join(f"{x['latent']}: p={fmt_p(x['p'])}, g={fmt_num(x['hedges_g'])}" for x in g["random"])
            console.print(f"  label {lab} (n={g['n_prompts']}, expected {g['expected']}): mean difference "
                          f"{fmt_num(g['mean_difference'], '+.4f')}; {g['summary']}" + (f"\n    {ps}" if ps else ""),
                          highlight=False, soft_wrap=True)  # fmt: skip
