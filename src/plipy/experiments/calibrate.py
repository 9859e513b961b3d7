"""Steering calibration: two groups' baseline attention at one layer, their ratio, and the α that closes the gap.

Per sample the baseline metric at layer L (PLIP's: mean over targets of the head-mean post-softmax weight of the
marker row; one forward capturing only that row), per-group means, their ratio, and the α whose steered mean of
group B equals group A's mean — exact on B's baseline rows (`edge_steering.achieved_fn`), no steered run needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plipy import stats
from plipy.corpus import Corpus
from plipy.engine import Engine
from plipy.errors import PlipyError
from plipy.experiments.edge_steering import (
    DOSES,
    SteerSample,
    achieved_fn,
    attention_metric,
    excluded,
    prepare,
    scale_for_attention,
    scale_for_group,
)
from plipy.experiments.samples import marker_rows
from plipy.finite import naming
from plipy.models import LoadedModel
from plipy.results import CalibrateResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, length_batches


@dataclass
class CalibratePlan:
    """The steerable samples of both groups and the engine that captures their marker rows."""

    samples: list[SteerSample]
    engine: Engine


@dataclass
class Calibrate(Experiment[CalibratePlan, CalibrateResult]):
    """Baseline attention at `layer` per sample of `groups` (A, B), the ratio, and the scale that brings B to A."""

    kind = "calibrate"
    label = "calibrating"

    corpus: Corpus
    layer: int
    groups: Sequence[str] = ("python_doctest", "rust_test")
    bos: bool = False
    skip_invalid: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def plan(self, lm: LoadedModel) -> CalibratePlan:
        samples = prepare(lm, self.corpus, list(self.groups), self.bos, self.skip_invalid)
        for g in self.groups:  # known from the tokens alone: refused before any forward
            if not any(s.group == g and s.status == "ok" for s in samples):
                raise PlipyError(f"group {g!r} has no steerable sample: nothing to calibrate")
        return CalibratePlan(samples, Engine(lm.model))

    def settings(self, lm: LoadedModel, plan: CalibratePlan, batch_size: int) -> Settings:
        config = {
            "command": "steer calibrate",
            "layer": self.layer,
            "groups": list(self.groups),
            "bos": self.bos,
            "skip_invalid": self.skip_invalid,
            "metric": "mean over targets (duplicates kept) of the head-mean post-softmax weight of the marker row",
            "scale_rule": "the α whose steered mean of group B equals group A's mean (exact on B's baseline rows)",
            "batch_size": batch_size,
            **self.extra,
        }
        return Settings(config, corpus=self.corpus)

    def work(self, plan: CalibratePlan, batch_size: int) -> Work:
        ok = [i for i, s in enumerate(plan.samples) if s.status == "ok"]
        lengths = [s.positions.seq_len for s in plan.samples]
        return Work(length_batches(ok, lengths, batch_size), settled=len(plan.samples) - len(ok))

    def compute(self, lm: LoadedModel, plan: CalibratePlan, batch: list[int]) -> list[Unit]:
        with naming([f"sample {plan.samples[i].id!r}" for i in batch]):
            got = marker_rows(lm, plan.engine, [plan.samples[i].positions for i in batch], [self.layer])
        return [(None, {"row": r[0].numpy()}) for r in got]

    def assemble(
        self, lm: LoadedModel, plan: CalibratePlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> CalibrateResult:
        samples = plan.samples
        ga, gb = self.groups
        recs: list[dict[str, Any]] = [{"id": s.id, "group": s.group, "status": s.status} for s in samples]
        for s, rec in zip(samples, recs, strict=True):
            if s.status != "ok":
                rec["note"] = s.note
        rows: dict[str, torch.Tensor] = {}
        for i, (_, arrays) in units.items():
            s, m = samples[i], samples[i].marker
            rows[s.id] = torch.from_numpy(arrays["row"])
            recs[i].update(
                marker_token=m,
                targets=s.targets,
                attention=attention_metric(rows[s.id], s.targets),
                uniform_null=1.0 / (m + 1),
            )
        ok = {g: [r for r in recs if r["group"] == g and r["status"] == "ok"] for g in (ga, gb)}
        desc = {g: stats.describe([r["attention"] for r in ok[g]]) for g in (ga, gb)}
        ma, mb = desc[ga]["mean"], desc[gb]["mean"]
        by_id = {s.id: s for s in samples}
        b_samples = [by_id[r["id"]] for r in ok[gb]]
        b_rows = [rows[s.id] for s in b_samples]
        b_targets = [s.targets for s in b_samples]
        b_keys = [[k for _, k in s.edges] for s in b_samples]
        # The rule: the α whose steered mean over B equals mean(A), exactly on B's baseline rows (layer L only).
        group_scale = scale_for_group(b_rows, b_targets, b_keys, ma)
        for r, s in zip(ok[gb], b_samples, strict=True):
            alpha, why = scale_for_attention(rows[s.id], s.targets, [k for _, k in s.edges], ma)
            r["scale_to_a"] = alpha
            if why:
                r["scale_note"] = why
        steered = [achieved_fn(r, t, k, None)[0] for r, t, k in zip(b_rows, b_targets, b_keys, strict=True)]
        return CalibrateResult(
            {
                "provenance": provenance,
                "layer": self.layer,
                "groups_compared": [ga, gb],
                "samples": recs,
                "excluded": excluded(samples),
                "groups": desc,
                "ratio": ma / mb if mb else None,
                "scale_to_a": group_scale,
                "scale_plip": stats.plip_ratio(ma, mb) if mb > 1e-10 else 1.0,
                "recommended_target": ma,
                "dose_table": [
                    {"scale": d, "plip_attention": d * mb, "attention": float(np.mean([f(d) for f in steered]))}
                    for d in DOSES
                ],
            }
        )
