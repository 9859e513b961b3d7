"""The protocol every experiment implements: plan → units → compute(batch of units) → assemble.

An experiment object holds its inputs and settings (a corpus, prompts, a config: data, never model weights) and is
pickled as it is to Ray workers, which rebuild its plan on their own model. The runtime's driver
(`plipy.runtime.driver.execute`) does everything else: batch size, checkpoints and resume, local or Ray execution,
progress, provenance and timing.

    class Scan(Experiment[ScanPlan, ScanResult]):
        kind, label = "scan", "scanning"
        def plan(self, lm): ...            # token positions, sample records: the same bits on every process
        def settings(self, lm, plan, batch_size): ...   # what shapes the numbers (resume key, provenance config)
        def work(self, plan, batch_size): ...          # which units run, in which batches
        def compute(self, lm, plan, batch): ...        # one model forward → one unit per item of the batch
        def assemble(self, lm, plan, units, provenance): ...   # the units, in order → statistics → a Result
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np

from plipy.engine.batch import plan_batches

if TYPE_CHECKING:
    from plipy.corpus import Corpus
    from plipy.models import LoadedModel

PlanT = TypeVar("PlanT")
ResultT = TypeVar("ResultT")

# A finished unit: a JSON-able value and named arrays (the checkpoint keeps both, bit for bit).
Unit = tuple[Any, dict[str, np.ndarray]]
# `start(description, total) -> step()`: the progress callback of the Python API and the CLI's bars.
Progress = Callable[[str, int], Callable[..., None]]


@dataclass
class Settings:
    """What shapes a run's numbers. `config` is the provenance `config` and, with `corpus`, `seed` and `key`, the
    checkpoint key (equal settings may share finished units); `described` is added to the provenance config only
    (descriptions of how it ran that do not change the numbers)."""

    config: dict[str, Any]
    corpus: Corpus | None = None
    seed: int | None = None
    key: dict[str, Any] = field(default_factory=dict)
    described: dict[str, Any] = field(default_factory=dict)


@dataclass
class Work:
    """The units to compute, batch by batch (one batch: one model forward's worth), and how many units need no
    computing (a status settled by the plan): they advance the progress bar at once."""

    batches: list[list[int]]
    settled: int = 0

    @property
    def total(self) -> int:
        return self.settled + sum(len(b) for b in self.batches)


def length_batches(indices: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """`indices` in deterministic batches of similar token length (`lengths[i]` of unit i), at most `batch_size`
    inputs each: the one batching rule of left-padded forwards (`plipy.engine.batch.plan_batches`)."""
    return [[indices[j] for j in b] for b in plan_batches([lengths[i] for i in indices], batch_size)]


def chunks(indices: list[int], size: int) -> list[list[int]]:
    """`indices` in consecutive batches of `size`."""
    return [indices[k : k + size] for k in range(0, len(indices), size)]


class Experiment(ABC, Generic[PlanT, ResultT]):
    """One experiment on the runtime. Subclasses are dataclasses of their inputs and settings."""

    kind: ClassVar[str]  # checkpoint folder prefix and the result's provenance kind
    label: ClassVar[str]  # the progress bar's description
    # inputs per forward when the caller gives none: None = the device's default (`default_batch_size`)
    default_batch_size: ClassVar[int | None] = None

    @abstractmethod
    def plan(self, lm: LoadedModel) -> PlanT:
        """Everything the units depend on, computed alike by the driver and by every Ray worker (deterministic)."""

    @abstractmethod
    def settings(self, lm: LoadedModel, plan: PlanT, batch_size: int) -> Settings:
        """What shapes the numbers: the checkpoint key and the provenance config."""

    @abstractmethod
    def work(self, plan: PlanT, batch_size: int) -> Work:
        """Which units to compute, in which batches."""

    @abstractmethod
    def compute(self, lm: LoadedModel, plan: PlanT, batch: list[int]) -> list[Unit]:
        """One batch of units on this process' model, in the batch's order (the same inputs in the same batch give
        the same bits, so a resumed or a distributed run matches an uninterrupted local one)."""

    @abstractmethod
    def assemble(self, lm: LoadedModel, plan: PlanT, units: dict[int, Unit], provenance: dict[str, Any]) -> ResultT:
        """The result from every computed unit (index → unit, in the order the batches ran) and the run's
        provenance block."""

    def local_only(self) -> tuple[str, ...]:
        """Fields not sent to Ray workers (objects tied to this process, e.g. a runner holding the model)."""
        return ()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self.local_only():
            state[name] = None
        return state
