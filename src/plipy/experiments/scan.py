"""Attention layer scan: how much the marker token attends to its targets, per layer and head, beside its nulls.

One forward per sample captures only the marker's query row at every scanned layer. Per sample and layer:
`attention` (PLIP's metric: mean over targets of the head-mean post-softmax weight, duplicates kept),
`attention_per_head`, `attention_per_target`, `first_token_share` (head-mean weight on token 0, the sink),
`uniform_null` = 1/(m+1) (uniform attention over the marker's causal prefix) and `excess` = attention/uniform_null.
PLIP-rs' headline ratio equals the ratio of uniform nulls; putting both side by side makes that visible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plipy import checkpoint, provenance, stats
from plipy.corpus import Corpus, SamplePositions, token_positions
from plipy.engine import Capture, Engine
from plipy.engine.batch import default_batch_size, pad_id, pad_left, plan_batches
from plipy.engine.runner import last_logits_only
from plipy.errors import PlipyError
from plipy.finite import naming, require_finite
from plipy.results import ScanResult

DEFAULT_GROUPS = ("python_doctest", "rust_test")


@dataclass
class ScanConfig:
    """What to scan. `layers`/`heads` None = all; `groups` None = PLIP's two groups, else the first two."""

    groups: Sequence[str] | None = None
    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    bos: bool = False
    seed: int = 0
    n_resamples: int = 10000
    extra: dict = field(default_factory=dict)
    resume: bool = True  # keep finished samples on disk until the result is complete (plipy.checkpoint)
    fresh: bool = False  # discard what an interrupted run with the same settings left
    batch_size: int | None = None  # samples per forward (None: plipy.engine.batch.default_batch_size)


def choose_groups(corpus: Corpus, groups: Sequence[str] | None) -> tuple[list[str], tuple[str, str]]:
    """All groups to measure, and the two the test compares (each needs ≥ 2 samples: checked here, before any
    model loads)."""
    chosen, pair = _choose_groups(corpus, groups)
    for g in pair:
        if len(corpus.groups[g]) < 2:
            raise PlipyError(
                f"group {g!r} has {len(corpus.groups[g])} sample(s): comparing groups needs at least 2 "
                "each; add samples or name other --groups"
            )
    return chosen, pair


def _choose_groups(corpus: Corpus, groups: Sequence[str] | None) -> tuple[list[str], tuple[str, str]]:
    names = corpus.group_names
    if groups:
        unknown = [g for g in groups if g not in names]
        if unknown:
            raise PlipyError(f"unknown group(s) {', '.join(unknown)}; the corpus has: {', '.join(names)}")
        if len(groups) < 2:
            raise PlipyError("name at least two groups to compare")
        return list(groups), (groups[0], groups[1])
    if all(g in names for g in DEFAULT_GROUPS):
        return list(DEFAULT_GROUPS), DEFAULT_GROUPS
    if len(names) < 2:
        raise PlipyError(f"the corpus has {len(names)} group(s); a scan compares two")
    return names, (names[0], names[1])


def measure_sample(sp: SamplePositions, rows: torch.Tensor, heads: Sequence[int]) -> dict[str, Any]:
    """The per-sample measures from the captured marker rows `[layers, heads, keys]` (float32)."""
    targets = [t for t, after in zip(sp.target_tokens, sp.after_marker, strict=True) if t is not None and not after]
    m = sp.marker_token
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


def identity(sp: SamplePositions) -> dict[str, Any]:
    """The fields that name a sample and its token positions in every result."""
    return {
        "id": sp.sample.id,
        "group": sp.sample.group,
        "n_tokens": sp.seq_len,
        "marker_token": sp.marker_token,
        "marker_text": sp.marker_text,
        "target_tokens": sp.target_tokens,
    }


def after_marker(sp: SamplePositions) -> list[int | None]:
    """The target tokens that come after the marker (causally unreachable from it)."""
    return [t for t, a in zip(sp.target_tokens, sp.after_marker, strict=True) if a]


def sample_record(sp: SamplePositions) -> dict[str, Any]:
    """Identity and token positions of one sample, and whether it can be measured."""
    rec = {
        **identity(sp),
        "target_texts": sp.target_texts,
        "targets_after_marker": after_marker(sp),
        "conversion": sp.conversion,
    }
    if sp.status == "failed":
        rec["status"] = "failed"
        rec["note"] = "marker or a target has no token"
    elif all(sp.after_marker):
        rec["status"] = "no-valid-targets"
        rec["note"] = "every target comes after the marker: attention to them is causally impossible"
    else:
        rec["status"] = "ok" if not any(sp.after_marker) else "partial-targets"
    return rec


def marker_rows(lm: Any, engine: Engine, sps: Sequence[SamplePositions], layers: Sequence[int]) -> list[torch.Tensor]:
    """Each sample's marker row at every scanned layer, `[layers, heads, keys]` float32 on the CPU, from one
    left-padded forward (only the last position's logits are computed: the scan needs none)."""
    padded = pad_left([sp.input_ids for sp in sps], pad_id(lm.tokenizer), lm.device)
    with (
        torch.inference_mode(),
        engine.run(capture=Capture(rows=padded.shift([[sp.marker_token] for sp in sps]), layers=layers)) as cap,
    ):
        out = lm.model(padded.ids, **padded.forward_kwargs(), **last_logits_only(lm.model))
    # A NaN in a layer no row is captured from (SDPA there) shows up in the logits: a broken model, not a result.
    require_finite(out.logits[:, -1], "the next-token logits")
    att = torch.stack([cap.attn[layer][:, :, 0] for layer in layers], 1).cpu()  # [B, L, H, T]
    return [att[i, :, :, pad:] for i, pad in enumerate(padded.pads)]


def check_measurable(records: list[dict[str, Any]], pair: tuple[str, str]) -> None:
    """Refuse, before any forward, a scan whose compared groups cannot give statistics."""
    for g in pair:
        if sum(1 for r in records if r["group"] == g and r["status"] in ("ok", "partial-targets")) < 2:
            raise PlipyError(f"group {g!r} has fewer than 2 measurable samples: no statistics possible")


@dataclass
class _Plan:
    """Everything the units of a scan depend on, computed alike on the driver and on every Ray worker."""

    layers: list[int]
    heads: list[int]
    groups: list[str]
    pair: tuple[str, str]
    settings: dict[str, Any]
    positions: list[SamplePositions]
    samples: list[dict[str, Any]]


def _plan(lm: Any, corpus: Corpus, config: ScanConfig) -> _Plan:
    layers = list(config.layers) if config.layers is not None else list(range(lm.n_layers))
    heads = list(config.heads) if config.heads is not None else list(range(lm.n_heads))
    groups, pair = choose_groups(corpus, config.groups)
    settings = {
        "groups": groups,
        "compared": list(pair),
        "layers": layers,
        "heads": heads,
        "bos": config.bos,
        "n_resamples": config.n_resamples,
        "batch_size": config.batch_size or default_batch_size(lm.device),
        **config.extra,
    }
    positions = [
        token_positions(s, lm.tokenizer, bos=config.bos, max_length=lm.max_positions) for s in corpus.samples(groups)
    ]
    return _Plan(layers, heads, groups, pair, settings, positions, [sample_record(sp) for sp in positions])


def _compute(lm: Any, plan: _Plan) -> Callable[[list[int]], list[tuple[dict[str, Any], dict[str, np.ndarray]]]]:
    engine = Engine(lm.model)

    def compute(batch: list[int]) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        sps = [plan.positions[i] for i in batch]
        with naming([f"sample {sp.sample.id!r}" for sp in sps]):
            rows = marker_rows(lm, engine, sps, plan.layers)
        return [(measure_sample(sp, r, plan.heads), {"rows": r.numpy()}) for sp, r in zip(sps, rows, strict=True)]

    return compute


def unit_compute(lm: Any, corpus: Corpus, config: ScanConfig) -> Callable[[list[int]], list]:
    """A Ray worker's `compute(batch)` (`plipy.cluster`): the local path's own code on the worker's model."""
    return _compute(lm, _plan(lm, corpus, config))


def run_scan(
    lm: Any,
    corpus: Corpus,
    config: ScanConfig,
    *,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    cluster: Any = None,
    load: dict[str, Any] | None = None,
) -> ScanResult:
    """Scan every sample of the chosen groups: per-sample measures, per-layer statistics, provenance.

    Finished samples are kept (`plipy.checkpoint`) until the result is complete: a killed run resumes. With a
    `cluster` (`plipy.cluster.Cluster`) the batches run on Ray workers that load the model with `load` options."""
    from plipy.cluster import pool as cp

    plan = _plan(lm, corpus, config)
    layers, heads, groups, (ga, gb), settings = plan.layers, plan.heads, plan.groups, plan.pair, plan.settings
    positions, samples = plan.positions, plan.samples
    check_measurable(samples, (ga, gb))
    units = checkpoint.open_run("scan", lm, corpus, settings, resume=config.resume, fresh=config.fresh)
    rows_by_id: dict[str, np.ndarray] = {}
    ids_by_id: dict[str, list[int]] = {}
    step = progress(units.label("scanning"), len(positions)) if progress else (lambda: None)
    measurable = [i for i, rec in enumerate(samples) if rec["status"] in ("ok", "partial-targets")]
    for _ in range(len(positions) - len(measurable)):
        step()
    batches = plan_batches([positions[i].seq_len for i in measurable], settings["batch_size"])
    with cp.executor(cluster, lm, load, f"{__name__}:unit_compute", (corpus, config), lambda: _compute(lm, plan)) as ex:
        for i, got in units.batched([[measurable[j] for j in b] for b in batches], ex.compute, ex.remote):
            samples[i].update(got[0])
            rows_by_id[positions[i].sample.id] = got[1]["rows"]
            ids_by_id[positions[i].sample.id] = list(positions[i].input_ids)  # decoded only for the token plot
            step()
        where = ex.describe()
    result = {
        "provenance": provenance.build(model=lm, corpus=corpus, seed=config.seed, config=settings),
        "groups_compared": [ga, gb],
        "layers_scanned": layers,
        "heads": heads,
        "samples": samples,
    }
    result.update(layer_statistics(samples, groups, (ga, gb), layers, heads, config.seed, config.n_resamples))
    result["plip_compat"] = plip_compat(result, lm, corpus)
    if where is not None:
        result["provenance"]["cluster"] = where
    units.finish()
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


def plip_compat(result: dict, lm: Any, corpus: Corpus) -> dict[str, Any]:
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


def sample_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per (sample, layer) for pandas: the long format is what plotting and groupby want."""
    rows = []
    for s in result["samples"]:
        if "attention" not in s:
            continue
        for i, layer in enumerate(result["layers_scanned"]):
            rows.append(
                {
                    "id": s["id"],
                    "group": s["group"],
                    "layer": layer,
                    "marker_token": s["marker_token"],
                    "n_tokens": s["n_tokens"],
                    "attention": s["attention"][i],
                    "first_token_share": s["first_token_share"][i],
                    "uniform_null": s["uniform_null"],
                    "excess": s["excess"][i],
                    "attention_per_head": s["attention_per_head"][i],
                    "attention_per_target": s["attention_per_target"][i],
                }
            )
    return rows
