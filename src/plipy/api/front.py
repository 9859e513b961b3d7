"""What every facade function shares: the model and corpus arguments, the run options (resume, batch size, Ray,
progress), checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from plipy import options as opt
from plipy.errors import ParameterError
from plipy.runtime.driver import RunOptions, execute
from plipy.runtime.experiment import Experiment, Progress
from plipy.runtime.progress import resolve as resolve_progress

if TYPE_CHECKING:
    from plipy.models import LoadedModel

ResultT = TypeVar("ResultT")

DEFAULT_MODEL = "smollm2-135m"


def as_model(
    model: Any = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: Any = None,
    device_map: Any = None,
    max_memory: Any = None,
    cluster: Any = None,
) -> LoadedModel:
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


def runner_option(runner: Any, condition_batch: int) -> tuple[Any, str]:
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


@dataclass
class Front:
    """The options every experiment function takes beside its own — how the model loads, how the run runs —
    checked by `Front.check` before any model loads."""

    load: dict[str, Any] = field(default_factory=dict)  # as_model's keywords: dtype, device, tokenizer, memory map
    run: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def check(
        cls,
        *,
        dtype: str = "auto",
        device: str = "auto",
        tokenizer: Any = None,
        device_map: Any = None,
        max_memory: Any = None,
        resume: bool = True,
        fresh: bool = False,
        batch_size: int | None = None,
        ray: Any = None,
        workers: int | None = None,
        progress: Progress | bool | None = None,
    ) -> Front:
        """The shared options, each checked (a Ray address is connected to) before any model loads. `progress`:
        None shows a notebook-aware bar, False none, a callable `start(description, total) -> step()` its own."""
        opt.check_batch_size(batch_size)
        cluster = check_cluster(ray, workers)
        dm, mm = opt.parse_device_map(device_map), opt.parse_max_memory(max_memory)
        load = {"dtype": dtype, "device": device, "tokenizer": tokenizer, "device_map": dm, "max_memory": mm}
        run = RunOptions(resume, fresh, batch_size, cluster, ray_load(device, dm, mm), resolve_progress(progress))
        return cls(load, run)

    def model(self, model: Any) -> LoadedModel:
        """The `LoadedModel` of a spec, a `LoadedModel` or an HF model (on Ray: the driver's weightless copy)."""
        return as_model(model, cluster=self.run.cluster, **self.load)

    def execute(self, experiment: Experiment[Any, ResultT], lm: LoadedModel) -> ResultT:
        """Run an experiment on the runtime with these options."""
        return execute(experiment, lm, self.run)
