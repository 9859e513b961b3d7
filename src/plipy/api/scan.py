"""`plipy.scan`: the layer scan."""

from __future__ import annotations

from typing import Any

from plipy import options as opt
from plipy.api.front import DEFAULT_MODEL, Front, as_corpus
from plipy.errors import ParameterError, PlipyError
from plipy.results import ScanResult
from plipy.runtime.experiment import Progress


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
    progress: Progress | bool | None = None,
) -> ScanResult:
    """Marker → target attention of every sample at every layer and head, beside the uniform and token-0 nulls,
    with full statistics (`plipy scan`). `resume`: finished samples are kept until the result is complete, so
    the same call after an interruption goes on where it stopped (`fresh=True` starts over). `batch_size`:
    samples per left-padded forward (None: 16 on CPU, 64 on GPU). `ray`: True (a local Ray instance or
    $RAY_ADDRESS) or an address runs the batches on `workers` Ray actors (`plipy.cluster`); same result."""
    from plipy.experiments.samples import choose_groups
    from plipy.experiments.scan import Scan

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
    opt.check_resamples(resamples)
    opt.check_seed(seed)
    opt.check_selection(layers, param="layers")
    opt.check_selection(heads, param="heads", what="head")
    if isinstance(heads, str) and heads.strip() == "none" or isinstance(heads, list | tuple) and not heads:
        raise ParameterError("heads", "the scan averages over heads: name at least one (none is for knockout)")
    corp = as_corpus(corpus, offsets=offsets)
    group_list = opt.parse_groups(groups)
    choose_groups(corp, group_list)  # bad groups fail before the model loads
    lm = front.model(model)
    experiment = Scan(
        corp,
        groups=group_list,
        layers=opt.parse_layers(layers, lm.n_layers),
        heads=opt.parse_heads(heads, lm.n_heads),
        bos=bos,
        seed=seed,
        n_resamples=resamples,
        extra={"offsets": offsets},
    )
    return front.execute(experiment, lm)


def check_token_view(
    corpus: Any = None,
    *,
    sample: str | None = None,
    layer: int | None = None,
    layers: Any = "all",
    offsets: str = "chars",
) -> None:
    """The token plot's sample and layer, checked before a scan runs: the sample must be in the corpus and the
    layer a non-negative index among `layers` when those are explicit (whether the sample is measurable and the
    layer scanned is known after the run)."""
    if sample is not None:
        try:
            as_corpus(corpus, offsets=offsets).sample(sample)
        except PlipyError:
            raise ParameterError("token_sample", f"{sample!r} is not a sample of the corpus") from None
    if layer is not None:
        opt.check_positive(layer, param="token_layer", minimum=0)
