"""`plipy.qk`: QK attribution — attention scores split into query-side × key-side components."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, Front, as_corpus
from plipy.errors import ParameterError, PlipyError
from plipy.results import QkResult
from plipy.runtime.experiment import Progress


def _scan_layer(scan: Any) -> int:
    """The largest-effect layer of a scan result (a `ScanResult` or its JSON file)."""
    from plipy.results import ScanResult, load_result

    try:
        result = scan if isinstance(scan, ScanResult) else load_result(Path(scan))
    except (PlipyError, TypeError) as e:
        raise ParameterError("scan", f"cannot read a scan result from {scan!r}: {e}") from None
    if not isinstance(result, ScanResult):
        raise ParameterError("scan", f"{scan} is a {result.kind} result, not a scan")
    return result.largest_effect_layer()


def _sae_layer(sae: Any, param: str) -> int:
    """The decoder layer whose input an SAE reads (its hook names it; one without a hook is refused)."""
    from plipy.sae import steer_layer

    point = sae.hook_point()
    if point is None:
        raise ParameterError(param, f"SAE {sae.source} names no hook: give hook='blocks.L.hook_resid_pre'")
    return steer_layer(point)


def _check_steering(steer: int, steer_sae: Any, steer_coeff: Any, steer_pos: str | None, prompts: bool) -> None:
    """The steering latent, SAE, coefficient and positions, checked before the model loads."""
    from plipy.experiments.qk import STEER_POS_CORPUS
    from plipy.sae import parse_coeff
    from plipy.sae.inputs import POS_TYPES

    if steer_sae is None:
        raise ParameterError("steer_sae", "steering needs an SAE: give steer_sae= (or sae=, which it then uses)")
    _sae_layer(steer_sae, "steer_sae")
    opt.check_positive(steer, param="steer", minimum=0)
    try:
        steer_sae.check_latent(steer)
        coeff = parse_coeff(steer_coeff)
    except PlipyError as e:
        raise ParameterError("steer" if "latent" in str(e) else "steer_coeff", str(e)) from None
    if isinstance(coeff, str):
        raise ParameterError("steer_coeff", "must be a number here ('norm' and 'mean' are sae attention's)")
    if steer_pos is not None:
        opt.check_choice(steer_pos, POS_TYPES if prompts else STEER_POS_CORPUS, param="steer_pos")


def _inputs(corpus: Any, prompts: Any, groups: Any, offsets: str) -> tuple[Any, Any, list[str] | None]:
    """(corpus, prompts, groups): one source of inputs, its groups checked."""
    from plipy.api.sae import as_prompts
    from plipy.experiments.qk import select_groups

    if prompts is not None and corpus is not None:
        raise ParameterError("prompts", "give a corpus or entity prompts, not both")
    items = None if prompts is None else as_prompts(prompts)
    corp = as_corpus(corpus, offsets=offsets) if items is None else None
    group_list = opt.parse_groups(groups)
    select_groups(corp, items, group_list)  # an unknown group fails before the model loads
    return corp, items, group_list


def _layer(layer: int | None, scan: Any, sae: Any, n_layers: int) -> int:
    """The decomposed layer: `layer`, else the scan's largest-effect layer, else the SAE's, else PLIP's default."""
    if layer is not None:
        return opt.parse_layers(int(layer), n_layers, param="layer")[0]
    if scan is not None:
        return opt.parse_layers(_scan_layer(scan), n_layers, param="scan")[0]
    if sae is not None:
        return opt.parse_layers(_sae_layer(sae, "sae"), n_layers, param="sae")[0]
    return opt.plip_default_layer(n_layers)


def _interventions(
    lm: Any,
    layer: int,
    steer: Any,
    steer_sae: Any,
    steer_coeff: Any,
    steer_pos: Any,
    knockout: Any,
    knockout_heads: Any,
    prompts: bool,
) -> tuple[Any, Any]:
    """(SteerSpec | None, KnockoutSpec | None), with the bounds that need the model."""
    from plipy import sae as sa
    from plipy.experiments.qk import KnockoutSpec, SteerSpec

    steer_spec = knock = None
    if steer_sae is not None:
        sa.check_model(steer_sae, lm.hidden_size, lm.n_layers)
        at = sa.resolve_layer(steer_sae, None, lm.n_layers)
        if at > layer:
            raise ParameterError(
                "steer_sae", f"steers at the input of layer {at}, after layer {layer}: it cannot change its scores"
            )
        pos = steer_pos or ("entity_last" if prompts else "targets")
        steer_spec = SteerSpec(steer_sae, int(steer), float(steer_coeff), pos, at)
    if knockout is not None:
        layers = opt.parse_layers(knockout, lm.n_layers, param="knockout")
        if max(layers) >= layer:
            raise ParameterError(
                "knockout",
                f"a knockout at layer {max(layers)} cannot change the scores of layer {layer} (they are computed "
                "before its attention weights are used): knock out earlier layers",
            )
        knock = KnockoutSpec(
            layers, opt.parse_heads(knockout_heads, lm.n_heads, param="knockout_heads", all_as_none=True)
        )
    return steer_spec, knock


def _steering_sae(steer: Any, steer_sae: Any, steer_coeff: Any, steer_pos: Any, sae: Any, prompts: bool) -> Any:
    """The SAE steering uses (`steer_sae`, else `sae`; None without steering), checked before the model loads."""
    from plipy.api.sae import as_sae

    if steer is None and (steer_sae is not None or steer_pos is not None):
        raise ParameterError("steer", "steer_sae and steer_pos need a latent to steer with (steer=)")
    steering_sae = None if steer is None else as_sae(steer_sae) if steer_sae is not None else sae
    if steer is not None:
        _check_steering(steer, steering_sae, steer_coeff, steer_pos, prompts)
    return steering_sae


def _check_options(
    batch_size: int | None, layer: Any, scan: Any, heads: Any, top: int, steer: Any, knockout: Any, knockout_heads: Any
) -> None:
    """The options that need no model, checked before it loads."""
    if batch_size not in (None, 1):
        raise ParameterError("batch_size", "qk runs one input per forward (each keeps only its own rows): use 1")
    if layer is not None:
        opt.check_positive(layer, param="layer", minimum=0)
        if scan is not None:
            raise ParameterError("scan", "give layer or scan (whose largest-effect layer is used), not both")
    if scan is not None:
        _scan_layer(scan)
    opt.check_selection(heads, param="heads", what="head")
    if isinstance(heads, str) and heads.strip() == "none" or isinstance(heads, list | tuple) and not heads:
        raise ParameterError("heads", "name at least one head to decompose")
    opt.check_positive(top, param="top", maximum=1000)
    if knockout is not None:
        opt.check_selection(knockout, param="knockout")
        opt.check_selection(knockout_heads, param="knockout_heads", what="head")
        if steer is not None:
            raise ParameterError("knockout", "one intervention at a time: steer or knockout")


def qk(
    model: Any = DEFAULT_MODEL,
    corpus: Any = None,
    *,
    prompts: Any = None,
    layer: int | None = None,
    scan: Any = None,
    heads: Any = "all",
    groups: Any = None,
    per_head_components: bool = False,
    sae: Any = None,
    hook: str | None = None,
    steer: int | None = None,
    steer_sae: Any = None,
    steer_coeff: Any = 100.0,
    steer_pos: str | None = None,
    knockout: Any = None,
    knockout_heads: Any = "all",
    bos: bool | None = None,
    offsets: str = "chars",
    top: int = 10,
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
) -> QkResult:
    """Why the query attends: split the pre-softmax score of each input's query (the marker; the last token of entity
    `prompts`) to its keys (the targets; the entity tokens) at `layer` into query-side × key-side contributions of
    the residual's components (embedding, each earlier attention — per head with `per_head_components` — and MLP
    output, bias terms) or of an `sae`'s latents reading the residual entering the layer (`plipy qk`). `layer`:
    default the largest-effect layer of a `scan` result, else the SAE's layer, else PLIP's default. `steer` (a latent
    of `steer_sae`, default `sae`, times `steer_coeff` at `steer_pos`) or `knockout` (query → key edges in earlier
    layers, `knockout_heads`) decompose an intervened run too, and the difference. Exact: the terms sum to the
    observed score (the norms' scales frozen at their observed values)."""
    from plipy.api.sae import as_sae
    from plipy.engine.qk import supported
    from plipy.experiments.qk import Qk

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
    _check_options(batch_size, layer, scan, heads, top, steer, knockout, knockout_heads)
    corp, items, group_list = _inputs(corpus, prompts, groups, offsets)
    the_sae = None if sae is None else as_sae(sae, hook=hook)
    if the_sae is not None:
        _sae_layer(the_sae, "sae")
    steering_sae = _steering_sae(steer, steer_sae, steer_coeff, steer_pos, the_sae, items is not None)
    lm = front.model(model)
    why = supported(lm.model)
    if why is not None:
        raise PlipyError(f"cannot decompose attention scores: {why}")
    at = _layer(layer, scan, the_sae, lm.n_layers)
    if the_sae is not None:
        from plipy import sae as sa

        sa.check_model(the_sae, lm.hidden_size, lm.n_layers)
        if _sae_layer(the_sae, "sae") != at:
            raise ParameterError(
                "sae", f"SAE {the_sae.source} reads {the_sae.hook_name}, not the residual entering layer {at}"
            )
    steer_spec, knock = _interventions(
        lm, at, steer, steering_sae, steer_coeff, steer_pos, knockout, knockout_heads, items is not None
    )
    experiment = Qk(
        at,
        corpus=corp,
        prompts=items,
        groups=group_list,
        heads=opt.parse_heads(heads, lm.n_heads),
        per_head_components=per_head_components,
        sae=the_sae,
        steer=steer_spec,
        knockout=knock,
        bos=(items is not None) if bos is None else bos,
        top=top,
        extra={"offsets": offsets} if items is None else {},
    )
    return front.execute(experiment, lm)
