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
from plipy.api.front import DEFAULT_MODEL, as_corpus, as_model, check_cluster, ray_load, runner_option
from plipy.errors import ParameterError
from plipy.results import CalibrateResult, DoseResult, GenerateResult
from plipy.runtime.experiment import Progress

DEFAULT_DOSES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)


def _layer_list(n_layers: int, layer: int | None, layers: Any) -> list[int] | None:
    if layer is not None and layers is not None:
        raise ParameterError("layers", "give layer or layers, not both")
    if layers is not None:
        return opt.parse_layers(layers, n_layers)
    return None if layer is None else opt.parse_layers(int(layer), n_layers, param="layer")


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
    from plipy.experiments import steer as st

    group_list = opt.parse_groups(groups) or ["python_doctest", "rust_test"]
    if len(group_list) != 2:
        raise ParameterError("groups", f"needs exactly two groups (A, B), got {len(group_list)}")
    corp = as_corpus(corpus, offsets=offsets)
    st.prepare_check_groups(corp, group_list)
    opt.check_batch_size(batch_size)
    cluster = check_cluster(ray, workers)
    lm = as_model(
        model,
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        cluster=cluster,
    )
    if layer is not None:
        opt.parse_layers(int(layer), lm.n_layers, param="layer")
    cfg = st.CalibrateConfig(
        layer=layer,
        groups=group_list,
        bos=bos,
        skip_invalid=skip_invalid,
        extra={"offsets": offsets},
        resume=resume,
        fresh=fresh,
        batch_size=batch_size,
    )
    return st.run_calibrate(
        lm, corp, cfg, progress=progress, cluster=cluster, load=ray_load(device, device_map, max_memory)
    )


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
    sample that reaches `target_attention` (`plipy steer dose`)."""
    from plipy.experiments import steer as st

    dose_list = opt.parse_floats(doses, param="doses") if doses != "" else []
    group_list = opt.parse_groups(groups) or ["rust_test"]
    corp = as_corpus(corpus, offsets=offsets)
    st.prepare_check_groups(corp, group_list)
    opt.check_batch_size(batch_size)
    cluster = check_cluster(ray, workers)
    lm = as_model(
        model,
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        cluster=cluster,
    )
    the_runner, path = runner_option(runner, condition_batch)
    cfg = st.DoseConfig(
        groups=group_list,
        layers=_layer_list(lm.n_layers, layer, layers),
        doses=dose_list,
        heads=opt.parse_heads(heads, lm.n_heads, all_as_none=True),
        target_attention=target_attention,
        bos=bos,
        skip_invalid=skip_invalid,
        path=path,
        max_batch=condition_batch,
        extra={"offsets": offsets},
        resume=resume,
        fresh=fresh,
        batch_size=batch_size,
    )
    return st.run_dose(
        lm,
        corp,
        cfg,
        progress=progress,
        runner=the_runner,
        cluster=cluster,
        load=ray_load(device, device_map, max_memory),
    )


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
    exact test (`plipy steer generate`). `prompts` None = the bundled Rust prompts."""
    from plipy.experiments import steer as st

    if limit is not None:
        opt.check_positive(limit, param="limit")
    items, source = st.load_prompts(prompts)
    opt.check_batch_size(batch_size)
    cluster = check_cluster(ray, workers)
    lm = as_model(
        model,
        dtype=dtype,
        device=device,
        tokenizer=tokenizer,
        device_map=device_map,
        max_memory=max_memory,
        cluster=cluster,
    )
    detects = tuple([detect] if isinstance(detect, str) else detect) if detect else st.DEFAULT_DETECT
    cfg = st.GenerateConfig(
        layers=_layer_list(lm.n_layers, layer, layers),
        scale=scale,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        chat=chat,
        detect=detects,
        query_text=query_text,
        key_text=key_text,
        heads=opt.parse_heads(heads, lm.n_heads, all_as_none=True),
        skip_invalid=skip_invalid,
        limit=limit,
        resume=resume,
        fresh=fresh,
        batch_size=batch_size,
    )
    return st.run_generate(
        lm, items, cfg, source=source, progress=progress, cluster=cluster, load=ray_load(device, device_map, max_memory)
    )
