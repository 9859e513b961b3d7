"""Attention layer scan: how much the marker token attends to its targets, per layer and head, beside its nulls.

One forward per sample captures only the marker's query row at every scanned layer. Per sample and layer:
`attention` (PLIP's metric: mean over targets of the head-mean post-softmax weight, duplicates kept),
`attention_per_head`, `attention_per_target`, `first_token_share` (head-mean weight on token 0, the sink),
`uniform_null` = 1/(m+1) (uniform attention over the marker's causal prefix) and `excess` = attention/uniform_null.
PLIP-rs' headline ratio equals the ratio of uniform nulls; putting both side by side makes that visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plipy import stats
from plipy.corpus import Corpus, SamplePositions, token_positions
from plipy.engine import Engine
from plipy.errors import PlipyError
from plipy.experiments.samples import after_marker, choose_groups, identity, marker_rows
from plipy.finite import naming
from plipy.models import LoadedModel
from plipy.results import ScanResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, length_batches


def measure_sample(sp: SamplePositions, rows: torch.Tensor, heads: Sequence[int]) -> dict[str, Any]:
    """The per-sample measures from the captured marker rows `[layers, heads, keys]` (float32)."""
    targets = [t for t, bad in zip(sp.target_tokens, sp.unusable, strict=True) if t is not None and not bad]
    m = sp.marker_token
    assert m is not None  # measured samples have a marker token (sample_record)
    p = rows[:, list(heads)].double()  # [L, h, K]
    per_target = p[:, :, targets].mean(1)  # [L, T] head-mean weight on each target
    per_head = p[:, :, targets].mean(2)  # [L, h] target-mean per head
    attention = per_target.mean(1)
    uniform = 1.0 / (m + 1)
    return {
        "attention": attention.tolist(),
        "attention_per_head": per_head.tolist(),
        "attention_per_target": per_target.tolist(),
        "first_token_share": p[:, :, 0].mean(1).tolist(),
        "uniform_null": uniform,
        "excess": (attention / uniform).tolist(),
        "measured_targets": targets,
    }


def sample_record(sp: SamplePositions) -> dict[str, Any]:
    """Identity and token positions of one sample, and whether it can be measured."""
    rec = {
        **identity(sp),
        "target_texts": sp.target_texts,
        "targets_after_marker": after_marker(sp),
        "conversion": sp.conversion,
    }
    if any(sp.on_marker):  # only then: documents of corpora without such targets keep their bytes
        rec["targets_on_marker"] = [t for t, o in zip(sp.target_tokens, sp.on_marker, strict=True) if o]
    if sp.status == "failed":
        rec["status"] = "failed"
        rec["note"] = "marker or a target has no token"
    elif all(sp.after_marker):
        rec["status"] = "no-valid-targets"
        rec["note"] = "every target comes after the marker: attention to them is causally impossible"
    elif all(sp.unusable):
        rec["status"] = "no-valid-targets"
        rec["note"] = "every target is after the marker or on the marker's own token: no marker → target attention"
    else:
        rec["status"] = "ok" if not any(sp.unusable) else "partial-targets"
    return rec


def check_measurable(records: list[dict[str, Any]], pair: tuple[str, str]) -> None:
    """Refuse, before any forward, a scan whose compared groups cannot give statistics."""
    for g in pair:
        if sum(1 for r in records if r["group"] == g and r["status"] in ("ok", "partial-targets")) < 2:
            raise PlipyError(f"group {g!r} has fewer than 2 measurable samples: no statistics possible")


@dataclass
class ScanPlan:
    """Everything the units of a scan depend on, computed alike on the driver and on every Ray worker."""

    layers: list[int]
    heads: list[int]
    groups: list[str]
    pair: tuple[str, str]
    positions: list[SamplePositions]
    samples: list[dict[str, Any]]
    engine: Engine


@dataclass
class Scan(Experiment[ScanPlan, ScanResult]):
    """Scan every sample of the chosen groups: per-sample measures, per-layer statistics. `layers`/`heads` None =
    all; `groups` None = PLIP's two groups, else the first two given are compared."""

    kind = "scan"
    label = "scanning"

    corpus: Corpus
    groups: Sequence[str] | None = None
    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    bos: bool = False
    seed: int = 0
    n_resamples: int = 10000
    extra: dict[str, Any] = field(default_factory=dict)

    def plan(self, lm: LoadedModel) -> ScanPlan:
        layers = list(self.layers) if self.layers is not None else list(range(lm.n_layers))
        heads = list(self.heads) if self.heads is not None else list(range(lm.n_heads))
        groups, pair = choose_groups(self.corpus, self.groups)
        positions = [
            token_positions(s, lm.tokenizer, bos=self.bos, max_length=lm.max_positions)
            for s in self.corpus.samples(groups)
        ]
        samples = [sample_record(sp) for sp in positions]
        check_measurable(samples, pair)
        return ScanPlan(layers, heads, groups, pair, positions, samples, Engine(lm.model))

    def settings(self, lm: LoadedModel, plan: ScanPlan, batch_size: int) -> Settings:
        config = {
            "groups": plan.groups,
            "compared": list(plan.pair),
            "layers": plan.layers,
            "heads": plan.heads,
            "bos": self.bos,
            "n_resamples": self.n_resamples,
            "batch_size": batch_size,
            **self.extra,
        }
        return Settings(config, corpus=self.corpus, seed=self.seed)

    def work(self, plan: ScanPlan, batch_size: int) -> Work:
        measurable = [i for i, rec in enumerate(plan.samples) if rec["status"] in ("ok", "partial-targets")]
        lengths = [sp.seq_len for sp in plan.positions]
        return Work(length_batches(measurable, lengths, batch_size), settled=len(plan.samples) - len(measurable))

    def compute(self, lm: LoadedModel, plan: ScanPlan, batch: list[int]) -> list[Unit]:
        sps = [plan.positions[i] for i in batch]
        with naming([f"sample {sp.sample.id!r}" for sp in sps]):
            rows = marker_rows(lm, plan.engine, sps, plan.layers)
        return [(measure_sample(sp, r, plan.heads), {"rows": r.numpy()}) for sp, r in zip(sps, rows, strict=True)]

    def assemble(
        self, lm: LoadedModel, plan: ScanPlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> ScanResult:
        samples = plan.samples
        rows_by_id: dict[str, np.ndarray] = {}
        ids_by_id: dict[str, list[int]] = {}
        for i, (value, arrays) in units.items():  # in computed (batch) order: the rows file keeps that order
            samples[i].update(value)
            sid = plan.positions[i].sample.id
            rows_by_id[sid] = arrays["rows"]
            ids_by_id[sid] = list(plan.positions[i].input_ids)  # decoded only for the token plot
        result: dict[str, Any] = {
            "provenance": provenance,
            "groups_compared": list(plan.pair),
            "layers_scanned": plan.layers,
            "heads": plan.heads,
            "samples": samples,
        }
        result.update(
            layer_statistics(samples, plan.groups, plan.pair, plan.layers, plan.heads, self.seed, self.n_resamples)
        )
        result["plip_compat"] = plip_compat(result, lm, self.corpus)
        return ScanResult(result, extras={"rows": rows_by_id, "input_ids": ids_by_id, "tokenizer": lm.tokenizer})


def _values(samples: list[dict], group: str, key: str, i: int) -> list[float]:
    return [s[key][i] for s in samples if s["group"] == group and key in s]


def layer_statistics(
    samples: list[dict],
    groups: list[str],
    pair: tuple[str, str],
    layers: list[int],
    heads: list[int],
    seed: int,
    n_resamples: int,
) -> dict[str, Any]:
    """Per-layer group statistics on `attention` and on `excess`, per-head tests, best layers."""
    ga, gb = pair
    measured = [s for s in samples if "attention" in s]
    for g in pair:
        if sum(1 for s in measured if s["group"] == g) < 2:
            raise PlipyError(f"group {g!r} has fewer than 2 measurable samples: no statistics possible")
    null = {g: stats.describe([s["uniform_null"] for s in measured if s["group"] == g]) for g in groups}
    null_ratio = stats.plip_ratio(null[ga]["mean"], null[gb]["mean"])
    att = stats.compare_conditions(
        [(_values(measured, ga, "attention", i), _values(measured, gb, "attention", i)) for i in range(len(layers))],
        seed=seed,
        n_resamples=n_resamples,
        names=pair,
    )
    exc = stats.compare_conditions(
        [(_values(measured, ga, "excess", i), _values(measured, gb, "excess", i)) for i in range(len(layers))],
        seed=seed,
        n_resamples=n_resamples,
        names=pair,
    )
    rows = []
    for i, layer in enumerate(layers):
        row = {"layer": layer, **att[i]}
        # every group (a third group is described, not tested)
        row["groups"] = {g: stats.describe(_values(measured, g, "attention", i)) for g in groups}
        row["first_token_share"] = {
            g: stats.describe(_values(measured, g, "first_token_share", i))["mean"] for g in groups
        }
        row["null_ratio"] = null_ratio
        row["excess"] = exc[i]
        rows.append(row)
    best_plip, best_plip_p = stats.best_condition_plip(att)
    best_corr, best_corr_p = stats.best_condition_corrected(att)
    best_exc, best_exc_p = stats.best_condition_corrected(exc)
    ha = np.array([s["attention_per_head"] for s in measured if s["group"] == ga])
    hb = np.array([s["attention_per_head"] for s in measured if s["group"] == gb])
    per_head = stats.per_head_welch(ha, hb)
    return {
        "uniform_null": null,
        "null_ratio": null_ratio,
        "layers": rows,
        "best": {
            "plip_rule": {"layer": None if best_plip is None else layers[best_plip], "p": best_plip_p},
            "holm": {"layer": None if best_corr is None else layers[best_corr], "p_holm": best_corr_p},
            "excess_holm": {"layer": None if best_exc is None else layers[best_exc], "p_holm": best_exc_p},
        },
        "per_head": {
            "layers": layers,
            "heads": heads,
            "mean_diff": (ha.mean(0) - hb.mean(0)).tolist(),
            "t": per_head["t"],
            "p": per_head["p"],
            "p_bh": per_head["p_bh"],
        },
    }


def plip_compat(result: dict, lm: LoadedModel, corpus: Corpus) -> dict[str, Any]:
    """PLIP-rs' own `layer_scan_universal` JSON fields (first compared group as "python", second as "rust")."""
    ga, gb = result["groups_compared"]
    samples = [s for s in result["samples"] if s["group"] in (ga, gb)]
    best = result["best"]["plip_rule"]
    return {
        "model": lm.spec,
        "corpus_format": f"universal_v{corpus.format_version}",
        "n_layers": lm.n_layers,
        "scanned_layers": result["layers_scanned"],
        "best_layer": best["layer"] if best["layer"] is not None else 0,
        "best_p_value": best["p"],
        "position_conversion_stats": {
            "total_samples": len(samples),
            "successful_conversions": sum(1 for s in samples if "attention" in s),
            "failed_conversions": sum(1 for s in samples if s["status"] == "failed"),
            "fuzzy_matches": sum(1 for s in samples if s["conversion"] == "fallback"),
        },
        "results": [
            {
                "layer": r["layer"],
                "python_mean": r["groups"][ga]["mean"],
                "python_std": r["groups"][ga]["std"],
                "python_n": r["groups"][ga]["n"],
                "rust_mean": r["groups"][gb]["mean"],
                "rust_std": r["groups"][gb]["std"],
                "rust_n": r["groups"][gb]["n"],
                "ratio": r["ratio"],
                "t_statistic": r["t"],
                "df": r["df"],
                "p_value": r["p"],
            }
            for r in result["layers"]
        ],
    }
