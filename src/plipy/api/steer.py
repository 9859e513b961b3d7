"""Attention steering from Python: `plipy.steer.calibrate`, `.dose` and `.generate` (the `plipy steer` commands).

    import plipy
    cal = plipy.steer.calibrate("smollm2-135m", layer=16)            # CalibrateResult
    d = plipy.steer.dose("smollm2-135m", layer=16, doses=[0.5, 1, 2])  # DoseResult
    g = plipy.steer.generate("smollm2-135m", layer=16, scale=3)        # GenerateResult

Options are the CLI flags' names; `model`, `corpus`, `layers`/`heads`, `progress` and `runner` as in `plipy.scan`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, Front, as_corpus, runner_option
from plipy.errors import ParameterError
from plipy.results import CalibrateResult, DoseResult, GenerateResult
from plipy.runtime.experiment import Progress

DEFAULT_DOSES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)


def calibrate(
    model: Any = DEFAULT_MODEL,
    corpus: Any = None,
    *,
    layer: int | None = None,
    groups: Any = None,
    skip_invalid: bool = False,
    bos: bool = False,
    offsets: str = "chars",
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
) -> CalibrateResult:
    """Two groups' baseline attention at one layer (default: PLIP's), their ratio, and the α that brings the
    second group's steered mean to the first group's (`plipy steer calibrate`)."""
    from plipy.experiments.calibrate import Calibrate
    from plipy.experiments.edge_steering import prepare_check_groups

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
    opt.check_steered_layers(layer, None)
    group_list = opt.parse_groups(groups) or ["python_doctest", "rust_test"]
    if len(group_list) != 2:
        raise ParameterError("groups", f"needs exactly two groups (A, B), got {len(group_list)}")
    corp = as_corpus(corpus, offsets=offsets)
    prepare_check_groups(corp, group_list)
    lm = front.model(model)
    [the_layer] = opt.steered_layers(layer, None, lm.n_layers)
    experiment = Calibrate(
        corp, the_layer, groups=group_list, bos=bos, skip_invalid=skip_invalid, extra={"offsets": offsets}
    )
    return front.execute(experiment, lm)


def dose(
    model: Any = DEFAULT_MODEL,
    corpus: Any = None,
    *,
    groups: Any = None,
    layer: int | None = None,
    layers: Any = None,
    doses: Any = DEFAULT_DOSES,
    heads: Any = "all",
    target_attention: float | None = None,
    skip_invalid: bool = False,
    bos: bool = False,
    offsets: str = "chars",
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
) -> DoseResult:
    """Dose-response: per dose α and sample, KL(base ‖ steered) and the attention achieved; optionally the α per
    sample that reaches `target_attention` (`plipy steer dose`). A `runner` given as a `ConditionRunner` is used
    here only (Ray workers build their own on its path)."""
    from plipy.experiments.dose import Dose
    from plipy.experiments.edge_steering import prepare_check_groups

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
    if target_attention is not None:
        opt.check_fraction(target_attention, param="target_attention")
    dose_list = opt.parse_doses(doses, target_attention=target_attention)
    opt.check_steered_layers(layer, layers, target_attention=target_attention)
    opt.check_selection(heads, param="heads", what="head")
    the_runner, path = runner_option(runner, condition_batch)
    group_list = opt.parse_groups(groups) or ["rust_test"]
    corp = as_corpus(corpus, offsets=offsets)
    prepare_check_groups(corp, group_list)
    lm = front.model(model)
    experiment = Dose(
        corp,
        opt.steered_layers(layer, layers, lm.n_layers, target_attention=target_attention),
        groups=group_list,
        doses=dose_list,
        heads=opt.parse_heads(heads, lm.n_heads, all_as_none=True),
        target_attention=target_attention,
        bos=bos,
        skip_invalid=skip_invalid,
        path=path,
        max_batch=condition_batch,
        runner=the_runner,
        extra={"offsets": offsets},
    )
    return front.execute(experiment, lm)


def generate(
    model: Any = DEFAULT_MODEL,
    prompts: str | Path | None = None,
    *,
    layer: int | None = None,
    layers: Any = None,
    scale: float = 3.0,
    max_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
    detect: Any = None,
    query_text: str = "fn ",
    key_text: str = "#[test]",
    heads: Any = "all",
    limit: int | None = None,
    skip_invalid: bool = False,
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
) -> GenerateResult:
    """Baseline vs steered generation per prompt by the same decoding call, test-marker detection and Fisher's
    exact test (`plipy steer generate`). `prompts` None = the bundled Rust prompts; `detect`: one regex or several
    (None: `DEFAULT_DETECT`, the usual Rust and doctest markers)."""
    from plipy.experiments.generate import DEFAULT_DETECT, Generate, load_prompts

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
    opt.check_steered_layers(layer, layers)
    opt.check_selection(heads, param="heads", what="head")
    opt.check_number(scale, param="scale")
    opt.check_positive(max_tokens, param="max_tokens")
    opt.check_number(temperature, param="temperature")
    opt.check_seed(seed)
    detects = tuple([detect] if isinstance(detect, str) else detect) if detect else DEFAULT_DETECT
    opt.check_regexes(detects, param="detect")
    if limit is not None:
        opt.check_positive(limit, param="limit")
    items, source = load_prompts(prompts)
    lm = front.model(model)
    experiment = Generate(
        items,
        opt.steered_layers(layer, layers, lm.n_layers),
        source=source,
        scale=scale,
        heads=opt.parse_heads(heads, lm.n_heads, all_as_none=True),
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        chat=chat,
        detect=detects,
        query_text=query_text,
        key_text=key_text,
        skip_invalid=skip_invalid,
        limit=limit,
    )
    return front.execute(experiment, lm)


__all__ = ["calibrate", "dose", "generate", "DEFAULT_DOSES"]
