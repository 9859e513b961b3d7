"""Which heads carry the effect, from Python: `plipy.patch.heads` and `plipy.patch.paths` (the `plipy patch` commands).

    import plipy
    r = plipy.patch.heads("smollm2-135m")                                  # activation patching, both directions
    r = plipy.patch.heads("smollm2-135m", ablations="zero,mean,resample", positions="all,marker,last")
    r = plipy.patch.heads("smollm2-135m", method="attribution", top=20)    # gradient estimate + exact check
    r = plipy.patch.paths("smollm2-135m", receivers="20.3,24.1", inputs="q,k,v")
    r.plot("heatmap"); r.to_pandas(); r.save()

Every sample of the corpus gets a counterfactual twin with aligned tokens (`pairs` None: its marker replaced by a
neutral string of the same token count; a JSON file or dict id → code, or "corpus": each sample's
`counterfactual` field). Options shared with every experiment (`model`, `corpus`, `groups`, `bos`, `seed`,
`resamples`, `runner`, `condition_batch`, the loading and run options) as in `plipy.scan` and `plipy.knockout`."""

from __future__ import annotations

from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, Front, as_corpus
from plipy.errors import ParameterError
from plipy.results import PatchResult
from plipy.runtime.experiment import Progress

DEFAULT_TOP = 20


def _metric(lm: Any, metric: str, answer: Any, wrong: Any) -> Any:
    """The metric with its tokens as ids (a text must be one token of the model's tokenizer)."""
    from plipy.experiments.patching import Metric

    ids: dict[str, int | None] = {}
    for name, tok in (("answer", answer), ("wrong", wrong)):
        if tok is None:
            ids[name] = None
        elif isinstance(tok, int) and not isinstance(tok, bool):
            if not 0 <= tok < lm.vocab_size:
                raise ParameterError(name, f"token id {tok} is outside the vocabulary (0-{lm.vocab_size - 1})")
            ids[name] = tok
        else:
            found = lm.tokenizer.encode(str(tok), add_special_tokens=False)
            if len(found) != 1:
                raise ParameterError(name, f"{tok!r} is {len(found)} tokens for this tokenizer: name one token")
            ids[name] = int(found[0])
    return Metric(metric, ids["answer"], ids["wrong"])


def _check_metric(metric: str, answer: Any, wrong: Any) -> None:
    from plipy.experiments.patching import METRICS

    opt.check_choice(metric, METRICS, param="metric")
    if metric == "kl" and (answer is not None or wrong is not None):
        raise ParameterError("answer" if answer is not None else "wrong", "the kl metric names no token")
    if wrong is not None and metric != "logit-diff":
        raise ParameterError("wrong", "only the logit-diff metric compares two tokens")


def _common(corpus: Any, offsets: str, groups: Any, pairs: Any, seed: int, resamples: int, runner: str) -> tuple:
    """Checks every patching function shares, before the model loads: (corpus, groups, pairs)."""
    from plipy.experiments.counterfactual import load_pairs
    from plipy.experiments.patching import choose_groups

    opt.check_seed(seed)
    opt.check_resamples(resamples)
    opt.check_choice(runner, ("auto", "fast", "naive"), param="runner")
    corp = as_corpus(corpus, offsets=offsets)
    group_list = opt.parse_groups(groups)
    choose_groups(corp, group_list)
    return corp, group_list, load_pairs(pairs, corp)


def heads(
    model: Any = DEFAULT_MODEL,
    corpus: Any = None,
    *,
    method: str = "exact",
    sites: Any = "heads,attn,mlp",
    layers: Any = "all",
    heads: Any = "all",
    positions: Any = "all",
    directions: Any = "denoising,noising",
    ablations: Any = None,
    metric: str = "kl",
    answer: Any = None,
    wrong: Any = None,
    pairs: Any = None,
    top: int = DEFAULT_TOP,
    groups: Any = None,
    bos: bool = False,
    offsets: str = "chars",
    seed: int = 0,
    resamples: int = 10000,
    runner: str = "auto",
    condition_batch: int = 32,
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
    progress: Progress | bool | None = None,
) -> PatchResult:
    """Activation patching of every head's output (before the output projection) and of each layer's attention
    block and MLP output, per position class (`all`, `marker`, `targets`, `last`): denoising (the corrupt run with
    the clean value) and noising (the clean run with the corrupt value), and the ablation baselines (`zero`, `mean`
    over the corpus at the same position class, `resample` from another sample, seeded). `method="attribution"`:
    the gradient estimate of every site, with the `top` heads it ranks patched exactly and the rank correlation
    (`plipy patch heads`)."""
    from plipy.experiments import patching as pt

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
    opt.check_choice(method, ("exact", "attribution"), param="method")
    kinds = opt.parse_choices(sites, pt.SITE_SETS, param="sites")
    classes = opt.parse_choices(positions, pt.POSITIONS, param="positions")
    dirs = [] if directions in (None, "none") else opt.parse_choices(directions, pt.DIRECTIONS, param="directions")
    abls = [] if ablations in (None, "none") else opt.parse_choices(ablations, pt.ABLATIONS, param="ablations")
    if not dirs and not abls:
        raise ParameterError("directions", "no direction and no ablation: nothing to patch")
    if method == "attribution" and (abls or not dirs):
        raise ParameterError("ablations", "attribution estimates patching directions only (no ablations)")
    _check_metric(metric, answer, wrong)
    opt.check_positive(top, param="top")
    opt.check_positive(condition_batch, param="condition_batch")
    opt.check_selection(layers, param="layers")
    opt.check_selection(heads, param="heads", what="head")
    corp, group_list, given = _common(corpus, offsets, groups, pairs, seed, resamples, runner)
    lm = front.model(model)
    site_list = pt.sites_of(
        lm.n_layers,
        lm.n_heads,
        opt.parse_layers(layers, lm.n_layers),
        opt.parse_heads(heads, lm.n_heads) or [],
        kinds,
    )
    if not site_list:
        raise ParameterError("heads", "names no site to patch")
    common: dict[str, Any] = {
        "metric": _metric(lm, metric, answer, wrong),
        "groups": group_list,
        "pairs": given,
        "bos": bos,
        "seed": seed,
        "n_resamples": resamples,
        "extra": {"offsets": offsets},
    }
    exact: dict[str, Any] = {"path": runner, "condition_batch": condition_batch}
    if method == "attribution":
        est = front.execute(pt.PatchAttribution(corp, site_list, classes, dirs, **common), lm)
        chosen = sorted({j for js in pt.top_heads(est, top).values() for j in js})
        check = pt.PatchHeads(corp, [site_list[j] for j in chosen], classes, dirs, **common, **exact)
        return pt.with_exact_check(est, front.execute(check, lm), top)
    means = None
    if "mean" in abls:
        means = front.execute(pt.PatchMeans(corp, classes, group_list, given, bos), lm)
    return front.execute(pt.PatchHeads(corp, site_list, classes, dirs + abls, means=means, **common, **exact), lm)


def paths(
    model: Any = DEFAULT_MODEL,
    corpus: Any = None,
    *,
    receivers: Any = None,
    inputs: Any = "q,k,v",
    layers: Any = "all",
    heads: Any = "all",
    positions: Any = "all",
    directions: Any = "noising",
    metric: str = "kl",
    answer: Any = None,
    wrong: Any = None,
    pairs: Any = None,
    groups: Any = None,
    bos: bool = False,
    offsets: str = "chars",
    seed: int = 0,
    resamples: int = 10000,
    runner: str = "auto",
    condition_batch: int = 32,
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
    progress: Progress | bool | None = None,
) -> PatchResult:
    """Path patching: for every sender head (of `layers`/`heads`, before the last receiver's layer), the metric
    when only the receiver heads (`"20.3,24.1"`) read their query, key or value input (each entry of `inputs`:
    `q`, `k`, `v` or a combination such as `kv`) with the sender's direct effect added — every other head and MLP
    frozen at the target run's values (`plipy patch paths`)."""
    from plipy.experiments import patching as pt

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
    if receivers is None:
        raise ParameterError("receivers", f"name the receiver heads: {opt.HEAD_SITE_GRAMMAR}")
    opt.parse_head_sites(receivers, param="receivers")
    input_list = _inputs(inputs)
    classes = opt.parse_choices(positions, pt.POSITIONS, param="positions")
    dirs = opt.parse_choices(directions, pt.DIRECTIONS, param="directions")
    _check_metric(metric, answer, wrong)
    opt.check_positive(condition_batch, param="condition_batch")
    opt.check_selection(layers, param="layers")
    opt.check_selection(heads, param="heads", what="head")
    corp, group_list, given = _common(corpus, offsets, groups, pairs, seed, resamples, runner)
    lm = front.model(model)
    rec = opt.parse_head_sites(receivers, lm.n_layers, lm.n_heads, param="receivers")
    last = max(layer for layer, _ in rec)
    sender_layers = [x for x in opt.parse_layers(layers, lm.n_layers) if x < last]
    if not sender_layers:
        raise ParameterError("layers", f"no sender layer comes before the last receiver's layer ({last})")
    senders = pt.sites_of(lm.n_layers, lm.n_heads, sender_layers, opt.parse_heads(heads, lm.n_heads) or [], ["heads"])
    if not senders:
        raise ParameterError("heads", "names no sender head")
    experiment = pt.PatchPaths(
        corp,
        senders,
        rec,
        input_list,
        classes,
        dirs,
        metric=_metric(lm, metric, answer, wrong),
        groups=group_list,
        pairs=given,
        bos=bos,
        seed=seed,
        n_resamples=resamples,
        path=runner,
        condition_batch=condition_batch,
        extra={"offsets": offsets},
    )
    return front.execute(experiment, lm)


def _inputs(value: Any) -> list[str]:
    """Receiver inputs: "q,k,v" (three conditions), "qkv" (one, all three together), a list."""
    items = [str(x).strip() for x in (value.split(",") if isinstance(value, str) else list(value))]
    items = [x for x in items if x]
    if not items or any(not set(x) <= set("qkv") for x in items):
        raise ParameterError("inputs", f"receiver inputs are q, k, v or combinations such as kv, got {value!r}")
    out = ["".join(sorted(set(x), key="qkv".index)) for x in items]
    if len(set(out)) != len(out):
        raise ParameterError("inputs", "names an input more than once")
    return out
