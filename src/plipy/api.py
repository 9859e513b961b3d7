"""The Python API: one function per experiment, the same options as the CLI flags, typed results.

    import plipy
    r = plipy.scan("smollm2-135m", layers="0-2")        # ScanResult
    k = plipy.knockout("smollm2-135m", layer=14)         # KnockoutResult
    d = plipy.steer.dose("smollm2-135m", layer=16)       # DoseResult
    s = plipy.sae_attention("smollm2-135m", "saes/L9", latent=12, prompts="prompts.jsonl")

`model` is a spec (alias, local dir, .gguf file, hub id), a `LoadedModel` from `plipy.load_model`, or a loaded HF
causal LM with `tokenizer=`. `corpus` is a path, a `Corpus` or None (the bundled PLIP corpus). `layers`/`heads`
take ints, lists or the CLI grammar (`all | plip | A-B | a,b,c`). `progress` is `start(description, total) ->
step()`; `runner` is "auto" | "fast" | "naive" or a `ConditionRunner` to reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.errors import ParameterError, PlipyError
from plipy.results import EmergenceResult, KnockoutResult, LensResult, ProbeResult, SaeAttentionResult, ScanResult

Progress = Callable[[str, int], Callable[..., None]]
DEFAULT_MODEL = "smollm2-135m"
KNOCKOUT_MODES = ("layer", "layers", "scan-layers", "scan-windows", "slide-window")


def as_model(
    model: Any = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    device_map: Any = None,
    max_memory: Any = None,
    cluster: Any = None,
) -> Any:
    """A `LoadedModel` from a spec, a `LoadedModel`, or a loaded HF causal LM (with its `tokenizer`).
    `device_map`/`max_memory` spread a big model over devices (accelerate's strategies or a module → device dict).
    With a Ray `cluster` a spec loads without weights: the workers compute (`plipy.cluster.pool.driver_model`)."""
    from plipy.models import LoadedModel, load_model, wrap_model

    if isinstance(model, LoadedModel):
        return model
    if cluster is not None and isinstance(model, (str, Path)):
        from plipy.cluster.pool import driver_model

        return driver_model(
            str(model),
            dtype,
            device,
            cluster,
            {"device_map": opt.parse_device_map(device_map), "max_memory": opt.parse_max_memory(max_memory)},
        )
    if isinstance(model, (str, Path)):
        return load_model(
            str(model),
            dtype=dtype,
            device=device,
            device_map=opt.parse_device_map(device_map),
            max_memory=opt.parse_max_memory(max_memory),
        )
    if hasattr(model, "config") and hasattr(model, "forward"):
        if tokenizer is None:
            raise ParameterError("tokenizer", "a loaded HF model needs its tokenizer: pass tokenizer=")
        return wrap_model(model, tokenizer)
    raise ParameterError("model", f"expected a model spec, a LoadedModel or an HF model, got {type(model).__name__}")


def as_corpus(corpus: Any = None, *, offsets: str = "chars") -> Any:
    """A `Corpus` from None (bundled), a path or a `Corpus`."""
    from plipy.corpus import Corpus, load_corpus

    if isinstance(corpus, Corpus):
        return corpus
    if corpus is None or isinstance(corpus, (str, Path)):
        return load_corpus(corpus, offsets=opt.check_choice(offsets, ("chars", "bytes"), param="offsets"))
    raise ParameterError("corpus", f"expected a path, a Corpus or None, got {type(corpus).__name__}")


def _runner(runner: Any, condition_batch: int) -> tuple[Any, str]:
    """(a ConditionRunner or None, the path name) from `runner=`."""
    from plipy.engine.runner import ConditionRunner

    if isinstance(runner, ConditionRunner):
        return runner, runner.path
    opt.check_choice(runner, ("auto", "fast", "naive"), param="runner")
    opt.check_positive(condition_batch, param="condition_batch")
    return None, runner


def check_cluster(ray: Any, workers: int | None) -> Any:
    """`ray=`/`workers=` checked (and Ray importable) before any model loads; None for a local run."""
    from plipy.cluster import pool

    cluster = pool.as_cluster(ray, workers)
    return None if cluster is None else pool.check(cluster)


def ray_load(device: str, device_map: Any, max_memory: Any) -> dict[str, Any]:
    """How Ray workers load the model: the caller's device choice and memory map (dtype: the driver's)."""
    return {
        "device": device,
        "device_map": opt.parse_device_map(device_map),
        "max_memory": opt.parse_max_memory(max_memory),
    }


# ---------------------------------------------------------------------------------------------- scan


def scan(
    model: Any = DEFAULT_MODEL,
    corpus: Any = None,
    *,
    groups: Any = None,
    layers: Any = "all",
    heads: Any = "all",
    bos: bool = False,
    offsets: str = "chars",
    seed: int = 0,
    resamples: int = 10000,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    resume: bool = True,
    fresh: bool = False,
    batch_size: int | None = None,
    device_map: Any = None,
    max_memory: Any = None,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> ScanResult:
    """Marker → target attention of every sample at every layer and head, beside the uniform and token-0 nulls,
    with full statistics (`plipy scan`). `resume`: finished samples are kept until the result is complete, so
    the same call after an interruption goes on where it stopped (`fresh=True` starts over). `batch_size`:
    samples per left-padded forward (None: 16 on CPU, 64 on GPU). `ray`: True (a local Ray instance or
    $RAY_ADDRESS) or an address runs the batches on `workers` Ray actors (`plipy.cluster`); same result."""
    from plipy.experiments import scan as sc

    opt.check_positive(resamples, param="resamples")
    opt.check_batch_size(batch_size)
    cluster = check_cluster(ray, workers)
    corp = as_corpus(corpus, offsets=offsets)
    group_list = opt.parse_groups(groups)
    sc.choose_groups(corp, group_list)  # bad groups fail before the model loads
    lm = as_model(
        model,
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        cluster=cluster,
    )
    cfg = sc.ScanConfig(
        groups=group_list,
        layers=opt.parse_layers(layers, lm.n_layers),
        heads=opt.parse_heads(heads, lm.n_heads),
        bos=bos,
        seed=seed,
        n_resamples=resamples,
        extra={"offsets": offsets},
        resume=resume,
        fresh=fresh,
        batch_size=batch_size,
    )
    return sc.run_scan(lm, corp, cfg, progress=progress, cluster=cluster, load=ray_load(device, device_map, max_memory))


# ---------------------------------------------------------------------------------------------- knockout


def knockout_mode(
    *,
    layer: Any = None,
    layers: Any = None,
    scan_layers: bool = False,
    scan_windows: bool = False,
    slide_window: int | None = None,
    center: int | None = None,
    max_radius: int | None = None,
) -> str:
    """Which knockout mode the options ask for (one at most; default: PLIP's single layer)."""
    chosen = [
        name
        for name, on in (
            ("layer", layer is not None),
            ("layers", layers is not None),
            ("scan-layers", scan_layers),
            ("scan-windows", scan_windows),
            ("slide-window", slide_window is not None),
        )
        if on
    ]
    if len(chosen) > 1:
        raise ParameterError("mode", f"choose one mode, got {', '.join(c.replace('-', '_') for c in chosen)}")
    mode = chosen[0] if chosen else "layer"
    if (center is not None or max_radius is not None) and mode != "scan-windows":
        raise ParameterError("center", "center and max_radius only apply to scan_windows")
    return mode


def knockout(
    model: Any = DEFAULT_MODEL,
    corpus: Any = None,
    *,
    layer: int | None = None,
    layers: Any = None,
    scan_layers: bool = False,
    scan_windows: bool = False,
    center: int | None = None,
    max_radius: int | None = None,
    slide_window: int | None = None,
    edges: str = "marker-to-targets",
    heads: Any = "all",
    groups: Any = None,
    include_baselines: bool = False,
    bos: bool = False,
    offsets: str = "chars",
    seed: int = 0,
    resamples: int = 10000,
    condition_batch: int = 32,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    runner: Any = "auto",
    resume: bool = True,
    fresh: bool = False,
    batch_size: int | None = None,
    device_map: Any = None,
    max_memory: Any = None,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> KnockoutResult:
    """Remove attention edges (marker → targets by default) in one layer, a set, each layer alone, or windows,
    and measure the next-token KL on every sample (`plipy knockout`). `resume`/`fresh`/`batch_size` (baselines per
    forward) and `ray`/`workers` as in `scan`."""
    from plipy.experiments import knockout as ko
    from plipy.experiments import scan as sc

    opt.check_choice(edges, ko.EDGE_KINDS, param="edges")
    opt.check_positive(resamples, param="resamples")
    opt.check_batch_size(batch_size)
    cluster = check_cluster(ray, workers)
    mode = knockout_mode(
        layer=layer,
        layers=layers,
        scan_layers=scan_layers,
        scan_windows=scan_windows,
        slide_window=slide_window,
        center=center,
        max_radius=max_radius,
    )
    corp = as_corpus(corpus, offsets=offsets)
    group_list = opt.parse_groups(groups)
    sc.choose_groups(corp, group_list)
    lm = as_model(
        model,
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        cluster=cluster,
    )
    the_runner, path = _runner(runner, condition_batch)
    conditions = ko.build_conditions(
        mode, lm.n_layers, layer=layer, layers=layers, center=center, max_radius=max_radius, window=slide_window
    )
    cfg = ko.KnockoutConfig(
        conditions=conditions,
        mode=mode,
        edges=edges,
        heads=opt.parse_heads(heads, lm.n_heads),
        groups=group_list,
        include_baselines=include_baselines,
        bos=bos,
        seed=seed,
        n_resamples=resamples,
        path=path,
        max_batch=condition_batch,
        extra={"offsets": offsets},
        resume=resume,
        fresh=fresh,
        batch_size=batch_size,
    )
    return ko.run_knockout(
        lm,
        corp,
        cfg,
        progress=progress,
        runner=the_runner,
        cluster=cluster,
        load=ray_load(device, device_map, max_memory),
    )


# ---------------------------------------------------------------------------------------------- logit lens


def lens(
    model: Any = DEFAULT_MODEL,
    text: str | None = None,
    *,
    sample: str | None = None,
    corpus: Any = None,
    positions: Any = "last",
    top_k: int = 10,
    tokens: Any = (),
    layers: Any = "all",
    bos: bool = False,
    offsets: str = "chars",
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    progress: Progress | None = None,
) -> LensResult:
    """The logit lens (`plipy lens`): per layer, the residual after that decoder layer at `positions` ("last",
    "all", "marker", token indices) through the model's own final norm and unembedding; the top-k tokens and the
    rank of `tokens` (ids or single-token strings), the final top-1 and the next token, per layer. Give `text`, or
    `sample` (an id of `corpus`, which also allows positions="marker")."""
    from plipy.experiments import lens as le

    if (text is None) == (sample is None):
        raise ParameterError("text", "give a text or a corpus sample (sample=…), not both or neither")
    opt.check_positive(top_k, param="top_k")
    tokens = [tokens] if isinstance(tokens, (str, int)) else list(tokens or ())
    if sample is None and isinstance(positions, str) and positions.strip() == "marker":
        raise ParameterError("positions", "'marker' needs a corpus sample (sample=…, --sample)")
    source: dict[str, Any] = {"kind": "text"}
    if sample is not None:
        corp = as_corpus(corpus, offsets=offsets)
        smp = corp.sample(sample)
        text, source = (
            smp.code,
            {
                "kind": "corpus-sample",
                "sample": smp.id,
                "group": smp.group,
                "corpus": str(corp.path),
                "corpus_sha256": corp.sha256,
            },
        )
    elif not isinstance(text, str) or not text:
        raise ParameterError("text", "is empty: nothing to put through the lens")
    lm = as_model(model, dtype=dtype, device=device, tokenizer=tokenizer)
    marker = None
    if sample is not None:
        from plipy.corpus import token_positions

        marker = token_positions(smp, lm.tokenizer, bos=bos).marker_token
        source["marker_token"] = marker
    cfg = le.LensConfig(
        positions=positions, top_k=top_k, tokens=tokens, layers=opt.parse_layers(layers, lm.n_layers), bos=bos
    )
    return le.run_lens(lm, text, cfg, marker=marker, source=source, progress=progress)


def emergence(
    model: Any = DEFAULT_MODEL,
    prompts: Any = None,
    *,
    top_k: int = 100,
    layers: Any = "all",
    bos: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    progress: Progress | None = None,
) -> EmergenceResult:
    """Test-marker emergence (`plipy lens emergence`, PLIP-rs' test_emergence): per prompt and expected string, the
    first layer where a token containing it enters the lens' top-k. `prompts`: None (PLIP-rs' built-in set), a
    JSON / JSON Lines path, or a list of `{id, prompt, expect: [str, …], language?}`."""
    from plipy.experiments import emergence as em

    opt.check_positive(top_k, param="top_k")
    if prompts is None or isinstance(prompts, (str, Path)):
        items, source = em.load_prompts(prompts)
    else:
        items, source = em.check_prompts(list(prompts), "prompts"), "in-memory"
    lm = as_model(model, dtype=dtype, device=device, tokenizer=tokenizer)
    cfg = em.EmergenceConfig(top_k=top_k, layers=opt.parse_layers(layers, lm.n_layers), bos=bos)
    return em.run_emergence(lm, items, cfg, source=source, progress=progress)


def probe(
    model: Any = DEFAULT_MODEL,
    data: Any = None,
    *,
    groups: Any = None,
    label: str = "group",
    feature: str = "last",
    layers: Any = "all",
    folds: int = 5,
    permutations: int = 20,
    C: float = 1.0,
    seed: int = 0,
    bos: bool = False,
    offsets: str = "chars",
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    progress: Progress | None = None,
) -> ProbeResult:
    """Linear probes (`plipy probe`): per layer, logistic regression on the residual after that layer at the
    `feature` token ("last" or "marker") classifying each sample's label; stratified k-fold accuracy beside a
    shuffled-label control (`permutations` refits) and the majority baseline. `data`: a corpus (None = bundled; its
    groups, or their prefix with label="prefix": python_doctest → python) or labelled snippets
    (`{"samples": [{"code", "label"}]}`, JSON Lines)."""
    from plipy.experiments import probe as pr

    opt.check_choice(feature, pr.FEATURES, param="feature")
    opt.check_positive(permutations, param="permutations", minimum=0)
    opt.check_positive(folds, param="folds", minimum=2)
    if not isinstance(C, (int, float)) or isinstance(C, bool) or not C > 0:
        raise ParameterError("C", f"must be a positive number, got {C!r}")
    d = pr.load_data(data, groups=opt.parse_groups(groups), label_by=label, offsets=offsets)
    if feature == "marker" and any(it.marker_char is None for it in d.items):
        raise ParameterError("feature", "'marker' needs a corpus with marker positions (labelled snippets have none)")
    pr.check_classes([it.label for it in d.items], folds)  # before the model loads
    lm = as_model(model, dtype=dtype, device=device, tokenizer=tokenizer)
    cfg = pr.ProbeConfig(
        feature=feature,
        layers=opt.parse_layers(layers, lm.n_layers),
        folds=folds,
        permutations=permutations,
        C=float(C),
        seed=seed,
        bos=bos,
    )
    return pr.run_probe(lm, d, cfg, progress=progress)


# ---------------------------------------------------------------------------------------------- SAE attention


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


# ---------------------------------------------------------------------------------------------- entities and SAEs


def label_entities(
    model: Any = DEFAULT_MODEL,
    *,
    types: Any = None,
    limit: int | None = None,
    k: int | None = None,
    max_new_tokens: int | None = None,
    seed: int = 42,
    batch_size: int = 32,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Ask the model each entity's attribute queries, grade the answers, label entities known/unknown
    (`plipy entities label`); returns the labels document. `ray`/`workers`: the query shards on Ray workers."""
    from plipy.entities.build import check_types
    from plipy.entities.label import PROFILES
    from plipy.entities.label import label_entities as run

    chosen = check_types(opt.parse_groups(types, param="types"))
    prof = PROFILES["quick" if quick else "pipeline"]
    lim = prof["limit"] if limit is None else (limit or None)
    opt.check_positive(batch_size, param="batch_size")
    cluster = check_cluster(ray, workers)
    lm = as_model(model, dtype=dtype, device=device, tokenizer=tokenizer, cluster=cluster)
    return run(
        lm,
        types=chosen,
        limit=lim,
        k=prof["k"] if k is None else k,
        seed=seed,
        max_new_tokens=prof["max_new_tokens"] if max_new_tokens is None else max_new_tokens,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
        use_cache=cache,
        cluster=cluster,
        load=ray_load(device, None, None),
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


__all__ = [
    "as_model",
    "as_corpus",
    "as_sae",
    "as_prompts",
    "scan",
    "knockout",
    "lens",
    "emergence",
    "probe",
    "sae_attention",
    "label_entities",
    "train_sae",
    "score_latents",
    "sae_pipeline",
    "PlipyError",
]


# ---------------------------------------------------------------------------------------------- sweep


def sweep(models: Any, experiment: str = "scan", *, out_dir: str | Path | None = None, **options: Any) -> Any:
    """One experiment (`scan` or `knockout`, with its own keyword options, `ray=`/`workers=` included) on each of
    `models` in turn, and the comparison table (`plipy sweep`): a `SweepResult`. With `out_dir` each model's result
    and the sweep are saved there (`<experiment>-<model>.json`, `sweep-<experiment>.json`)."""
    import inspect

    from plipy.cluster import sweep as sw

    opt.check_choice(experiment, sw.EXPERIMENTS, param="experiment")
    specs = [str(m) for m in models] if isinstance(models, (list, tuple)) else opt.parse_groups(models, param="models")
    if not specs:
        raise ParameterError("models", "give at least one model")
    run = {"scan": scan, "knockout": knockout}[experiment]
    try:
        inspect.signature(run).bind("model", **options)  # an unknown option fails before any model loads
    except TypeError as e:
        raise ParameterError("options", f"{experiment}: {e}") from None
    check_cluster(options.get("ray"), options.get("workers"))
    entries, docs = [], []
    for spec, name in zip(specs, sw.file_names(specs), strict=True):
        r = run(spec, **options)
        entry = {"spec": spec}
        if out_dir is not None:
            entry["file"] = r.save(Path(out_dir) / f"{experiment}-{name}.json")["json"]
        entries.append(entry)
        docs.append(r.to_dict())
    plain = {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    result = sw.build(experiment, entries, docs, {"options": plain})
    if out_dir is not None:
        result.save(Path(out_dir) / f"sweep-{experiment}.json")
    return result
