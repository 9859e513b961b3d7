"""`plipy.knockout`: attention knockout."""

from __future__ import annotations

from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, Front, as_corpus, runner_option
from plipy.errors import ParameterError
from plipy.results import KnockoutResult
from plipy.runtime.experiment import Progress


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
    ablation: str = "zero",
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
    and measure the next-token KL on every sample (`plipy knockout`). `ablation`: "zero" removes the edges;
    "mean" / "resample" set each edge row's total weight to its group's mean / a donor sample's clean value (a
    first pass records the clean weights). `runner`: "auto" | "fast" | "naive" or a
    `ConditionRunner` to reuse; `resume`/`fresh`/`batch_size` (baselines per forward) and `ray`/`workers` as in
    `scan`."""
    from plipy.experiments.edge_ablation import ABLATIONS
    from plipy.experiments.knockout import EDGE_KINDS, Knockout, build_conditions
    from plipy.experiments.samples import choose_groups

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
    mode = knockout_mode(
        layer=layer,
        layers=layers,
        scan_layers=scan_layers,
        scan_windows=scan_windows,
        slide_window=slide_window,
        center=center,
        max_radius=max_radius,
    )
    opt.check_choice(edges, EDGE_KINDS, param="edges")
    opt.check_choice(ablation, ABLATIONS, param="ablation")
    _check_mode_options(layer, layers, center, max_radius, slide_window)
    opt.check_selection(heads, param="heads", what="head")
    opt.check_resamples(resamples)
    opt.check_seed(seed)
    the_runner, path = runner_option(runner, condition_batch)
    corp = as_corpus(corpus, offsets=offsets)
    group_list = opt.parse_groups(groups)
    choose_groups(corp, group_list)  # bad groups fail before the model loads
    lm = front.model(model)
    conditions = build_conditions(
        mode,
        lm.n_layers,
        layer=layer,
        layers=None if layers is None else opt.parse_layers(layers, lm.n_layers),
        center=center,
        max_radius=max_radius,
        window=slide_window,
    )
    experiment = Knockout(
        corp,
        conditions,
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
        runner=the_runner,
        ablation=ablation,
    )
    if ablation != "zero":
        experiment.masses = front.execute(experiment.masses_phase(lm), lm)
    return front.execute(experiment, lm)


def _check_mode_options(layer: Any, layers: Any, center: Any, max_radius: int | None, slide_window: int | None) -> None:
    """What the mode options can be told without the model (their upper bounds need its layer count)."""
    for value, param in ((layer, "layer"), (center, "center")):
        if value is not None:
            opt.check_positive(value, param=param, minimum=0)
    opt.check_selection(layers, param="layers")
    if max_radius is not None:
        opt.check_positive(max_radius, param="max_radius", minimum=0)
    if slide_window is not None:
        opt.check_positive(slide_window, param="slide_window")
