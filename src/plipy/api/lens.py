"""`plipy.lens`, `plipy.emergence`, `plipy.probe`: what the residual stream says, layer by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, as_corpus, as_model
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
