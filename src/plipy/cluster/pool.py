"""Units of an experiment run on a Ray actor pool: each actor loads the model once (from its spec: weights are
never pickled) and computes units with the same engine code as a local run; the driver stores each finished unit
(`plipy.checkpoint`) and hands them back in a fixed order, so a result equals the single-process one.

Faults: actors restart (`max_restarts`) and their lost tasks are retried (`max_task_retries`); a task that still
fails with a dead actor is resubmitted to another. A unit is stored once, by the driver, so nothing counts twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plipy.errors import ParameterError, PlipyError

if TYPE_CHECKING:
    from plipy.models import LoadedModel

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
    """What an actor needs to compute units: the experiment itself (its inputs and settings: data, never weights;
    the actor rebuilds its plan on its own model) and the driver's weights sha256 (other weights: refused)."""

    experiment: Any
    weights: Any = None


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


def model_args(spec: str, dtype: str, load: dict[str, Any]) -> dict[str, Any]:
    """`load_model` keyword arguments for the workers: the spec (a local path made absolute: a worker's working
    directory is not the driver's), the resolved dtype, and the device and memory map, which each node applies."""
    if Path(spec).exists():
        spec = str(Path(spec).resolve())
    keep = {k: v for k, v in load.items() if v is not None and k in ("device", "device_map", "max_memory")}
    return {"spec": spec, "dtype": dtype, **keep}


def model_job_args(lm: LoadedModel, load: dict[str, Any]) -> dict[str, Any]:
    """How workers load the driver's model. A model plipy did not load (`wrap_model`) has no spec to load."""
    spec = getattr(lm, "spec", None)
    if not spec or getattr(lm, "provenance", {}).get("weights_sha256") is None:
        raise PlipyError(
            "ray: workers load the model from its spec; pass a model spec (alias, path, hub id), not a loaded HF model"
        )
    return model_args(spec, str(next(lm.model.parameters()).dtype).removeprefix("torch."), load)


def _driver_env() -> dict[str, str]:
    keep = ("PLIPY_", "HF_", "TRANSFORMERS_")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def check(cluster: Cluster) -> Cluster:
    """Connect now (a bad address fails before any model loads) and learn the cluster's GPUs."""
    ray = connect(cluster)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return Cluster(cluster.address, cluster.workers, cluster.threads, gpus)


def driver_model(
    spec: str, dtype: str, device: str, cluster: Cluster, load: dict[str, Any] | None = None, *, prestart: bool = True
) -> LoadedModel:
    """The driver's model under Ray: tokenizer, config and weight hashes, no weights (meta device) where the spec
    allows; "auto" device and dtype are the workers' (CUDA and bf16 when the cluster has GPUs). The workers start
    loading the model first, so their start overlaps the driver's own work."""
    import torch

    from plipy.models import load_model, resolve_dtype

    home = torch.device(("cuda" if cluster.gpus else "cpu") if device == "auto" else device)
    dt = resolve_dtype(dtype, home)
    if prestart:
        pool_for(model_args(spec, str(dt).removeprefix("torch."), {"device": device, **(load or {})}), cluster)
    lm = load_model(spec, dtype=dt, device="cpu", weights=False)
    if lm.home is not None:
        lm.home = home
        lm.provenance["device"] = str(home)  # the workers' (provenance.cluster says where they ran)
    return lm


def build_compute(lm: LoadedModel, job: Job) -> Callable[[list[int]], list]:
    """On an actor: the experiment's `compute(batch)` (the local path's own code) on the actor's model."""
    got = lm.provenance.get("weights_sha256")
    if job.weights is not None and got != job.weights:
        raise PlipyError(f"{lm.spec}: this node's weights differ from the driver's (sha256 {got} vs {job.weights})")
    experiment = job.experiment
    plan = experiment.plan(lm)
    return lambda batch: experiment.compute(lm, plan, batch)


class _Worker:
    """One Ray actor: the model, loaded once (again after a restart); `run` computes one batch of a job's units,
    building the job's `compute` on its first batch."""

    def __init__(self, model: dict[str, Any], env: dict[str, str], threads: int):
        import torch

        from plipy.models import load_model

        os.environ.update(env)
        torch.set_num_threads(threads)  # the driver's count (Cluster.threads): a local run's bits
        self.lm = load_model(**model)
        self.job_id: str | None = None
        self.compute: Callable[[list[int]], list] | None = None

    def run(self, job_id: str, job: list, tag: int, batch: list[int]) -> tuple[int, list]:
        if job_id != self.job_id:  # `job` = [ObjectRef]: in a list, so Ray hands it over unresolved
            import ray

            self.compute, self.job_id = build_compute(self.lm, ray.get(job[0])), job_id
        return tag, self.compute(batch)  # type: ignore[misc]

    def pid(self) -> int:
        return os.getpid()


def ray_module() -> Any:
    """The `ray` module, or one clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PlipyError("--ray needs Ray: pip install 'plipy[ray]'") from None
    return ray


PROBE_TIMEOUT_S = 10.0  # a cluster address that does not answer TCP within this is refused (Ray retries minutes)
LOOPBACK = "127.0.0.1"


def connect(cluster: Cluster) -> Any:
    """The `ray` module, connected (an existing connection is reused). An address is probed first (one line
    within seconds when nothing answers there); a local instance plipy starts listens on loopback only."""
    address = cluster.address or os.environ.get("RAY_ADDRESS") or None
    if address is None and "ray" not in sys.modules:
        # Ray decides a node's address when it is imported: on Linux the machine's network address, where every
        # server then listens. Loopback mode keeps a one-user local instance off the network.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = ray_module()
    if ray.is_initialized():
        return ray
    if address is not None:
        probe(address)
    import logging

    local = {} if address is not None else {"_node_ip_address": LOOPBACK}
    try:
        ray.init(
            address=cluster.address,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
            namespace=NAMESPACE,
            **local,
        )
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = address or "a local instance"
        raise PlipyError(f"ray: cannot connect to {where}: {str(e).splitlines()[0]}") from None
    if address is None:
        _check_loopback(ray)
    return ray


def probe(address: str) -> None:
    """PlipyError unless something accepts a TCP connection at a Ray address (`host:port`, `ray://host:port`);
    `auto` and other forms are left to Ray."""
    import socket

    host, port = _host_port(address)
    if host is None:
        return
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise PlipyError(
            f"ray: cannot connect to {address}: nothing answers at {host}:{port} ({why}); is the cluster up "
            "(`ray status` on its head node)?"
        ) from None


def _host_port(address: str) -> tuple[str | None, int]:
    """(host, port) of `host:port`, `[v6]:port` or `ray://host:port`; (None, 0) for anything else (`auto`)."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None, 0
    return host.strip("[]"), int(port)


def _check_loopback(ray: Any) -> None:
    """Refuse a local instance that listens on the network (Ray was imported before plipy could ask for loopback)."""
    host, _ = _host_port(ray.get_runtime_context().gcs_address)
    if host is not None and not host.startswith("127.") and host != "::1":
        ray.shutdown()
        raise PlipyError(
            f"ray: the local Ray instance would listen on {host}, not on loopback: Ray was imported before plipy "
            "started it; set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray, or start Ray yourself"
        )


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
    """`workers` actors, each holding the model `model` (load_model arguments); `map(job, batches)` yields
    `(k, results of batches[k])` as they finish. The actors are placed through one placement group (a bundle of
    CPUs/GPUs each, spread over nodes) and start loading at once; `ready()` waits for them."""

    def __init__(self, model: dict[str, Any], cluster: Cluster):
        import torch
        from ray.util import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self.ray = connect(cluster)
        self.n, gpus, cpus = _shape(ray, cluster.workers)
        self.cpus, self.gpus = cpus, gpus
        self.threads = cluster.threads or torch.get_num_threads()
        self.key = _key(ray, model, self.n, self.threads)
        # Ray's public way to learn whether actors can be placed at all: the group is ready once every bundle is.
        self.group = placement_group([{"CPU": cpus, **({"GPU": gpus} if gpus else {})}] * self.n, strategy="SPREAD")
        actor = ray.remote(_Worker)
        self.names = [f"plipy-{uuid.uuid4().hex[:8]}-{i}" for i in range(self.n)]
        self.actors = [
            actor.options(
                name=name,
                num_cpus=cpus,
                num_gpus=gpus,
                max_restarts=-1,
                max_task_retries=-1,
                namespace=NAMESPACE,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
            ).remote(model, _driver_env(), self.threads)
            for i, name in enumerate(self.names)
        ]
        self.address = ray.get_runtime_context().gcs_address
        self.pids: list[int] | None = None

    def ready(self) -> RayPool:
        """Wait until every actor holds its model. A spec a node cannot load fails as one line; so do actors the
        cluster cannot place (their placement group not ready after PLIPY_RAY_PLACE_GRACE s, default 30) and
        actors not started within PLIPY_RAY_START_TIMEOUT s (default 3600)."""
        if self.pids is not None:
            return self
        ray, t0 = self.ray, time.monotonic()
        grace = float(os.environ.get("PLIPY_RAY_PLACE_GRACE", "30"))
        limit = float(os.environ.get("PLIPY_RAY_START_TIMEOUT", "3600"))
        placed, _ = ray.wait([self.group.ready()], timeout=min(grace, limit))
        if not placed:
            self._fail_unplaced(limit if grace >= limit else None)
        refs = [a.pid.remote() for a in self.actors]
        try:
            _, waiting = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, limit - (time.monotonic() - t0)))
            if waiting:
                self._fail_unplaced(limit, len(waiting))
            self.pids = ray.get(refs)
        except ray.exceptions.RayActorError as e:
            self.close()
            raise PlipyError(f"ray: a worker could not start: {_last_line(e)}") from None
        return self

    def _fail_unplaced(self, limit: float | None, n: int | None = None) -> None:
        """Stop the pool and say why: past the start timeout (`limit`), or its placement group found no room."""
        free = self.ray.available_resources()
        self.close()
        if limit is not None:
            raise PlipyError(
                f"ray: {n or self.n} of {self.n} workers did not start within {limit:g} s "
                "(placed nowhere, or still loading the model): check `ray status`, or raise "
                "PLIPY_RAY_START_TIMEOUT if loading takes that long"
            )
        raise PlipyError(
            f"ray: {self.n} of {self.n} workers cannot be placed: each needs {self.cpus} CPU(s)"
            f"{f' and {self.gpus:g} GPU' if self.gpus else ''}, the cluster has "
            f"{free.get('CPU', 0):g} CPU(s) and {free.get('GPU', 0):g} GPU(s) free (another run's pool? "
            "plipy.cluster.shutdown() stops this process's); fewer --workers may fit"
        )

    def describe(self) -> dict[str, Any]:
        """For provenance: where the units ran."""
        return {
            "ray": self.ray.__version__,
            "address": self.address,
            "workers": self.n,
            "threads_per_worker": self.threads,
        }

    def map(self, job: Job, batches: Sequence[list[int]]) -> Iterator[tuple[int, list]]:
        """Every batch of `job` once, spread over the actors; results as they finish (callers restore the order)."""
        ray = self.ray
        self.ready()
        holder, job_id = [ray.put(job)], uuid.uuid4().hex  # the job's inputs travel once, not per batch
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
                flying[self.actors[a].run.remote(job_id, holder, k, list(batches[k]))] = (k, a)
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
        """Stop the actors and free their placement group (the Ray instance stays up for the next run)."""
        from ray.util import remove_placement_group

        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - already removed, or the connection is gone
            pass


# One warm pool per process: the next run on the same model (a sweep, a notebook) reuses its loaded actors, and a
# pool for another model first releases this one's CPUs and GPUs (two pools could starve each other).
_WARM: list[RayPool] = []


def pool_for(model: dict[str, Any], cluster: Cluster) -> RayPool:
    """The warm pool for these load arguments and this cluster shape, else a new one (the old one stopped)."""
    import torch

    ray = connect(cluster)
    n, _, _ = _shape(ray, cluster.workers)
    if _WARM and _WARM[0].key == _key(ray, model, n, cluster.threads or torch.get_num_threads()):
        return _WARM[0]
    shutdown()
    _WARM.append(RayPool(model, cluster))
    return _WARM[0]


def _key(ray: Any, model: dict[str, Any], n: int, threads: int) -> tuple:
    # the Ray job id: a new connection (another instance, a restarted one) has none of the old actors
    return json.dumps(model, sort_keys=True, default=str), n, threads, ray.get_runtime_context().get_job_id()


def shutdown() -> None:
    """Stop the warm actor pool (its workers hold the model: memory, GPUs). Runs again start a new one."""
    while _WARM:
        _WARM.pop().close()


@dataclass
class Execution:
    """Where an experiment's units run: `compute` here, or `pool` with `job`; pass it to `Units.batched`."""

    compute: Callable[[list[int]], list] | None
    pool: RayPool | None
    job: Job | None = None

    @property
    def remote(self) -> Execution | None:
        """Self when the units run on Ray (what `Units.batched(..., pool=)` takes), else None."""
        return self if self.pool is not None else None

    def map(self, batches: Sequence[list[int]]) -> Iterator[tuple[int, list]]:
        """`(k, results of batches[k])` as the workers finish them."""
        return self.pool.map(self.job, batches)  # type: ignore[union-attr,arg-type]

    def describe(self) -> dict[str, Any] | None:
        """The provenance `cluster` block (None for a local run)."""
        return None if self.pool is None else self.pool.describe()


def stamp(prov: dict[str, Any], where: dict[str, Any] | None) -> dict[str, Any]:
    """`prov` with a `cluster` block when the units ran on Ray."""
    if where is not None:
        prov["cluster"] = where
    return prov


@contextmanager
def executor(
    cluster: Cluster | None, lm: LoadedModel, load: dict[str, Any] | None, experiment: Any, plan: Any
) -> Iterator[Execution]:
    """Where `experiment`'s units run: here on `lm` with the driver's `plan`, or, with a `cluster`, on the warm pool
    for the driver's model spec (`load`: device and memory map), whose workers rebuild the plan on their model.
    A failed run stops the pool (its actors may be mid-batch); a finished one leaves it warm."""
    if cluster is None:
        yield Execution(lambda batch: experiment.compute(lm, plan, batch), None)
        return
    pool = pool_for(model_job_args(lm, load or {}), cluster)
    try:
        yield Execution(None, pool, Job(experiment, lm.provenance.get("weights_sha256")))
    except BaseException:
        shutdown()
        raise


def _last_line(e: Exception) -> str:
    """The cause of a Ray error in one line: the last line of the remote traceback it carries."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1].removeprefix("plipy.errors.PlipyError: ") if lines else type(e).__name__
