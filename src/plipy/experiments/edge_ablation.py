"""Mean and resample ablation of knockout's attention edges: what a sample's edges carry is set to another run's
value instead of removed.

For each knocked-out layer, head and query row of a sample's edge set, the row's *edge mass* — the total
post-softmax weight on the row's edge keys (the marker's attention to its targets, for `marker-to-targets`) — is
set to a value, and the row's other keys are rescaled in their own proportions to carry the rest (`EdgeEdit.mass`,
computed inside the edited run, so with several layers each is set on the run's own weights):

- `zero`: 0 — the knockout itself (plipy knocks out by −∞ before the softmax, which is the same function);
- `mean`: the edge mass averaged over the clean runs of the sample's own group (every usable sample's edge rows
  weighted equally), per layer and head;
- `resample`: the edge mass of another sample of the same group (a donor drawn with the seed among those with at
  least as many edge rows; the k-th row takes the donor's k-th), per layer and head.

The clean masses come from a phase before the knockout (`EdgeMasses`): one forward per sample that records the
edge rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plipy.corpus import Corpus, SamplePositions
from plipy.engine import EdgeEdit, Engine
from plipy.engine.batch import pad_id
from plipy.engine.runner import ConditionRunner
from plipy.errors import PlipyError
from plipy.finite import naming
from plipy.models import LoadedModel
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, length_batches

ABLATIONS = ("zero", "mean", "resample")

DESCRIPTIONS = {
    "zero": "the edges' weight set to 0, each row renormalised (the knockout itself)",
    "mean": (
        "each edited row's total weight on its edge keys set to that layer and head's mean over the clean runs of "
        "the sample's group (every usable sample's edge rows weighted equally); the row's other keys rescaled in "
        "their own proportions to carry the rest"
    ),
    "resample": (
        "each edited row's total weight on its edge keys set to the same layer, head and row (k-th edge row) of a "
        "donor's clean run, a sample of the same group drawn with the seed; the row's other keys rescaled in "
        "their own proportions to carry the rest"
    ),
}


def edge_rows(edges: Sequence[Sequence[int]]) -> list[int]:
    """The query rows of an edge set, in order: the rows whose mass an ablation sets."""
    return sorted({int(q) for q, _ in edges})


def row_masses(attn: dict[int, torch.Tensor], edges: Sequence[Sequence[int]], n_layers: int) -> np.ndarray:
    """The clean edge mass `[n_layers, heads, rows]` (float64; NaN at layers not captured) from captured rows
    `{layer: [heads, rows, keys]}`."""
    rows = edge_rows(edges)
    r = torch.tensor([rows.index(int(q)) for q, _ in edges])
    k = torch.tensor([int(k) for _, k in edges])
    n_heads = next(iter(attn.values())).shape[0]
    out = np.full((n_layers, n_heads, len(rows)), np.nan)
    for layer, a in attn.items():
        weights = a.double().cpu()[:, r, k]  # [heads, edges]: each edge's weight
        out[layer] = torch.zeros(n_heads, len(rows), dtype=torch.float64).index_add_(1, r, weights).numpy()
    return out


@dataclass
class EdgeMassPlan:
    samples: list[dict[str, Any]]
    positions: list[SamplePositions]
    runner: ConditionRunner


@dataclass
class EdgeMasses(Experiment[EdgeMassPlan, dict]):
    """The clean edge mass of every usable sample `[layers, heads, rows]`: what mean and resample ablation set.
    `samples`/`positions` are the knockout's own sample records (their edge sets and statuses)."""

    kind = "edge-masses"
    label = "clean edge masses"
    default_batch_size = 4

    corpus: Corpus
    samples: list[dict[str, Any]]
    positions: list[SamplePositions]
    edges: str = "marker-to-targets"
    layers: list[int] | None = None  # the layers the conditions edit (None: every layer)

    def plan(self, lm: LoadedModel) -> EdgeMassPlan:
        return EdgeMassPlan(self.samples, self.positions, ConditionRunner(lm.model, Engine(lm.model), path="naive"))

    def settings(self, lm: LoadedModel, plan: EdgeMassPlan, batch_size: int) -> Settings:
        config = {"edges": self.edges, "samples": [s["id"] for s in self.samples], "layers": self.layers}
        return Settings(config, corpus=self.corpus, key={"batch_size": batch_size})

    def work(self, plan: EdgeMassPlan, batch_size: int) -> Work:
        ok = [i for i, rec in enumerate(plan.samples) if rec["status"] == "ok"]
        lengths = [sp.seq_len for sp in plan.positions]
        return Work(length_batches(ok, lengths, batch_size), settled=len(plan.samples) - len(ok))

    def compute(self, lm: LoadedModel, plan: EdgeMassPlan, batch: list[int]) -> list[Unit]:
        rows = [edge_rows(plan.samples[i]["edges"]) for i in batch]
        with naming([f"sample {plan.samples[i]['id']!r}" for i in batch]):
            bases = plan.runner.baselines(
                [plan.positions[i].input_ids for i in batch],
                rows=rows,
                layers=self.layers,
                pad_token=pad_id(lm.tokenizer),
            )
        out: list[Unit] = []
        for i, base in zip(batch, bases, strict=True):
            assert base.attn is not None
            out.append(({}, {"mass": row_masses(base.attn, plan.samples[i]["edges"], lm.n_layers)}))
        return out

    def assemble(self, lm: LoadedModel, plan: EdgeMassPlan, units: dict[int, Unit], provenance: dict[str, Any]) -> dict:
        return {plan.samples[i]["id"]: units[i][1]["mass"] for i in sorted(units)}


@dataclass
class AblationValues:
    """Per usable sample, the mass its edge rows are set to `[layers, heads, rows]`; the group means (mean) or each
    sample's donor (resample), for the result."""

    values: dict[str, np.ndarray]
    means: dict[str, np.ndarray]
    donors: dict[str, str | None]


def ablation_values(
    kind: str, samples: list[dict[str, Any]], masses: dict[str, np.ndarray], seed: int
) -> AblationValues:
    """What `kind` (mean | resample) sets each usable sample's edge rows to, from the clean masses."""
    usable = [s for s in samples if s["status"] == "ok"]
    missing = [s["id"] for s in usable if s["id"] not in masses]
    if missing:
        raise PlipyError(f"no clean edge mass for sample(s) {', '.join(missing)}: run the EdgeMasses phase first")
    values: dict[str, np.ndarray] = {}
    means: dict[str, np.ndarray] = {}
    donors: dict[str, str | None] = {}
    rng = np.random.default_rng(seed)
    for group in dict.fromkeys(s["group"] for s in usable):
        members = [s["id"] for s in usable if s["group"] == group]
        if kind == "mean":
            # every edge row of every sample weighs alike: concatenate the rows, then average
            means[group] = np.concatenate([masses[i] for i in members], axis=2).mean(axis=2)
            for i in members:
                values[i] = np.repeat(means[group][:, :, None], masses[i].shape[2], axis=2)
            continue
        for i in members:
            n = masses[i].shape[2]
            fits = [j for j in members if j != i and masses[j].shape[2] >= n]
            donor = fits[int(rng.integers(len(fits)))] if fits else None
            donors[i] = donor
            if donor is not None:
                values[i] = masses[donor][:, :, :n]
    return AblationValues(values, means, donors)


def mass_edits(
    edges: Sequence[tuple[int, int]],
    layers: Sequence[int],
    heads: Sequence[int] | None,
    windows: list[int | None],
    values: np.ndarray,
) -> list[EdgeEdit]:
    """One sample's mass edits for one condition: per layer, each edge row set to `values[layer, head, row]` (the
    heads edited: `heads`, or all). Edges outside a sliding window are dropped as in knockout (the model's own
    mask gives them weight 0 in every run, so the row's mass is that of the edges kept)."""
    rows = edge_rows(edges)
    cols = list(range(values.shape[1])) if heads is None else list(heads)
    out = []
    for layer in layers:
        w = windows[layer]
        kept = [(q, k) for q, k in edges if w is None or q - k < w]
        if not kept:
            continue
        mass = torch.as_tensor(values[layer][cols][:, [rows.index(q) for q, _ in kept]].T.copy())
        out.append(EdgeEdit(layers=[layer], edges=kept, heads=heads, mass=mass))
    return out
