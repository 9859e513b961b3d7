"""`plipy.sae_attention` and the SAE workflow: training, latent scores, the pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, as_model, check_cluster, ray_load
from plipy.errors import ParameterError
from plipy.results import SaeAttentionResult
from plipy.runtime.experiment import Progress


def as_sae(sae: Any, *, hook: str | None = None) -> Any:
    """An `SAE` from a path (SAELens folder, params.npz) or an `SAE`."""
    from plipy.sae import SAE, load_sae

    if isinstance(sae, SAE):
        if hook is not None:
            sae.hook_name = hook
        return sae
    if isinstance(sae, (str, Path)):
        return load_sae(sae, hook_name=hook)
    raise ParameterError("sae", f"expected an SAE or a path, got {type(sae).__name__}")


def as_prompts(prompts: Any, *, template: str | None = None) -> list[Any]:
    """Entity prompts from a JSONL/JSON path, a list of `EntityPrompt`s or a list of dicts
    (`{prompt, entity, entity_type, label}`; rows without `prompt` use the template × base relations)."""
    from plipy.sae import inputs as si

    tmpl = template or si.TEMPLATE
    if isinstance(prompts, (str, Path)):
        items = si.load_prompts(prompts, template=tmpl)
    elif isinstance(prompts, Sequence) and all(isinstance(p, si.EntityPrompt) for p in prompts):
        items = list(prompts)
    elif isinstance(prompts, Sequence) and all(isinstance(p, dict) for p in prompts):
        items = si.prompts_from_rows(list(prompts), template=tmpl, where="prompts")
    else:
        raise ParameterError("prompts", "expected a path, EntityPrompts or dicts {prompt, entity, entity_type, label}")
    for i, p in enumerate(items):
        if not p.entity or p.entity not in p.prompt:
            raise ParameterError("prompts", f"prompt {i}: entity {p.entity!r} not found in {p.prompt!r}")
    if not items:
        raise ParameterError("prompts", "no prompts to analyse")
    return items


def sae_attention(
    model: Any,
    sae: Any,
    latent: int,
    prompts: Any,
    *,
    layer: int | None = None,
    hook: str | None = None,
    coeff: Any = 100.0,
    latent_means: dict[int, float] | None = None,
    direction: str = "decoder",
    ablate: Sequence[int] = (),
    pos: str = "entity_last",
    measures: Any = None,
    ovw_norm: str = "l1",
    heads: Any = None,
    expect: str = "auto",
    random: int = 10,
    random_candidates: Sequence[int] | None = None,
    seed: int = 42,
    alpha: float = 0.05,
    batch_size: int = 16,
    bos: bool = True,
    attn: str = "eager",
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    device_map: Any = None,
    max_memory: Any = None,
    checkpoint_dir: str | Path | None = None,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> SaeAttentionResult:
    """Steer with an SAE latent at the entity and measure, per layer and head, how attention from the last position
    to the steered tokens changes, against `random` random latents (`plipy sae attention`). `ray`/`workers`: the
    prompt batches on Ray workers, as in `scan`."""
    from plipy import sae as sa

    cluster = check_cluster(ray, workers)
    items = as_prompts(prompts)
    the_sae = as_sae(sae, hook=hook)
    the_sae.check_latent(latent)
    c = sa.parse_coeff(coeff)
    if c == "mean" and not latent_means:
        raise ParameterError("coeff", "'mean' needs the latents' mean activations (latent_means=, --latent-file)")
    opt.check_positive(batch_size, param="batch_size")
    opt.check_positive(random, param="random", minimum=0)
    measure_list = tuple(opt.parse_groups(measures, param="measures") or sa.MEASURES)
    lm = as_model(
        model,
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        cluster=cluster,
    )
    sa.check_model(the_sae, lm.hidden_size, lm.n_layers)
    steer_at = sa.resolve_layer(the_sae, layer, lm.n_layers)
    cfg = sa.AttentionConfig(
        latent=latent,
        layer=steer_at,
        coeff=c,
        direction=direction,
        ablate=tuple(int(a) for a in ablate),
        pos_type=pos,
        measures=measure_list,
        ovw_norm=ovw_norm,
        heads=sa.parse_heads(heads, lm.n_layers, lm.n_heads, steer_at),
        expect=expect,
        n_random=random,
        random_candidates=None if random_candidates is None else [int(x) for x in random_candidates],
        seed=seed,
        alpha=alpha,
        batch_size=batch_size,
        bos=bos,
        attn_impl=attn,
        latent_means=dict(latent_means or {}),
    )
    ck = None if checkpoint_dir is None else Path(checkpoint_dir)
    return sa.run_attention(
        lm,
        the_sae,
        items,
        cfg,
        checkpoint_dir=ck,
        progress=progress,
        cluster=cluster,
        load=ray_load(device, device_map, max_memory),
    )


def train_sae(
    model: Any = DEFAULT_MODEL,
    *,
    layer: int = 9,
    out: str | Path | None = None,
    entity_text: int = 500,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    progress: Progress | None = None,
    **train_options: Any,
) -> tuple[Any, dict[str, Any]]:
    """Train an SAE on resid_post of `layer` on offline text (`plipy sae train`); returns (SAE, training report).
    `train_options` are `plipy.sae.train.TrainConfig` fields (arch, width, k, lr, n_tokens, epochs, …)."""
    from plipy.sae import train as st

    try:
        cfg = st.TrainConfig(**train_options)
    except TypeError as e:
        raise ParameterError("train_options", str(e)) from None
    cfg.check()
    lm = as_model(model, dtype=dtype, device=device, tokenizer=tokenizer)
    docs: list[str] = []
    if entity_text > 0:
        from plipy import entities

        docs = st.entity_sentences(entities.load_entities(limit=entity_text), seed=cfg.seed)
    return st.train_on_model(lm, layer, cfg, out, extra_documents=docs, progress=progress)


def score_latents(
    model: Any,
    sae: Any,
    labels: Any,
    *,
    split: str = "train",
    general_filter: bool = True,
    general_tokens: int = 4096,
    max_general_freq: float = 0.02,
    top: int = 20,
    batch_size: int = 32,
    hook: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score every SAE latent on known vs unknown entities (`plipy sae latents`); returns the latent document."""
    from plipy import entities
    from plipy.sae import latents as sl

    opt.check_choice(split, ("train", "all"), param="split")
    doc = entities.read_labels(labels) if isinstance(labels, (str, Path)) else labels
    the_sae = as_sae(sae, hook=hook)
    lm = as_model(model, dtype=dtype, device=device, tokenizer=tokenizer)
    return sl.run_latents(
        lm,
        the_sae,
        doc,
        split=None if split == "all" else split,
        general_filter=general_filter,
        general_tokens=general_tokens,
        max_general_freq=max_general_freq,
        top_n=top,
        batch_size=opt.check_positive(batch_size, param="batch_size"),
        progress=progress,
    )


def sae_pipeline(
    model: Any = DEFAULT_MODEL,
    out: str | Path | None = None,
    *,
    quick: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Data → labels → SAE → latents → attention analysis in one resumable folder (`plipy sae pipeline`);
    `overrides` are `PipelineConfig` fields (label_limit, layer, coeff, n_random, …)."""
    from dataclasses import fields, replace

    from plipy.sae import pipeline as sp

    cfg = sp.profile("quick" if quick else "default")
    unknown = sorted(set(overrides) - {f.name for f in fields(cfg)})
    if unknown:
        raise ParameterError(unknown[0], "is not a pipeline setting")
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    lm = as_model(model, dtype=dtype, device=device, tokenizer=tokenizer)
    name = f"sae-pipeline-{lm.name}" + ("-quick" if quick else "")
    folder = Path(out) if out is not None else Path("results") / name
    return sp.run_pipeline(lm, folder, cfg, progress=progress, log=log)
