"""Units of an experiment run on a Ray actor pool: each actor loads the model once (from its spec: weights are
never pickled) and computes units with the same engine code as a local run; the driver stores each finished unit
(`plipy.checkpoint`) and hands them back in a fixed order, so a result equals the single-process one.

Faults: actors restart (`max_restarts`) and their lost tasks are retried (`max_task_retries`); a task that still
fails with a dead actor is resubmitted to another. A unit is stored once, by the driver, so nothing counts twice.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plipy.errors import ParameterError, PlipyError

IN_FLIGHT = 2  # tasks queued per actor: the next batch is ready when one finishes
RESUBMITS = 3  # a batch whose actor died for good goes to another actor this many times at most
NAMESPACE = "plipy"


@dataclass(frozen=True)
class Cluster:
    """Where and how wide: `address` None starts a local Ray instance (or joins $RAY_ADDRESS); `workers` None:
    one per GPU, else one per node."""

    address: str | None = None
    workers: int | None = None
    # torch threads per worker; None: the driver's count. fp32 sums split over another number of threads round
    # differently, so only the driver's count gives the bits of a local run (on CPUs; GPUs do not care).
    threads: int | None = None
    gpus: int = 0  # in the cluster, once connected (`check`): "auto" device and dtype follow the workers


@dataclass(frozen=True)
class Job:
    """What an actor needs to build its `compute(batch)`: how to load the model and which builder to call with
    which inputs (corpus, config, prompts: data, never weights)."""

    model: dict[str, Any]  # load_model keyword arguments: spec, dtype, device, device_map, max_memory
    builder: str  # "module:function" (lm, *args) -> compute
    args: tuple = ()
    env: dict[str, str] = field(default_factory=dict)  # PLIPY_* / HF_* settings of the driver
    weights: Any = None  # the driver's weights_sha256: a worker that loads other weights refuses to start


def as_cluster(ray: Any, workers: int | None = None) -> Cluster | None:
    """`ray=` of the facade: None/False (local run), True or "" (a local Ray instance or $RAY_ADDRESS), an address
    ("auto", "ray://host:10001", "host:6379") or a `Cluster`."""
    from plipy.options import check_positive

    if workers is not None:
        check_positive(workers, param="workers")
    if ray is None or ray is False:
        if workers is not None:
            raise ParameterError("workers", "needs ray (--ray): workers are Ray actors")
        return None
    if isinstance(ray, Cluster):
        return ray if workers is None else Cluster(ray.address, workers, ray.threads, ray.gpus)
    if ray is True or ray == "":
        return Cluster(None, workers)
    if isinstance(ray, str):
        return Cluster(ray, workers)
    raise ParameterError("ray", f"expected True, an address or a Cluster, got {type(ray).__name__}")


def model_job_args(lm: Any, load: dict[str, Any]) -> dict[str, Any]:
    """How workers load the driver's model: its spec and the driver's load options. A model plipy did not load
    (`wrap_model`) has no spec a worker could load."""
    spec = getattr(lm, "spec", None)
    if not spec or getattr(lm, "provenance", {}).get("weights_sha256") is None:
        raise PlipyError("ray: workers load the model from its spec; pass a model spec (alias, path, hub id), not a "
                         "loaded HF model")
    if Path(spec).exists():
        spec = str(Path(spec).resolve())  # a worker's working directory is not the driver's
    # the driver's resolved dtype: workers compute in what the result's provenance says; the device stays per node
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    keep = {k: v for k, v in load.items() if v is not None and k in ("device", "device_map", "max_memory")}
    return {"spec": spec, "dtype": dtype, **keep}


def _driver_env() -> dict[str, str]:
    keep = ("PLIPY_", "HF_", "TRANSFORMERS_")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def check(cluster: Cluster) -> Cluster:
    """Connect now (a bad address fails before any model loads) and learn the cluster's GPUs."""
    ray = connect(cluster)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return Cluster(cluster.address, cluster.workers, cluster.threads, gpus)


def driver_model(spec: str, dtype: str, device: str, cluster: Cluster) -> Any:
    """The driver's model under Ray: tokenizer, config and weight hashes, no weights (meta device) where the spec
    allows; "auto" device and dtype are the workers' (CUDA and bf16 when the cluster has GPUs)."""
    import torch

    from plipy.models import load_model, resolve_dtype

    home = torch.device(("cuda" if cluster.gpus else "cpu") if device == "auto" else device)
    lm = load_model(spec, dtype=resolve_dtype(dtype, home), device="cpu", weights=False)
    if lm.home is not None:
        lm.home = home
        lm.provenance["device"] = str(home)  # the workers' (provenance.cluster says where they ran)
    return lm


def build_compute(job: Job) -> Callable[[list[int]], list]:
    """On an actor: load the model and build the experiment's `compute(batch)` (the local path's own code)."""
    from plipy.models import load_model

    lm = load_model(**job.model)
    got = lm.provenance.get("weights_sha256")
    if job.weights is not None and got != job.weights:
        raise PlipyError(f"{job.model['spec']}: this node's weights differ from the driver's (sha256 {got} vs "
                         f"{job.weights})")
    module, name = job.builder.split(":")
    return getattr(importlib.import_module(module), name)(lm, *job.args)


class _Worker:
    """One Ray actor: the model, loaded once; `run(tag, batch)` computes one batch of units."""

    def __init__(self, job: Job, threads: int):
        import torch

        os.environ.update(job.env)
        torch.set_num_threads(threads)  # the driver's count (Cluster.threads): a local run's bits
        self.compute = build_compute(job)

    def run(self, tag: int, batch: list[int]) -> tuple[int, list]:
        return tag, self.compute(batch)

    def pid(self) -> int:
        return os.getpid()


def ray_module() -> Any:
    """The `ray` module, or one clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PlipyError("--ray needs Ray: pip install 'plipy[ray]'") from None
    return ray


def connect(cluster: Cluster) -> Any:
    """The `ray` module, connected (an existing connection is reused)."""
    ray = ray_module()
    if not ray.is_initialized():
        import logging

        try:
            ray.init(address=cluster.address, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False, namespace=NAMESPACE)  # fmt: skip
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = cluster.address or os.environ.get("RAY_ADDRESS") or "a local instance"
            raise PlipyError(f"ray: cannot connect to {where}: {str(e).splitlines()[0]}") from None
    return ray


def _shape(ray: Any, workers: int | None) -> tuple[int, float, int]:
    """(workers, GPUs per worker, CPUs reserved per worker) for the cluster's resources."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    n = workers or gpus or max(1, len(nodes))
    node_cpus = min((int(nd["Resources"].get("CPU", 1)) for nd in nodes), default=1)
    threads = max(1, min(node_cpus, int(res.get("CPU", 1)) // n))
    return n, (1.0 if gpus else 0.0), threads


class RayPool:
    """`workers` actors of one job; `map(batches)` yields `(k, results of batches[k])` as they finish."""

    def __init__(self, job: Job, cluster: Cluster):
        ray = self.ray = connect(cluster)
        import torch

        self.n, gpus, cpus = _shape(ray, cluster.workers)
        self.threads = cluster.threads or torch.get_num_threads()
        actor = ray.remote(_Worker)
        self.run_id = uuid.uuid4().hex[:8]
        self.names = [f"plipy-{self.run_id}-{i}" for i in range(self.n)]
        self.actors = [actor.options(name=name, num_cpus=cpus, num_gpus=gpus, max_restarts=-1,
                                     max_task_retries=-1, namespace=NAMESPACE).remote(job, self.threads)
                       for name in self.names]  # fmt: skip
        self.address = ray.get_runtime_context().gcs_address
        try:  # every actor has its model: a spec a node cannot load fails here, as one line
            self.pids = ray.get([a.pid.remote() for a in self.actors])
        except ray.exceptions.RayActorError as e:
            self.close()
            raise PlipyError(f"ray: a worker could not start: {_last_line(e)}") from None

    def describe(self) -> dict[str, Any]:
        """For provenance: where the units ran."""
        return {"ray": self.ray.__version__, "address": self.address, "workers": self.n,
                "threads_per_worker": self.threads}  # fmt: skip

    def map(self, batches: Sequence[list[int]]) -> Iterator[tuple[int, list]]:
        """Every batch once, spread over the actors; results as they finish (callers restore the order)."""
        ray = self.ray
        todo = list(range(len(batches)))[::-1]
        tries = dict.fromkeys(todo, 0)
        flying: dict[Any, tuple[int, int]] = {}  # ref → (batch, actor)
        load = [0] * self.n

        def submit() -> None:
            while todo:
                a = min(range(self.n), key=load.__getitem__)
                if load[a] >= IN_FLIGHT:
                    return
                k = todo.pop()
                flying[self.actors[a].run.remote(k, list(batches[k]))] = (k, a)
                load[a] += 1

        submit()
        while flying:
            [ref], _ = ray.wait(list(flying), num_returns=1)
            k, a = flying.pop(ref)
            load[a] -= 1
            try:
                tag, out = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # restarts exhausted or the node is gone
                tries[k] += 1
                if tries[k] > RESUBMITS:
                    raise PlipyError(f"ray: batch {k} failed on {tries[k]} workers: {_last_line(e)}") from None
                todo.append(k)
                submit()
                continue
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
                if isinstance(cause, PlipyError):
                    raise cause from None
                raise PlipyError(f"ray: a worker failed: {_last_line(e)}") from None
            submit()
            yield tag, out

    def close(self) -> None:
        """Stop the actors (the Ray instance stays up for the next run of this process)."""
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


@dataclass
class Execution:
    """Where an experiment's units run: `compute` here (pool None) or on `pool`; pass both to `Units.batched`."""

    compute: Callable[[list[int]], list] | None
    pool: RayPool | None

    def describe(self) -> dict[str, Any] | None:
        """The provenance `cluster` block (None for a local run)."""
        return None if self.pool is None else self.pool.describe()


def stamp(prov: dict[str, Any], where: dict[str, Any] | None) -> dict[str, Any]:
    """`prov` with a `cluster` block when the units ran on Ray."""
    if where is not None:
        prov["cluster"] = where
    return prov


@contextmanager
def executor(cluster: Cluster | None, lm: Any, load: dict[str, Any] | None, builder: str, args: tuple,
             local: Callable[[], Callable[[list[int]], list]]) -> Iterator[Execution]:
    """The local `compute` (built by `local()`) or, with a `cluster`, a pool whose workers build theirs with
    `builder(worker_lm, *args)` after loading the driver's model spec (`load`: device and memory map)."""
    if cluster is None:
        yield Execution(local(), None)
        return
    weights = lm.provenance.get("weights_sha256")
    with open_pool(cluster, lambda: Job(model_job_args(lm, load or {}), builder, args, weights=weights)) as pool:
        yield Execution(None, pool)


def _last_line(e: Exception) -> str:
    """The cause of a Ray error in one line: the last line of the remote traceback it carries."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1].removeprefix("plipy.errors.PlipyError: ") if lines else type(e).__name__


@contextmanager
def open_pool(cluster: Cluster | None, job: Callable[[], Job]) -> Iterator[RayPool | None]:
    """A pool for `cluster` (None: a local run, no pool); `job` is called only when a pool is made."""
    if cluster is None:
        yield None
        return
    j = job()
    pool = RayPool(Job(j.model, j.builder, j.args, {**_driver_env(), **j.env}, j.weights), cluster)
    try:
        yield pool
    finally:
        pool.close()
