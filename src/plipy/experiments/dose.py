"""Steering dose-response: per dose α and sample, the next-token KL and the attention the steered row achieves.

Per dose α and sample: KL(P_base ‖ P_steered) at the last input position (float64, as knockout) and
`attention_achieved`, PLIP's metric on the steered rows of the steered layer(s) (their mean over layers when several
are steered). All doses of a sample run as one batch on the cached baseline (`ConditionRunner`). Target attention:
per sample the α whose `attention_achieved` equals v, solved exactly on the baseline row, then verified by the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from plipy import divergence, stats
from plipy.corpus import Corpus
from plipy.engine import Capture, Engine
from plipy.engine.batch import pad_id
from plipy.engine.runner import Baseline, ConditionRunner, Outcome
from plipy.experiments.edge_steering import (
    DOSES,
    SteerSample,
    attention_metric,
    edge_edits,
    excluded,
    prepare,
    scale_for_attention,
)
from plipy.finite import naming
from plipy.results import DoseResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, length_batches

if TYPE_CHECKING:
    from plipy.models import LoadedModel

TARGET_TOLERANCE = 1e-4  # a target-attention run must land this close to v


@dataclass
class DosePlan:
    """The steerable samples and the runner that evaluates their doses on each cached baseline."""

    samples: list[SteerSample]
    runner: ConditionRunner


@dataclass
class Dose(Experiment[DosePlan, DoseResult]):
    """Every dose (and the `target_attention` v, if asked: one layer only) on every steerable sample of `groups`,
    steering `layers` on `heads` (None = all). `runner`: a `ConditionRunner` to reuse (this process only; Ray
    workers build their own from `path` and `max_batch`)."""

    kind = "dose"
    label = "steering"

    corpus: Corpus
    layers: list[int]
    groups: Sequence[str] = ("rust_test",)
    doses: Sequence[float] = DOSES
    heads: list[int] | None = None
    target_attention: float | None = None
    bos: bool = False
    skip_invalid: bool = False
    path: str = "auto"
    max_batch: int = 32
    top_k: int = 5
    runner: ConditionRunner | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.doses = [float(d) for d in self.doses]

    def local_only(self) -> tuple[str, ...]:
        return ("runner",)

    def plan(self, lm: LoadedModel) -> DosePlan:
        samples = prepare(lm, self.corpus, list(self.groups), self.bos, self.skip_invalid)
        runner = self.runner or ConditionRunner(lm.model, Engine(lm.model), path=self.path, max_batch=self.max_batch)
        return DosePlan(samples, runner)

    def settings(self, lm: LoadedModel, plan: DosePlan, batch_size: int) -> Settings:
        config = {
            "command": "steer dose",
            "groups": list(self.groups),
            "layers": self.layers,
            "doses": self.doses,
            "heads": self.heads if self.heads is not None else list(range(lm.n_heads)),
            "target_attention": self.target_attention,
            "bos": self.bos,
            "skip_invalid": self.skip_invalid,
            "top_k": self.top_k,
            "mechanism": "post-softmax ×α on marker→target edges of the chosen heads and layers, row renormalised "
            "(≡ +log α pre-softmax); a duplicated target is one edge",
            "kl": "KL(P_base || P_steered), nats, last input position, full vocabulary, float64, all terms",
            "attention_achieved": "mean over targets (duplicates kept) of the head-mean (all heads) post-softmax "
            "weight of the steered marker row; several layers: the mean over the layers",
            "batch_size": batch_size,
            **self.extra,
        }
        # the runner path is in the key: fast and naive agree to rounding, not bit for bit
        return Settings(
            config, corpus=self.corpus, key={"runner": self.path}, described={"runner": plan.runner.describe()}
        )

    def work(self, plan: DosePlan, batch_size: int) -> Work:
        ok = [i for i, s in enumerate(plan.samples) if s.status == "ok"]
        lengths = [s.positions.seq_len for s in plan.samples]
        return Work(length_batches(ok, lengths, batch_size), settled=len(plan.samples) - len(ok))

    def compute(self, lm: LoadedModel, plan: DosePlan, batch: list[int]) -> list[Unit]:
        sps = [plan.samples[i].positions for i in batch]
        with naming([f"sample {plan.samples[i].id!r}" for i in batch]):
            bases = plan.runner.baselines(
                [sp.input_ids for sp in sps],
                rows=[[plan.samples[i].marker] for i in batch],
                layers=self.layers,
                pad_token=pad_id(lm.tokenizer),
            )
        out: list[Unit] = []
        for i, b in zip(batch, bases, strict=True):
            with naming(f"sample {plan.samples[i].id!r}"):
                out.append((list(self.dose_sample(lm, plan.runner, plan.samples[i], b)), {}))
        return out

    def dose_sample(
        self, lm: LoadedModel, runner: ConditionRunner, s: SteerSample, base: Baseline
    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
        """One steerable sample from its baseline (marker rows captured at the steered layers): its record, one
        measure row per dose, and the target-attention row (or None)."""
        layers, heads, v = self.layers, self.heads, self.target_attention
        m = s.marker
        assert base.attn is not None, "the baselines captured the marker rows"
        base_rows = {layer: base.attn[layer][:, 0].cpu() for layer in layers}
        base_att = [attention_metric(base_rows[layer], s.targets) for layer in layers]
        rec = {
            "id": s.id,
            "group": s.group,
            "n_tokens": s.positions.seq_len,
            "marker_token": m,
            "targets": s.targets,
            "edges": [list(e) for e in s.edges],
            "attention_baseline": float(np.mean(base_att)),
            "attention_baseline_per_layer": base_att,
        }
        conds = [edge_edits(s, layers, d, heads) for d in self.doses]
        t_alpha, t_note = None, None
        if v is not None:
            t_alpha, t_note = scale_for_attention(base_rows[layers[0]], s.targets, [k for _, k in s.edges], v, heads)
            if t_alpha is not None:
                conds.append(edge_edits(s, layers, t_alpha, heads))
        outs = runner.run(base, conds, capture=Capture(rows=[m], layers=layers))
        rows = [self.measure(s, out, base, lm.tokenizer) for out in outs[: len(self.doses)]]
        if v is None:
            return rec, rows, None
        if t_alpha is None:
            unreachable = {"id": s.id, "group": s.group, "scale": None, "kl": None, "attention_achieved": None}
            return rec, rows, {**unreachable, "status": "unreachable", "note": t_note}
        trow = {"scale": t_alpha, **self.measure(s, outs[-1], base, lm.tokenizer)}
        if trow["status"] == "ok" and abs(trow["attention_achieved"] - v) > TARGET_TOLERANCE:
            trow["status"], trow["note"] = "missed", f"achieved {trow['attention_achieved']:.6g}, asked {v:g}"
        return rec, rows, trow

    def measure(self, s: SteerSample, out: Outcome, base: Baseline, tokenizer: Any) -> dict[str, Any]:
        """One steered run's row: KL against the baseline, attention achieved per steered layer and their mean."""
        row: dict[str, Any] = {"id": s.id, "group": s.group}
        if out.logits is None:
            row.update(kl=None, attention_achieved=None, status=out.status, note=out.note)
            return row
        assert out.attn is not None, "the run captured the marker rows"
        per_layer = [attention_metric(out.attn[layer][:, 0], s.targets) for layer in self.layers]
        row.update(
            status="ok",
            attention_achieved=float(np.mean(per_layer)),
            attention_achieved_per_layer=per_layer,
            **divergence.compare_logits(base.logits, out.logits, tokenizer, self.top_k),
        )
        if out.status == "identity":
            row["note"] = "identity: scale 1 (or no heads) is the baseline computation, KL exactly 0"
        return row

    def assemble(
        self, lm: LoadedModel, plan: DosePlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> DoseResult:
        v = self.target_attention
        dose_runs: list[dict[str, Any]] = [{"scale": d, "samples": []} for d in self.doses]
        target_run: dict[str, Any] | None = {"target_attention": v, "samples": []} if v is not None else None
        sample_recs = []
        for i in sorted(units):  # in sample order, whatever the batches
            rec, rows, trow = units[i][0]
            sample_recs.append(rec)
            for run, row in zip(dose_runs, rows, strict=True):
                run["samples"].append(row)
            if target_run is not None:
                target_run["samples"].append(trow)
        for run in dose_runs:
            run.update(summary(run["samples"]))
        if target_run is not None:
            target_run.update(summary(target_run["samples"]))
            scales = [r["scale"] for r in target_run["samples"] if r["status"] == "ok"]
            target_run["mean_scale"] = float(np.mean(scales)) if scales else None
        provenance["config"]["runner"] = plan.runner.describe()  # its counters, now that it has run
        result = {
            "provenance": provenance,
            "layers": self.layers,
            "heads": self.heads if self.heads is not None else list(range(lm.n_heads)),
            "groups": list(self.groups),
            "samples": sample_recs,
            "excluded": excluded(plan.samples),
            "doses": dose_runs,
            "monotonicity": monotonicity(dose_runs),
        }
        if target_run is not None:
            result["target"] = target_run
        return DoseResult(result)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A dose's group statistics over its ok samples: mean and std of KL and of the attention achieved, n."""
    ok = [r for r in rows if r["status"] == "ok"]
    kl = stats.describe([r["kl"] for r in ok]) if ok else {"mean": None, "std": None}
    att = [r["attention_achieved"] for r in ok]
    return {
        "mean_kl": kl["mean"],
        "std_kl": kl["std"],
        "mean_attention_achieved": float(np.mean(att)) if att else None,
        "std_attention_achieved": float(np.std(att, ddof=1)) if len(att) > 1 else None,
        "n": len(ok),
    }


def monotonicity(dose_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the group mean move the right way with the dose? Attention achieved must rise with α; KL is 0 at
    α = 1 and should rise with |log α| on each side (it need not be monotone in α itself)."""
    if sum(1 for r in dose_runs if r["n"]) < 2:  # one dose shows no trend: say so rather than "True"
        return {
            "scales": [r["scale"] for r in dose_runs if r["n"]],
            "attention_increasing": None,
            "kl_increasing_above_1": None,
            "kl_increasing_below_1": None,
            "samples_attention_increasing": None,
            "note": "fewer than two doses: no monotonicity to judge",
        }
    runs = sorted((r for r in dose_runs if r["n"]), key=lambda r: r["scale"])
    att = [r["mean_attention_achieved"] for r in runs]
    above = [r["mean_kl"] for r in runs if r["scale"] >= 1]
    below = [r["mean_kl"] for r in runs if r["scale"] <= 1][::-1]
    per_sample_ok = 0
    ids = {s["id"] for r in runs for s in r["samples"] if s["status"] == "ok"}
    for sid in ids:
        vals = [s["attention_achieved"] for r in runs for s in r["samples"] if s["id"] == sid and s["status"] == "ok"]
        per_sample_ok += all(b >= a for a, b in zip(vals, vals[1:], strict=False))
    return {
        "scales": [r["scale"] for r in runs],
        "attention_increasing": all(b >= a for a, b in zip(att, att[1:], strict=False)),
        "kl_increasing_above_1": all(b >= a for a, b in zip(above, above[1:], strict=False)),
        "kl_increasing_below_1": all(b >= a for a, b in zip(below, below[1:], strict=False)),
        "samples_attention_increasing": f"{per_sample_ok}/{len(ids)}",
    }
