"""`plipy.sae_attention` and the SAE workflows: training, latent scores, the pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, Front
from plipy.corpus.prompts import EntityPrompt
from plipy.errors import ParameterError, PlipyError
from plipy.results import SaeAttentionResult
from plipy.runtime.experiment import Progress
from plipy.sae.inputs import TEMPLATE
from plipy.sae.model import SAE

EXPECT = ("auto", "increase", "decrease", "two-sided")


def as_sae(sae: Any, *, hook: str | None = None, release: str | None = None, sae_id: str | None = None) -> SAE:
    """An `SAE` from a path (SAELens folder, params.npz), an `SAE`, or (sae None) a SAELens `release` and
    `sae_id` (needs plipy[saelens]); `hook` overrides the SAE's hook."""
    from plipy.sae import load_sae, load_saelens_release, parse_hook

    if sae is not None and (release or sae_id):
        raise ParameterError("sae_release", "give an SAE path or a SAELens release and id, not both")
    if sae is None and (release or sae_id):
        if not (release and sae_id):
            raise ParameterError("sae_id" if release else "sae_release", "a SAELens SAE needs its release and id")
        loaded = load_saelens_release(release, sae_id)
    elif isinstance(sae, SAE):
        loaded = sae
    elif isinstance(sae, (str, Path)):
        return load_sae(sae, hook_name=hook)
    elif sae is None:
        raise ParameterError("sae", "give an SAE: a SAELens folder, a params.npz, an SAE, or a SAELens release and id")
    else:
        raise ParameterError("sae", f"expected an SAE or a path, got {type(sae).__name__}")
    if hook is not None:
        parse_hook(hook, loaded.source)
        loaded.hook_name = hook
    return loaded


def as_prompts(prompts: Any, *, template: str | None = None) -> list[EntityPrompt]:
    """Entity prompts from a JSONL/JSON path, a list of `EntityPrompt`s or a list of dicts
    (`{prompt, entity, entity_type, label}`; rows without `prompt` use the template × base relations)."""
    from plipy.sae import inputs as si

    tmpl = template or TEMPLATE
    if isinstance(prompts, (str, Path)):
        items = si.load_prompts(prompts, template=tmpl)
    elif isinstance(prompts, Sequence) and all(isinstance(p, EntityPrompt) for p in prompts):
        items = list(prompts)
    elif isinstance(prompts, Sequence) and all(isinstance(p, dict) for p in prompts):
        items = si.prompts_from_rows(list(prompts), template=tmpl, where="prompts")
    else:
        raise ParameterError("prompts", "expected a path, EntityPrompts or dicts {prompt, entity, entity_type, label}")
    return check_prompts(items)


def check_prompts(items: list[EntityPrompt]) -> list[EntityPrompt]:
    """Prompts that can be analysed: some, each containing its entity (said before any model loads)."""
    for i, p in enumerate(items):
        if not p.entity or p.entity not in p.prompt:
            raise ParameterError("prompts", f"prompt {i}: entity {p.entity!r} not found in {p.prompt!r}")
    if not items:
        raise ParameterError("prompts", "no prompts to analyse")
    return items


def collect_prompts(
    prompts: Any,
    entities: Any,
    *,
    entity_type: str | None,
    label: str | None,
    template: str,
    labels: Any,
    limit: int | None,
) -> list[EntityPrompt]:
    """The prompts of `prompts` (a file or rows) and of an `entities` list (a file, one per line or a JSON list, or
    names; expanded with the template × base relations), filtered by `labels`, the first `limit` per (type, label)."""
    from plipy.sae import inputs as si

    if prompts is None and entities is None:
        raise ParameterError("prompts", "nothing to analyse: give prompts and/or an entity list")
    if limit is not None:
        opt.check_positive(limit, param="limit")
    items = [] if prompts is None else as_prompts(prompts, template=template)
    if entities is not None:
        if not entity_type:
            raise ParameterError("entity_type", "an entity list needs its entity type")
        if isinstance(entities, (str, Path)):
            rows = si.load_entity_list(entities, entity_type, label)
        else:
            rows = [{"entity": str(n), "entity_type": entity_type, "label": label} for n in entities]
        items += si.template_prompts(rows, template=template)
    kept = si.select_prompts(items, opt.parse_groups(labels, param="labels"), limit)
    if not kept:
        raise ParameterError("labels" if labels else "prompts", "no prompts left to analyse")
    return check_prompts(kept)


def _latents(value: Any, sae: SAE, param: str) -> list[int]:
    """Latent indices of `sae` from a list or "3,7" (each in range)."""
    if value is None or (not isinstance(value, str) and len(value) == 0):
        return []
    try:
        out = [int(v) for v in (opt.parse_groups(value, param=param) or [])]
    except ValueError:
        raise ParameterError(param, f"expected latent indices, got {value!r}") from None
    for v in out:
        try:
            sae.check_latent(v)
        except PlipyError as e:
            raise ParameterError(param, str(e)) from None
    return out


def _random_candidates(value: Any, sae: SAE, layer: int) -> list[int] | None:
    """Candidate latents from a list or a file (`plipy.sae.inputs.read_candidates`, latents of `layer`)."""
    from plipy.sae.inputs import read_candidates

    if value is None:
        return None
    cands = read_candidates(value, layer=layer) if isinstance(value, (str, Path)) else [int(x) for x in value]
    return _latents([str(c) for c in cands], sae, "random_candidates") if cands else []


def _latent_means(value: Any, layer: int) -> dict[int, float]:
    """Mean activations per latent from a dict or a latent file (`plipy.sae.inputs.read_latent_means`)."""
    from plipy.sae.inputs import read_latent_means

    if value is None:
        return {}
    if isinstance(value, (str, Path)):
        return read_latent_means(value, layer=layer)
    return {int(k): float(v) for k, v in dict(value).items()}


def _check_analysis(
    *,
    measures: Any,
    pos: str,
    direction: str,
    ovw_norm: str,
    expect: str,
    attn: str,
    random: int,
    seed: int,
    alpha: float,
) -> tuple[str, ...]:
    """The analysis' own settings, each checked (the measures come back as a tuple)."""
    from plipy.sae.inputs import POS_TYPES
    from plipy.sae.measures import MEASURES

    chosen = tuple(opt.parse_groups(measures, param="measures") or MEASURES)
    bad = [m for m in chosen if m not in MEASURES]
    if bad:
        raise ParameterError("measures", f"unknown measure(s) {', '.join(bad)}: choose from {', '.join(MEASURES)}")
    opt.check_choice(pos, POS_TYPES, param="pos")
    opt.check_choice(direction, ("decoder", "encoder"), param="direction")
    opt.check_choice(ovw_norm, ("l1", "l2"), param="ovw_norm")
    opt.check_choice(expect, EXPECT, param="expect")
    opt.check_choice(attn, ("eager", "sdpa"), param="attn")
    opt.check_positive(random, param="random", minimum=0)
    opt.check_seed(seed)
    opt.check_alpha(alpha)
    return chosen


def sae_attention(
    model: Any,
    sae: Any,
    latent: int,
    prompts: Any = None,
    *,
    entities: Any = None,
    entity_type: str | None = None,
    label: str | None = None,
    template: str = TEMPLATE,
    labels: Any = None,
    limit: int | None = None,
    sae_release: str | None = None,
    sae_id: str | None = None,
    layer: int | None = None,
    hook: str | None = None,
    coeff: Any = 100.0,
    latent_means: Any = None,
    direction: str = "decoder",
    ablate: Any = (),
    pos: str = "entity_last",
    measures: Any = None,
    ovw_norm: str = "l1",
    heads: Any = None,
    expect: str = "auto",
    random: int = 10,
    random_candidates: Any = None,
    seed: int = 42,
    alpha: float = 0.05,
    batch_size: int | None = None,
    bos: bool = True,
    attn: str = "eager",
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    device_map: Any = None,
    max_memory: Any = None,
    resume: bool = True,
    fresh: bool = False,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> SaeAttentionResult:
    """Steer with an SAE latent at the entity and measure, per layer and head, how attention from the last position
    to the steered tokens changes, against `random` random latents (`plipy sae attention`).

    `sae`: a path, an `SAE`, or None with `sae_release`/`sae_id`. Prompts come from `prompts` (a JSONL/JSON file or
    rows) and/or `entities` (a list file or names, with `entity_type`, `label`, expanded with `template`).
    `latent_means` (a dict or a latent file) scales `coeff="mean"`; `random_candidates` is a list or a file.
    `batch_size`: prompts per forward (None: 16). `resume`/`fresh`/`ray`/`workers` as in `scan`."""
    from plipy.experiments.sae_attention import SaeAttention, pick_random_latents
    from plipy.sae import check_model, parse_coeff, resolve_layer

    front = Front.check(
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        resume=resume,
        fresh=fresh,
        batch_size=batch_size,
        ray=ray,
        workers=workers,
        progress=progress,
    )
    chosen = _check_analysis(
        measures=measures,
        pos=pos,
        direction=direction,
        ovw_norm=ovw_norm,
        expect=expect,
        attn=attn,
        random=random,
        seed=seed,
        alpha=alpha,
    )
    c = parse_coeff(coeff)
    items = collect_prompts(
        prompts, entities, entity_type=entity_type, label=label, template=template, labels=labels, limit=limit
    )
    the_sae = as_sae(sae, hook=hook, release=sae_release, sae_id=sae_id)
    (top,) = _latents([latent], the_sae, "latent")
    ablated = _latents(ablate, the_sae, "ablate")
    steer_at = resolve_layer(the_sae, layer)  # the hook or `layer`: its bounds need the model
    opt.check_layer_heads(heads, first=steer_at)
    cands = _random_candidates(random_candidates, the_sae, steer_at)
    means = _latent_means(latent_means, steer_at)
    randoms = pick_random_latents(the_sae, top, ablated, random, cands, seed)
    missing = [lat for lat in (top, *randoms) if lat not in means] if c == "mean" else []
    if missing:
        raise ParameterError(
            "latent_means",
            f"coefficient 'mean' scales each latent by its mean: no mean activation for latent(s) {missing}",
        )
    lm = front.model(model)
    check_model(the_sae, lm.hidden_size, lm.n_layers)
    resolve_layer(the_sae, steer_at, lm.n_layers)
    experiment = SaeAttention(
        the_sae,
        items,
        top,
        steer_at,
        coeff=c,
        direction=direction,
        ablate=tuple(ablated),
        pos_type=pos,
        measures=chosen,
        ovw_norm=ovw_norm,
        heads=opt.parse_layer_heads(heads, lm.n_layers, lm.n_heads, first=steer_at),
        expect=expect,
        n_random=random,
        random_candidates=cands,
        seed=seed,
        alpha=alpha,
        bos=bos,
        attn_impl=attn,
        latent_means=means,
    )
    return front.execute(experiment, lm)


def train_sae(
    model: Any = DEFAULT_MODEL,
    *,
    layer: int = 9,
    out: str | Path | bool | None = None,
    entity_text: int = 500,
    batch_size: int = 16,
    train_batch: int = 512,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    progress: Progress | None = None,
    **train_options: Any,
) -> tuple[SAE, dict[str, Any]]:
    """Train an SAE on resid_post of `layer` on offline text (`plipy sae train`); returns (SAE, training report),
    written to the folder `out` when given (SAELens format + training.json; True: saes/<model>-L<layer>-<arch>).
    `batch_size`: text sequences per model forward; `train_batch`: activations per
    optimiser step; `train_options` are the other `plipy.workflows.sae_train.TrainConfig` fields (arch, width, k,
    lr, n_tokens, epochs, seq_len, seed, …)."""
    from plipy.workflows import sae_train as st

    opt.check_positive(batch_size, param="batch_size")
    opt.check_positive(train_batch, param="train_batch")
    opt.check_positive(layer, param="layer", minimum=0)
    opt.check_positive(entity_text, param="entity_text", minimum=0)
    for name in ("batch_size", "model_batch"):
        if name in train_options:
            raise ParameterError(name, "is set by batch_size (sequences per forward) and train_batch (per step)")
    try:
        cfg = st.TrainConfig(**train_options, batch_size=train_batch, model_batch=batch_size)
    except TypeError as e:
        raise ParameterError("train_options", str(e)) from None
    cfg.check()
    opt.check_seed(cfg.seed)
    lm = Front.check(dtype=dtype, device=device, tokenizer=tokenizer).model(model)
    folder = Path("saes") / f"{lm.name}-L{layer}-{cfg.arch}" if out is True else (out or None)
    docs: list[str] = []
    if entity_text > 0:
        from plipy import entities

        docs = st.entity_sentences(entities.load_entities(limit=entity_text), seed=cfg.seed)
    return st.train_on_model(lm, layer, cfg, folder, extra_documents=docs, progress=progress)


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
    """Score every SAE latent on known vs unknown entities (`plipy sae latents`); returns the latent document
    (`plipy.workflows.sae_latents.write_latents` writes it). `labels`: a labels file or document."""
    from plipy import entities
    from plipy.workflows import sae_latents as sl

    opt.check_choice(split, ("train", "all"), param="split")
    opt.check_positive(batch_size, param="batch_size")
    opt.check_positive(top, param="top")
    opt.check_positive(general_tokens, param="general_tokens")
    if not 0 < max_general_freq <= 1:
        raise ParameterError("max_general_freq", f"must be a frequency in (0, 1], got {max_general_freq!r}")
    doc = entities.read_labels(labels) if isinstance(labels, (str, Path)) else labels
    the_sae = as_sae(sae, hook=hook)
    lm = Front.check(dtype=dtype, device=device, tokenizer=tokenizer).model(model)
    return sl.run_latents(
        lm,
        the_sae,
        doc,
        split=None if split == "all" else split,
        general_filter=general_filter,
        general_tokens=general_tokens,
        max_general_freq=max_general_freq,
        top_n=top,
        batch_size=batch_size,
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
    `overrides` are `PipelineConfig` fields (label_limit, layer, coeff, n_random, …); None keeps the profile's."""
    from dataclasses import fields, replace

    from plipy.sae import parse_coeff
    from plipy.workflows import sae_pipeline as sp

    cfg = sp.profile("quick" if quick else "default")
    unknown = sorted(set(overrides) - {f.name for f in fields(cfg)})
    if unknown:
        raise ParameterError(unknown[0], "is not a pipeline setting")
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    # checked now, not after labelling and training
    parse_coeff(cfg.coeff)
    opt.check_positive(cfg.layer, param="layer", minimum=0)
    opt.check_positive(cfg.n_random, param="n_random", minimum=0)
    if cfg.label_limit is not None:
        opt.check_positive(cfg.label_limit, param="label_limit", minimum=0)  # 0: every entity
    cfg.sae.check()
    lm = Front.check(dtype=dtype, device=device, tokenizer=tokenizer).model(model)
    if not cfg.layer < lm.n_layers - 1:
        raise ParameterError("layer", f"must be in 0..{lm.n_layers - 2}: its latents steer at the next layer's input")
    name = f"sae-pipeline-{lm.name}" + ("-quick" if quick else "")
    folder = Path(out) if out is not None else Path("results") / name
    return sp.run_pipeline(lm, folder, cfg, progress=progress, log=log)
