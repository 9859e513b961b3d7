"""`plipy.lens`, `plipy.emergence`, `plipy.probe`: what the residual stream says, layer by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, Front, as_corpus
from plipy.errors import ParameterError
from plipy.results import EmergenceResult, LensResult, ProbeResult
from plipy.runtime.experiment import Progress


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
    resume: bool = True,
    fresh: bool = False,
    device_map: Any = None,
    max_memory: Any = None,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> LensResult:
    """The logit lens (`plipy lens`): per layer, the residual after that decoder layer at `positions` ("last",
    "all", "marker", token indices) through the model's own final norm and unembedding; the top-k tokens and the
    rank of `tokens` (ids or single-token strings), the final top-1 and the next token, per layer. Give `text`, or
    `sample` (an id of `corpus`, which also allows positions="marker"). One forward; `resume`: finished layers are
    kept until the result is complete (`fresh=True` starts over); `ray`: the layers run on `workers` Ray actors,
    each running the forward once; same result. No `batch_size`: there is one input."""
    from plipy.experiments.lens import Lens

    front = Front.check(
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        resume=resume,
        fresh=fresh,
        ray=ray,
        workers=workers,
        progress=progress,
    )
    if (text is None) == (sample is None):
        raise ParameterError("text", "give a text or a corpus sample (sample=…), not both or neither")
    opt.check_top_k(top_k)
    tokens = opt.check_tokens(tokens)
    opt.check_positions(positions, marker=sample is not None)
    opt.check_selection(layers, param="layers")
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
    lm = front.model(model)
    opt.check_top_k(top_k, vocab_size=lm.vocab_size)
    marker = None
    if sample is not None:
        from plipy.corpus import token_positions

        marker = token_positions(smp, lm.tokenizer, bos=bos).marker_token
        source["marker_token"] = marker
    experiment = Lens(
        text,
        positions=positions,
        top_k=top_k,
        tokens=tokens,
        layers=opt.parse_layers(layers, lm.n_layers),
        bos=bos,
        marker=marker,
        source=source,
    )
    return front.execute(experiment, lm)


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
    resume: bool = True,
    fresh: bool = False,
    device_map: Any = None,
    max_memory: Any = None,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> EmergenceResult:
    """Test-marker emergence (`plipy lens emergence`, PLIP-rs' test_emergence): per prompt and expected string, the
    first layer where a token containing it enters the lens' top-k. `prompts`: None (PLIP-rs' built-in set), a
    JSON / JSON Lines path, or a list of `{id, prompt, expect: [str, …], language?}`. `resume`: finished prompts
    are kept until the result is complete (`fresh=True` starts over); `ray`: the prompts run on `workers` Ray
    actors; same result. No `batch_size`: each prompt is its own forward (padding prompts together would change
    the numbers)."""
    from plipy.experiments import emergence as em

    front = Front.check(
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        resume=resume,
        fresh=fresh,
        ray=ray,
        workers=workers,
        progress=progress,
    )
    opt.check_top_k(top_k)
    opt.check_selection(layers, param="layers")
    if prompts is None or isinstance(prompts, (str, Path)):
        items, source = em.load_prompts(prompts)
    else:
        items, source = em.check_prompts(list(prompts), "prompts"), "in-memory"
    lm = front.model(model)
    opt.check_top_k(top_k, vocab_size=lm.vocab_size)
    experiment = em.Emergence(items, source, top_k=top_k, layers=opt.parse_layers(layers, lm.n_layers), bos=bos)
    return front.execute(experiment, lm)


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
    resume: bool = True,
    fresh: bool = False,
    device_map: Any = None,
    max_memory: Any = None,
    ray: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> ProbeResult:
    """Linear probes (`plipy probe`): per layer, logistic regression on the residual after that layer at the
    `feature` token ("last" or "marker") classifying each sample's label; stratified k-fold accuracy beside a
    shuffled-label control (`permutations` refits) and the majority baseline. `data`: a corpus (None = bundled; its
    groups, or their prefix with label="prefix": python_doctest → python) or labelled snippets
    (`{"samples": [{"code", "label"}]}`, JSON Lines). Two runs one after the other: the residuals (one forward per
    sample), then the fits (one layer at a time); `resume` keeps the finished ones of each (`fresh=True` starts
    over); `ray` runs both on `workers` Ray actors; same result. No `batch_size`: each sample is its own forward."""
    from plipy.experiments import probe as pr

    front = Front.check(
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        resume=resume,
        fresh=fresh,
        ray=ray,
        workers=workers,
        progress=progress,
    )
    opt.check_choice(feature, opt.PROBE_FEATURES, param="feature")
    opt.check_permutations(permutations)
    opt.check_folds(folds)
    C = opt.check_positive_number(C, param="C")
    opt.check_seed(seed)
    opt.check_selection(layers, param="layers")
    d = pr.load_data(data, groups=opt.parse_groups(groups), label_by=label, offsets=offsets)  # label checked there
    if feature == "marker" and any(it.marker_char is None for it in d.items):
        raise ParameterError("feature", "'marker' needs a corpus with marker positions (labelled snippets have none)")
    pr.check_classes([it.label for it in d.items], folds)  # before the model loads
    lm = front.model(model)
    layer_list = opt.parse_layers(layers, lm.n_layers)
    features = front.execute(pr.ProbeFeatures(d, feature=feature, layers=layer_list, bos=bos), lm)
    experiment = pr.Probe(
        features,
        feature=feature,
        source=d.source,
        folds=folds,
        permutations=permutations,
        C=C,
        seed=seed,
        bos=bos,
    )
    return front.execute(experiment, lm)
