"""The driver: runs any experiment (`plipy.runtime.experiment.Experiment`) from its plan to its result.

It owns what every experiment needs and none should copy: the batch size (one meaning: inputs per model forward,
one default), the checkpoint of finished units (a killed run resumes with the same bytes), local or Ray execution,
the progress bar, the provenance block and the timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from plipy.engine.batch import default_batch_size
from plipy.runtime import checkpoint, provenance
from plipy.runtime.experiment import Experiment, Progress, Unit

if TYPE_CHECKING:
    from plipy.models import LoadedModel

ResultT = TypeVar("ResultT")


@dataclass
class RunOptions:
    """How to run an experiment: keep finished units (`resume`), discard an interrupted run's (`fresh`), inputs per
    model forward (`batch_size`, None: the experiment's or the device's default), on a Ray `cluster` whose workers
    load the model with `load` (device, memory map), reporting to `progress`."""

    resume: bool = True
    fresh: bool = False
    batch_size: int | None = None
    cluster: Any = None
    load: dict[str, Any] | None = None
    progress: Progress | None = None


def batch_size_for(experiment: Experiment[Any, Any], lm: LoadedModel, asked: int | None) -> int:
    """The batch size a run uses: the one asked, else the experiment's default, else the device's."""
    if asked is not None:
        return asked
    return experiment.default_batch_size or default_batch_size(lm.device)


def execute(experiment: Experiment[Any, ResultT], lm: LoadedModel, options: RunOptions | None = None) -> ResultT:
    """Run `experiment` on `lm`: plan, compute every unit not already on disk (here or on Ray workers), assemble."""
    from plipy.cluster import pool

    opts = options or RunOptions()
    plan = experiment.plan(lm)
    batch_size = batch_size_for(experiment, lm, opts.batch_size)
    settings = experiment.settings(lm, plan, batch_size)
    work = experiment.work(plan, batch_size)
    units = checkpoint.open_run(
        experiment.kind,
        lm,
        settings.corpus,
        settings.config,
        resume=opts.resume,
        fresh=opts.fresh,
        **({"seed": settings.seed} if settings.seed is not None else {}),
        **settings.key,
    )
    step = _stepper(opts.progress, units.label(experiment.label), work.total)
    for _ in range(work.settled):
        step()
    t0 = time.perf_counter()
    done: dict[int, Unit] = {}
    with pool.executor(opts.cluster, lm, opts.load, experiment, plan) as ex:
        for i, unit in units.batched(work.batches, ex.compute, ex.remote):
            done[i] = unit
            step()
        where = ex.describe()
    prov = provenance.build(
        model=lm, corpus=settings.corpus, seed=settings.seed, config={**settings.config, **settings.described}
    )
    # wall-clock time is provenance: it differs between two runs that give the same numbers
    prov["timing"] = {"seconds": time.perf_counter() - t0, "units": len(done), "resumed_units": units.resumed}
    if where is not None:
        prov["cluster"] = where
    result = experiment.assemble(lm, plan, done, prov)
    units.finish()
    return result


def _stepper(progress: Progress | None, description: str, total: int) -> Callable[..., None]:
    return progress(description, total) if progress is not None else (lambda *a, **k: None)
