"""Attention steering: scale the marker → target attention edges by α and measure what it does.

Mechanism (notes §7.1, fact 9): on the chosen heads and layers the post-softmax weight of each edge marker → target
is multiplied by α and the marker's row renormalised — in the engine exactly a `log α` pre-softmax bias
(`EdgeEdit(scale=α)`). A target token that occurs twice is one edge (scaled once); the attention metric keeps it
twice, as the scan does.

- calibrate: per-sample baseline attention at layer L (PLIP's metric: mean over targets of the head-mean
  post-softmax weight from the marker row), per-group means, their ratio, and the α that brings group B to A's level.
- dose: per dose α and sample, KL(P_base ‖ P_steered) at the last input position (float64, as knockout) and
  `attention_achieved`, the same metric on the steered rows of the steered layer(s) (their mean over layers when
  several are steered). All doses of a sample run as one batch on the cached baseline (`ConditionRunner`).
- target attention: per sample the α whose `attention_achieved` equals v, solved exactly on the baseline row, then
  verified by the run.
- generate: baseline and steered generations by the same decoding path, test-marker detection, Fisher's exact test.

An edge whose key comes after its query (PLIP-rs' generation experiment steered such edges: a no-op) is refused.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plipy import checkpoint, measures, provenance, stats
from plipy.corpus import Corpus, SamplePositions, _char_to_token, token_positions
from plipy.engine import Capture, EdgeEdit, Engine
from plipy.engine.batch import default_batch_size, pad_id, pad_left, plan_batches
from plipy.engine.runner import Baseline, ConditionRunner, cache_argument, full_cache
from plipy.errors import CausalEdgeError, PlipyError
from plipy.experiments.knockout import plip_default_layer
from plipy.experiments.scan import marker_rows
from plipy.finite import naming, require_finite
from plipy.results import CalibrateResult, DoseResult, GenerateResult

DOSES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)  # PLIP-rs' DOSE_LEVELS
DEFAULT_DETECT = (r"#\[test\]", r"assert_eq!", r"assert!", r"fn test_", r">>>")  # literal markers, as regexes
TARGET_TOLERANCE = 1e-4  # a target-attention run must land this close to v
CHAT_SYSTEM = "You are a Rust programming assistant. Complete the function with idiomatic Rust code."
CHAT_USER = "Complete this Rust function:\n\n{prompt}"


class SteerCausalError(CausalEdgeError):
    """A steering edge whose key comes after its query: the causal mask already gives it weight 0."""


# -- samples and edges ---------------------------------------------------------------------------------------------


@dataclass
class SteerSample:
    """One corpus sample ready to steer: marker → distinct exact targets, and the targets the metric averages."""

    positions: SamplePositions
    status: str  # ok | failed | causal-invalid | no-targets
    edges: list[tuple[int, int]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # duplicates kept (the metric's mean over targets)
    note: str | None = None

    @property
    def id(self) -> str:
        return self.positions.sample.id

    @property
    def group(self) -> str:
        return self.positions.sample.group


def _tok(sp: SamplePositions, i: int) -> str:
    return repr(sp.sample.code[sp.offsets[i][0] : sp.offsets[i][1]]) if sp.offsets[i] != (0, 0) else "<bos>"


def steer_sample(sp: SamplePositions) -> SteerSample:
    """Edges of one sample: marker → each exact target token. Targets after the marker make it causal-invalid."""
    m = sp.marker_token
    if m is None or sp.marker_match != "exact":
        return SteerSample(sp, "failed", note="the marker has no exact token (PLIP's steering uses the exact rule)")
    late = [(t, i) for i, (t, after) in enumerate(zip(sp.target_tokens, sp.after_marker, strict=True)) if after]
    if late:
        t, i = late[0]
        note = (
            f"sample {sp.sample.id!r}: edge from query token {m} ({_tok(sp, m)}, the marker) to key token {t} "
            f"({_tok(sp, t)}, target {i}) is causally masked — the key comes after the query, so there is no "
            f"attention to steer ({len(late)} of {len(sp.target_tokens)} targets are after the marker)"
        )
        return SteerSample(sp, "causal-invalid", note=note)
    targets = [
        t for t, how in zip(sp.target_tokens, sp.target_matches, strict=True) if t is not None and how == "exact"
    ]
    if not targets:
        return SteerSample(sp, "no-targets", note="no target converts to an exact token")
    return SteerSample(sp, "ok", edges=[(m, t) for t in sorted(set(targets))], targets=targets)


def prepare_check_groups(corpus: Corpus, groups: Sequence[str]) -> None:
    """Fail on unknown groups (before a model is loaded)."""
    unknown = [g for g in groups if g not in corpus.group_names]
    if unknown:
        raise PlipyError(f"unknown group(s) {', '.join(unknown)}; the corpus has: {', '.join(corpus.group_names)}")


def prepare(
    lm: Any, corpus: Corpus, groups: Sequence[str], bos: bool = False, skip_invalid: bool = False
) -> list[SteerSample]:
    """Steerable samples of the groups. A causally invalid sample is an error unless `skip_invalid`."""
    prepare_check_groups(corpus, groups)
    out = [
        steer_sample(token_positions(s, lm.tokenizer, bos=bos, max_length=lm.max_positions))
        for s in corpus.samples(groups)
    ]
    bad = [s for s in out if s.status == "causal-invalid"]
    if bad and not skip_invalid:
        more = f" (and {len(bad) - 1} more sample(s))" if len(bad) > 1 else ""
        raise SteerCausalError(f"{bad[0].note}{more}; --skip-invalid leaves such samples out")
    if not any(s.status == "ok" for s in out):
        reasons = sorted({f"{s.status} ({s.note})" for s in out})
        raise PlipyError("no steerable sample in " + ", ".join(groups) + ": " + "; ".join(reasons[:3]))
    return out


def _batches(indices: list[int], samples: Sequence[SteerSample], batch_size: int) -> list[list[int]]:
    """The samples `indices` in deterministic batches of similar length (one left-padded forward each)."""
    return [[indices[j] for j in b] for b in plan_batches([samples[i].positions.seq_len for i in indices], batch_size)]


def excluded(samples: Sequence[SteerSample]) -> list[dict[str, Any]]:
    """The samples left out, with why."""
    return [{"id": s.id, "group": s.group, "status": s.status, "note": s.note} for s in samples if s.status != "ok"]


# -- the metric and its exact steered value ------------------------------------------------------------------------


def attention_metric(rows: torch.Tensor, targets: Sequence[int]) -> float:
    """PLIP's metric on one marker row `[heads, keys]`: mean over targets (duplicates kept) of the head mean."""
    return float(rows.double()[:, list(targets)].mean())


def steered_rows(
    rows: torch.Tensor, keys: Sequence[int], alpha: float, heads: Sequence[int] | None = None
) -> torch.Tensor:
    """The explicit post-softmax edit of a marker row `[heads, keys]` (float64): ×α on `keys`, renormalise."""
    p = rows.double().clone()
    hs = list(range(p.shape[0])) if heads is None else list(heads)
    factor = torch.ones_like(p)
    factor[torch.tensor(hs)[:, None], torch.tensor(list(keys))[None, :]] = alpha
    p = p * factor
    return torch.where(factor.ne(1).any(-1, keepdim=True), p / p.sum(-1, keepdim=True), p)


def _achieved_fn(
    rows: torch.Tensor, targets: Sequence[int], keys: Sequence[int], heads: Sequence[int] | None
) -> tuple[Callable[[float], float], float, float]:
    """A(α) on one pre-edit row in closed form, and its limits A(0), A(∞).

    Per head h with target mass P_h (distinct keys) the edited weights are α·p / (1 − P_h + α·P_h), so
    A(α) = mean_h α·W_h / (1 − P_h + α·P_h) with W_h the target-mean weight (duplicates kept; the 1 is the row's
    actual sum); unsteered heads
    keep W_h. Increasing in α."""
    p = rows.double()
    n = p.shape[0]
    steer = torch.zeros(n, dtype=torch.bool)
    steer[list(range(n)) if heads is None else list(heads)] = True
    big_p = p[:, list(keys)].sum(-1)
    total = p.sum(-1)  # 1 up to rounding; the edit renormalises by the actual sum, so use it
    w = p[:, list(targets)].mean(-1)

    def f(alpha: float) -> float:
        moved = alpha * w / (total - big_p + alpha * big_p)
        return float(torch.where(steer, moved, w).mean())

    lim_inf = torch.where(steer & (big_p > 0), w / big_p.clamp_min(1e-300), w)
    lo = torch.where(steer & (big_p < total), torch.zeros_like(w), w)
    return f, float(lo.mean()), float(lim_inf.mean())


def scale_for_attention(
    rows: torch.Tensor, targets: Sequence[int], keys: Sequence[int], v: float, heads: Sequence[int] | None = None
) -> tuple[float | None, str | None]:
    """The α ≥ 0 whose steered metric on this pre-edit row equals v (bisection in log α on the closed form).

    For one head this is the closed form α = v(1−P)/(W − vP); head means need the search. Returns (α, None) or
    (None, why) when v is outside what scaling can reach."""
    f, lo, hi = _achieved_fn(rows, targets, keys, heads)
    base = f(1.0)
    if not lo < v < hi:
        if abs(v - base) <= 1e-15:
            return 1.0, None
        return None, f"v = {v:g} is outside the reachable range ({lo:.6g}, {hi:.6g}) of this sample"
    a, b = -1.0, 1.0  # log α bracket, widened until it holds v
    while f(math.exp(a)) > v:
        a *= 2
        if a < -700:
            return None, f"v = {v:g} needs α below e^-700"
    while f(math.exp(b)) < v:
        b *= 2
        if b > 700:
            return None, f"v = {v:g} needs α above e^700"
    for _ in range(200):
        mid = (a + b) / 2
        if f(math.exp(mid)) < v:
            a = mid
        else:
            b = mid
        if b - a < 1e-13:
            break
    return math.exp((a + b) / 2), None


def scale_for_group(
    rows: Sequence[torch.Tensor], targets: Sequence[Sequence[int]], keys: Sequence[Sequence[int]], v: float
) -> float | None:
    """The one α (all heads) whose steered group mean of the metric equals v (bisection in log α), or None."""
    fs = [_achieved_fn(r, t, k, None) for r, t, k in zip(rows, targets, keys, strict=True)]

    def g(alpha: float) -> float:
        return float(np.mean([f(alpha) for f, _, _ in fs]))

    lo, hi = float(np.mean([x[1] for x in fs])), float(np.mean([x[2] for x in fs]))
    if not lo < v < hi:
        return None
    a, b = -1.0, 1.0
    while g(math.exp(a)) > v and a > -700:
        a *= 2
    while g(math.exp(b)) < v and b < 700:
        b *= 2
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if g(math.exp(mid)) < v else (a, mid)
        if b - a < 1e-13:
            break
    return math.exp((a + b) / 2)


# -- calibrate -----------------------------------------------------------------------------------------------------


@dataclass
class CalibrateConfig:
    """Which layer and groups: the scale brings `groups[1]` to `groups[0]`'s level."""

    layer: int | None = None
    groups: Sequence[str] = ("python_doctest", "rust_test")
    bos: bool = False
    skip_invalid: bool = False
    extra: dict = field(default_factory=dict)
    resume: bool = True  # keep finished units on disk until the result is complete (plipy.checkpoint)
    fresh: bool = False  # discard what an interrupted run with the same settings left
    batch_size: int | None = None  # inputs per forward (None: plipy.engine.batch.default_batch_size)


def _calibrate_plan(lm: Any, corpus: Corpus, config: CalibrateConfig) -> tuple[int, list[SteerSample]]:
    layer = _layer(config.layer, lm.n_layers)
    if len(config.groups) != 2:
        raise PlipyError(f"calibration needs two groups (A B), got {len(config.groups)}")
    return layer, prepare(lm, corpus, list(config.groups), config.bos, config.skip_invalid)


def _calibrate_compute(lm: Any, layer: int, samples: list[SteerSample]) -> Callable[[list[int]], list]:
    engine = Engine(lm.model)

    def compute(batch: list[int]) -> list[tuple[None, dict[str, np.ndarray]]]:
        with naming([f"sample {samples[i].id!r}" for i in batch]):
            got = marker_rows(lm, engine, [samples[i].positions for i in batch], [layer])
        return [(None, {"row": r[0].numpy()}) for r in got]

    return compute


def calibrate_units(lm: Any, corpus: Corpus, config: CalibrateConfig) -> Callable[[list[int]], list]:
    """A Ray worker's `compute(batch)` (`plipy.cluster`): the local path's own code on the worker's model."""
    return _calibrate_compute(lm, *_calibrate_plan(lm, corpus, config))


def run_calibrate(
    lm: Any,
    corpus: Corpus,
    config: CalibrateConfig,
    *,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    cluster: Any = None,
    load: dict[str, Any] | None = None,
) -> CalibrateResult:
    """Baseline attention at one layer per sample and group, the ratio, and the scale that brings B to A. With a
    `cluster` (`plipy.cluster.Cluster`) the batches run on Ray workers that load the model with `load` options."""
    from plipy.cluster import pool as cp

    layer, samples = _calibrate_plan(lm, corpus, config)
    ga, gb = config.groups
    settings = {
        "command": "steer calibrate",
        "layer": layer,
        "groups": [ga, gb],
        "bos": config.bos,
        "skip_invalid": config.skip_invalid,
        "metric": "mean over targets (duplicates kept) of the head-mean post-softmax weight of the marker row",
        "scale_rule": "the α whose steered mean of group B equals group A's mean (exact on B's baseline rows)",
        "batch_size": config.batch_size or default_batch_size(lm.device),
        **config.extra,
    }
    units = checkpoint.open_run("calibrate", lm, corpus, settings, resume=config.resume, fresh=config.fresh)
    step = progress(units.label("calibrating"), len(samples)) if progress else (lambda: None)
    recs: list[dict[str, Any]] = [{"id": s.id, "group": s.group, "status": s.status} for s in samples]
    rows: dict[str, torch.Tensor] = {}
    for s, rec in zip(samples, recs, strict=True):
        if s.status != "ok":
            rec["note"] = s.note
            step()

    ok = [i for i, s in enumerate(samples) if s.status == "ok"]
    with cp.executor(
        cluster,
        lm,
        load,
        f"{__name__}:calibrate_units",
        (corpus, config),
        lambda: _calibrate_compute(lm, layer, samples),
    ) as ex:
        for i, got in units.batched(_batches(ok, samples, settings["batch_size"]), ex.compute, ex.remote):
            s, m = samples[i], samples[i].positions.marker_token
            row = torch.from_numpy(got[1]["row"])
            rows[s.id] = row
            recs[i].update(
                marker_token=m,
                targets=s.targets,
                attention=attention_metric(row, s.targets),
                uniform_null=1.0 / (m + 1),
            )
            step()
        where = ex.describe()
    ok = {g: [r for r in recs if r["group"] == g and r["status"] == "ok"] for g in (ga, gb)}
    for g in (ga, gb):
        if not ok[g]:
            raise PlipyError(f"group {g!r} has no steerable sample: nothing to calibrate")
    desc = {g: stats.describe([r["attention"] for r in ok[g]]) for g in (ga, gb)}
    ma, mb = desc[ga]["mean"], desc[gb]["mean"]
    by_id = {s.id: s for s in samples}
    # The rule: the α whose steered mean over B equals mean(A), exactly on B's baseline rows (layer L only).
    group_scale = scale_for_group(
        [rows[r["id"]] for r in ok[gb]],
        [by_id[r["id"]].targets for r in ok[gb]],
        [[k for _, k in by_id[r["id"]].edges] for r in ok[gb]],
        ma,
    )
    for r in ok[gb]:
        s = by_id[r["id"]]
        alpha, why = scale_for_attention(rows[s.id], s.targets, [k for _, k in s.edges], ma)
        r["scale_to_a"] = alpha
        if why:
            r["scale_note"] = why
    units.finish()
    return CalibrateResult(
        {
            "provenance": cp.stamp(provenance.build(model=lm, corpus=corpus, config=settings), where),
            "layer": layer,
            "groups_compared": [ga, gb],
            "samples": recs,
            "excluded": excluded(samples),
            "groups": desc,
            "ratio": ma / mb if mb else None,
            "scale_to_a": group_scale,
            "scale_plip": stats.plip_ratio(ma, mb) if mb > 1e-10 else 1.0,
            "recommended_target": ma,
            "dose_table": [
                {
                    "scale": d,
                    "plip_attention": d * mb,
                    "attention": float(
                        np.mean(
                            [
                                _achieved_fn(
                                    rows[r["id"]], by_id[r["id"]].targets, [k for _, k in by_id[r["id"]].edges], None
                                )[0](d)
                                for r in ok[gb]
                            ]
                        )
                    ),
                }
                for d in DOSES
            ],
        }
    )


# -- dose-response -------------------------------------------------------------------------------------------------


@dataclass
class DoseConfig:
    """What to steer: groups, layers (one or several), doses, heads (None = all), optional target attention v."""

    groups: Sequence[str] = ("rust_test",)
    layers: Sequence[int] | None = None
    doses: Sequence[float] = DOSES
    heads: Sequence[int] | None = None
    target_attention: float | None = None
    bos: bool = False
    skip_invalid: bool = False
    path: str = "auto"
    max_batch: int = 32
    top_k: int = 5
    extra: dict = field(default_factory=dict)
    resume: bool = True  # keep finished units on disk until the result is complete (plipy.checkpoint)
    fresh: bool = False  # discard what an interrupted run with the same settings left
    batch_size: int | None = None  # inputs per forward (None: plipy.engine.batch.default_batch_size)


def _layer(layer: int | None, n_layers: int) -> int:
    layer = plip_default_layer(n_layers) if layer is None else int(layer)
    if not 0 <= layer < n_layers:
        raise PlipyError(f"layer {layer} does not exist: the model has {n_layers} layers (0-{n_layers - 1})")
    return layer


def _edits(s: SteerSample, layers: Sequence[int], alpha: float, heads: Sequence[int] | None) -> list[EdgeEdit]:
    return [EdgeEdit(layers=list(layers), edges=list(s.edges), scale=float(alpha), heads=heads)]


def _dose_checks(config: DoseConfig, n_layers: int, n_heads: int) -> tuple[list[int], list[int] | None, list[float]]:
    """Validated (layers, heads, doses) of a dose run."""
    layers = sorted({_layer(x, n_layers) for x in (config.layers or [None])})
    heads = None if config.heads is None else sorted({int(h) for h in config.heads})
    for h in heads or []:
        if not 0 <= h < n_heads:
            raise PlipyError(f"head {h} does not exist: the model has {n_heads} query heads (0-{n_heads - 1})")
    doses = [float(d) for d in config.doses]
    if not doses and config.target_attention is None:
        raise PlipyError("no dose to run")
    bad = [d for d in doses if not d >= 0 or math.isinf(d)]
    if bad:
        raise PlipyError(f"doses must be finite and ≥ 0, got {bad}")
    v = config.target_attention
    if v is not None:
        if len(layers) != 1:
            raise PlipyError(
                "--target-attention needs a single layer: with several, each layer's pre-edit row depends on α"
            )
        if not 0 < v < 1:
            raise PlipyError(f"--target-attention must be in (0, 1), got {v}")
    return layers, heads, doses


def _dose_sample(
    lm: Any,
    runner: ConditionRunner,
    s: SteerSample,
    base: Baseline,
    config: DoseConfig,
    layers: list[int],
    heads: list[int] | None,
    doses: list[float],
) -> tuple[dict[str, Any], list[dict], dict | None]:
    """One steerable sample from its baseline (marker rows captured at `layers`): its record, one measure row per
    dose, and the target-attention row (or None)."""
    m = s.positions.marker_token
    cap = Capture(rows=[m], layers=layers)
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
    conds = [_edits(s, layers, d, heads) for d in doses]
    v = config.target_attention
    t_alpha, t_note = None, None
    if v is not None:
        t_alpha, t_note = scale_for_attention(base_rows[layers[0]], s.targets, [k for _, k in s.edges], v, heads)
        if t_alpha is not None:
            conds.append(_edits(s, layers, t_alpha, heads))
    outs = runner.run(base, conds, capture=cap)
    rows = [_measure(s, out, base, layers, lm.tokenizer, config.top_k) for out in outs[: len(doses)]]
    if v is None:
        return rec, rows, None
    if t_alpha is None:
        return (
            rec,
            rows,
            {
                "id": s.id,
                "group": s.group,
                "scale": None,
                "kl": None,
                "attention_achieved": None,
                "status": "unreachable",
                "note": t_note,
            },
        )
    trow = {"scale": t_alpha, **_measure(s, outs[-1], base, layers, lm.tokenizer, config.top_k)}
    if trow["status"] == "ok" and abs(trow["attention_achieved"] - v) > TARGET_TOLERANCE:
        trow["status"], trow["note"] = "missed", f"achieved {trow['attention_achieved']:.6g}, asked {v:g}"
    return rec, rows, trow


def _dose_compute(
    lm: Any, runner: ConditionRunner, samples: list[SteerSample], config: DoseConfig
) -> Callable[[list[int]], list]:
    layers, heads, doses = _dose_checks(config, lm.n_layers, lm.n_heads)

    def compute(batch: list[int]) -> list[tuple[list[Any], None]]:
        sps = [samples[i].positions for i in batch]
        with naming([f"sample {samples[i].id!r}" for i in batch]):
            bases = runner.baselines(
                [sp.input_ids for sp in sps],
                rows=[[sp.marker_token] for sp in sps],
                layers=layers,
                pad_token=pad_id(lm.tokenizer),
            )
        out = []
        for i, b in zip(batch, bases, strict=True):
            with naming(f"sample {samples[i].id!r}"):
                out.append((list(_dose_sample(lm, runner, samples[i], b, config, layers, heads, doses)), None))
        return out

    return compute


def dose_units(lm: Any, corpus: Corpus, config: DoseConfig) -> Callable[[list[int]], list]:
    """A Ray worker's `compute(batch)` (`plipy.cluster`): the local path's own code on the worker's model."""
    samples = prepare(lm, corpus, list(config.groups), config.bos, config.skip_invalid)
    runner = ConditionRunner(lm.model, Engine(lm.model), path=config.path, max_batch=config.max_batch)
    return _dose_compute(lm, runner, samples, config)


def run_dose(
    lm: Any,
    corpus: Corpus,
    config: DoseConfig,
    *,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    runner: ConditionRunner | None = None,
    cluster: Any = None,
    load: dict[str, Any] | None = None,
) -> DoseResult:
    """Every dose (and the target attention, if asked) on every steerable sample: KL and attention achieved.
    With a `cluster` (`plipy.cluster.Cluster`) the batches run on Ray workers that load the model with `load`."""
    from plipy.cluster import pool as cp

    n_heads = lm.n_heads
    layers, heads, doses = _dose_checks(config, lm.n_layers, n_heads)
    v = config.target_attention
    samples = prepare(lm, corpus, list(config.groups), config.bos, config.skip_invalid)
    runner = runner or ConditionRunner(lm.model, Engine(lm.model), path=config.path, max_batch=config.max_batch)
    dose_runs = [{"scale": d, "samples": []} for d in doses]
    target_run: dict[str, Any] | None = {"target_attention": v, "samples": []} if v is not None else None
    sample_recs: list[dict[str, Any]] = []
    all_heads = heads if heads is not None else list(range(n_heads))
    settings = {
        "command": "steer dose",
        "groups": list(config.groups),
        "layers": layers,
        "doses": doses,
        "heads": all_heads,
        "target_attention": v,
        "bos": config.bos,
        "skip_invalid": config.skip_invalid,
        "top_k": config.top_k,
        "mechanism": "post-softmax ×α on marker→target edges of the chosen heads and layers, row renormalised "
        "(≡ +log α pre-softmax); a duplicated target is one edge",
        "kl": "KL(P_base || P_steered), nats, last input position, full vocabulary, float64, all terms",
        "attention_achieved": "mean over targets (duplicates kept) of the head-mean (all heads) post-softmax "
        "weight of the steered marker row; several layers: the mean over the layers",
        "batch_size": config.batch_size or default_batch_size(lm.device),
        **config.extra,
    }
    units = checkpoint.open_run(
        "dose", lm, corpus, settings, resume=config.resume, fresh=config.fresh, runner=config.path
    )  # fast and naive agree to rounding, not bit for bit
    step = progress(units.label("steering"), len(samples)) if progress else (lambda: None)
    t0 = time.perf_counter()
    for s in samples:
        if s.status != "ok":
            step()

    ok = [i for i, s in enumerate(samples) if s.status == "ok"]
    done = {}
    with cp.executor(
        cluster,
        lm,
        load,
        f"{__name__}:dose_units",
        (corpus, config),
        lambda: _dose_compute(lm, runner, samples, config),
    ) as ex:
        for i, got in units.batched(_batches(ok, samples, settings["batch_size"]), ex.compute, ex.remote):
            done[i] = got
            step()
        where = ex.describe()
    for i in ok:  # in sample order
        rec, rows, trow = done[i][0]
        sample_recs.append(rec)
        for run, row in zip(dose_runs, rows, strict=True):
            run["samples"].append(row)
        if target_run is not None:
            target_run["samples"].append(trow)
    elapsed = time.perf_counter() - t0
    for run in dose_runs:
        run.update(_summary(run["samples"]))
    if target_run is not None:
        target_run.update(_summary(target_run["samples"]))
        scales = [r["scale"] for r in target_run["samples"] if r["status"] == "ok"]
        target_run["mean_scale"] = float(np.mean(scales)) if scales else None
    prov = cp.stamp(provenance.build(model=lm, corpus=corpus, config={**settings, "runner": runner.describe()}), where)
    # wall-clock time is provenance: it differs between two runs that give the same numbers
    prov["timing"] = {
        "seconds": elapsed,
        "path": runner.path,
        "samples": len(sample_recs),
        "doses": len(doses),
        "resumed_samples": units.resumed,
    }
    result = {
        "provenance": prov,
        "layers": layers,
        "heads": all_heads,
        "groups": list(config.groups),
        "samples": sample_recs,
        "excluded": excluded(samples),
        "doses": dose_runs,
        "monotonicity": monotonicity(dose_runs),
    }
    if target_run is not None:
        result["target"] = target_run
    units.finish()
    return DoseResult(result)


def _measure(s: SteerSample, out: Any, base: Any, layers: Sequence[int], tokenizer: Any, top_k: int) -> dict[str, Any]:
    row: dict[str, Any] = {"id": s.id, "group": s.group}
    if out.logits is None:
        row.update(kl=None, attention_achieved=None, status=out.status, note=out.note)
        return row
    per_layer = [attention_metric(out.attn[layer][:, 0], s.targets) for layer in layers]
    row.update(
        status="ok",
        attention_achieved=float(np.mean(per_layer)),
        attention_achieved_per_layer=per_layer,
        **measures.compare_logits(base.logits, out.logits, tokenizer, top_k),
    )
    if out.status == "identity":
        row["note"] = "identity: scale 1 (or no heads) is the baseline computation, KL exactly 0"
    return row


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
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


def sample_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per (dose, sample) for pandas."""
    rows = []
    runs = [(str(r["scale"]), r) for r in result["doses"]]
    if "target" in result:
        runs.append(("target", result["target"]))
    for label, run in runs:
        for r in run["samples"]:
            rows.append(
                {
                    "dose": label,
                    "scale": r.get("scale", run.get("scale")),
                    "id": r["id"],
                    "group": r["group"],
                    "status": r["status"],
                    "kl": r.get("kl"),
                    "attention_achieved": r.get("attention_achieved"),
                    "top1_changed": r.get("top1_changed"),
                }
            )
    return rows


# -- generation ----------------------------------------------------------------------------------------------------


@dataclass
class GenerateConfig:
    """Steered generation: edge query = last `query_text` token, key = first `key_text` token of each prompt."""

    layers: Sequence[int] | None = None
    scale: float = 3.0
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    chat: bool = False
    detect: Sequence[str] = DEFAULT_DETECT
    query_text: str = "fn "
    key_text: str = "#[test]"
    heads: Sequence[int] | None = None
    skip_invalid: bool = False
    limit: int | None = None
    extra: dict = field(default_factory=dict)
    resume: bool = True  # keep finished units on disk until the result is complete (plipy.checkpoint)
    fresh: bool = False  # discard what an interrupted run with the same settings left
    batch_size: int | None = None  # inputs per forward (None: plipy.engine.batch.default_batch_size)


def load_prompts(path: Any = None) -> tuple[list[dict[str, Any]], str]:
    """Prompts `{"prompts": [{"id", "category"?, "prompt"}]}` (or a bare list); None = the bundled file."""
    import json
    from importlib import resources
    from pathlib import Path

    if path is None:
        res = resources.files("plipy").joinpath("data", "steer_prompts.json")
        text, where = res.read_text(encoding="utf-8"), str(res)
    else:
        p = Path(path)
        if not p.is_file():
            raise PlipyError(f"{p}: prompts file not found")
        text, where = p.read_text(encoding="utf-8"), str(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlipyError(f"{where}: invalid JSON at line {e.lineno}: {e.msg}") from None
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise PlipyError(f'{where}: expected {{"prompts": [{{"id", "prompt"}}, …]}}')
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("prompt"), str):
            raise PlipyError(f'{where}: prompt {i} has no "prompt" string')
        out.append({"id": str(it.get("id", i)), "category": it.get("category"), "prompt": it["prompt"]})
    return out, where


def prompt_edge(
    tokenizer: Any, text: str, pid: str, query_text: str, key_text: str, span: tuple[int, int] | None = None
) -> tuple[list[int], tuple[int, int] | None, str | None]:
    """Token ids of a prompt and its steering edge (query = token of the last `query_text`, key = token of the
    first `key_text`, both searched within `span`: the prompt inside a chat template), or (ids, None, why). A key
    after its query raises SteerCausalError."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    lo, hi = span or (0, len(text))
    qc, kc = text.rfind(query_text, lo, hi), text.find(key_text, lo, hi)
    if qc < 0 or kc < 0:
        missing = query_text if qc < 0 else key_text
        return ids, None, f"prompt {pid!r} does not contain {missing!r}"
    (q, qhow), (k, khow) = _char_to_token(offs, qc), _char_to_token(offs, kc)
    if qhow != "exact" or khow != "exact":
        return ids, None, f"prompt {pid!r}: no exact token for the query or key text"
    if k > q:
        raise SteerCausalError(
            f"prompt {pid!r}: edge from query token {q} ({text[offs[q][0] : offs[q][1]]!r}) to key token {k} "
            f"({text[offs[k][0] : offs[k][1]]!r}) is causally masked — the key comes after the query, so there is "
            "no attention to steer"
        )
    return ids, (q, k), None


def _chat_text(tokenizer: Any, prompt: str) -> Any:
    """The prompt in the tokenizer's chat template (`plipy.chat`), with where it sits in the templated text."""
    from plipy import chat

    if getattr(tokenizer, "chat_template", None) is None:
        raise PlipyError("--chat: this tokenizer has no chat template")
    return chat.apply(tokenizer, prompt, system=CHAT_SYSTEM, user=CHAT_USER)


def generate_pairs(
    lm: Any,
    engine: Engine,
    items: Sequence[tuple[list[int], tuple[int, int]]],
    layers: list[int],
    config: GenerateConfig,
) -> list[tuple[list[int], list[int]]]:
    """Baseline and steered continuations of several prompts `(ids, (query, key))`, each pair by the very same
    call (`model.generate` on the left-padded batch, KV cache, same seed): only the steering differs. Greedy
    decoding gives each prompt what it gives alone (up to fp32 rounding of near-ties); sampling draws from one
    generator for the batch, so a prompt's sample depends on the batch it is in (fixed for a given batch size)."""
    from transformers import GenerationConfig

    tok = lm.tokenizer
    sample = config.temperature > 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gc = GenerationConfig(
        max_new_tokens=config.max_tokens,
        min_new_tokens=0,
        do_sample=sample,
        temperature=config.temperature if sample else None,
        top_k=None if sample else None,
        top_p=None,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
    )
    padded = pad_left([ids for ids, _ in items], pad if pad is not None else 0, lm.device)
    width = padded.ids.shape[1]
    edges = [(j, q + p, k + p) for j, ((_, (q, k)), p) in enumerate(zip(items, padded.pads, strict=True))]
    steer = [EdgeEdit(layers=layers, edges=edges, scale=config.scale, heads=config.heads)]
    # A cache keeping every position: generate()'s default drops keys beyond a sliding window (Gemma-2/3,
    # StarCoder2), after which the engine cannot tell a key's absolute position (the window is the mask's job).
    cache_arg = cache_argument(lm.model) or "past_key_values"
    outs = []
    for e in ([], steer):
        torch.manual_seed(config.seed)  # the same draws for both: only the steering differs
        with torch.inference_mode(), engine.run(edits=e):
            out = lm.model.generate(
                padded.ids,
                attention_mask=padded.mask,
                generation_config=gc,
                logits_processor=[_FiniteScores()],
                **{cache_arg: full_cache()},
            )
        outs.append([_until_eos(out[j, width:].tolist(), tok.eos_token_id) for j in range(len(items))])
    return list(zip(outs[0], outs[1], strict=True))


class _FiniteScores:
    """A logits processor refusing NaN/inf next-token logits: greedy decoding would turn them into tokens."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        require_finite(scores, "the next-token logits during generation")
        return scores


def _until_eos(ids: list[int], eos: Any) -> list[int]:
    """A continuation cut after its first end-of-sequence token (a batch pads finished items after it)."""
    stops = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


def fisher_one_sided(baseline_yes: int, steered_yes: int, n: int) -> float:
    """One-sided Fisher exact p that the steered rate is higher (PLIP-rs: P(X ≥ steered_yes), hypergeometric)."""
    from scipy.stats import fisher_exact

    return float(
        fisher_exact([[steered_yes, n - steered_yes], [baseline_yes, n - baseline_yes]], alternative="greater")[1]
    )


def _generate_row(
    lm: Any, p: dict[str, Any], edge: tuple[int, int], b_ids: list[int], s_ids: list[int], patterns: list[re.Pattern]
) -> dict[str, Any]:
    """One prompt's baseline and steered continuation, and which test markers each contains."""
    b_txt = lm.tokenizer.decode(b_ids, skip_special_tokens=True)
    s_txt = lm.tokenizer.decode(s_ids, skip_special_tokens=True)
    b_has, s_has = (any(pt.search(t) for pt in patterns) for t in (b_txt, s_txt))
    change = {(False, True): "gained", (True, False): "lost", (True, True): "kept", (False, False): "none"}
    return {
        "id": p["id"],
        "category": p["category"],
        "edge": list(edge),
        "baseline": b_txt,
        "steered": s_txt,
        "baseline_tokens": len(b_ids),
        "steered_tokens": len(s_ids),
        "identical": b_ids == s_ids,
        "baseline_has_test": b_has,
        "steered_has_test": s_has,
        "baseline_matches": [pt.pattern for pt in patterns if pt.search(b_txt)],
        "steered_matches": [pt.pattern for pt in patterns if pt.search(s_txt)],
        "change": change[(b_has, s_has)],
    }


def _generate_plan(
    lm: Any, prompts: list[dict[str, Any]], config: GenerateConfig
) -> tuple[list[int], list[re.Pattern], list[tuple], list[dict[str, Any]]]:
    """(layers, detection patterns, prepared (prompt, ids, edge), skipped): alike on the driver and on workers."""
    layers = sorted({_layer(x, lm.n_layers) for x in (config.layers or [None])})
    if config.max_tokens < 1:
        raise PlipyError(f"--max-tokens must be ≥ 1, got {config.max_tokens}")
    if config.temperature < 0:
        raise PlipyError(f"--temperature must be ≥ 0, got {config.temperature}")
    try:
        patterns = [re.compile(p) for p in config.detect]
    except re.error as e:
        raise PlipyError(f"bad --detect regex {e.pattern!r}: {e}") from None
    prompts = prompts[: config.limit] if config.limit else prompts
    prepared, skipped = [], []
    for p in prompts:
        ct = _chat_text(lm.tokenizer, p["prompt"]) if config.chat else None
        text, span = (ct.text, (ct.offset, ct.offset + len(p["prompt"]))) if ct else (p["prompt"], None)
        try:
            ids, edge, why = prompt_edge(lm.tokenizer, text, p["id"], config.query_text, config.key_text, span)
        except SteerCausalError as e:
            if not config.skip_invalid:
                raise SteerCausalError(f"{e}; --skip-invalid leaves such prompts out") from None
            skipped.append({"id": p["id"], "status": "causal-invalid", "note": str(e)})
            continue
        if edge is None:
            skipped.append({"id": p["id"], "status": "no-edge", "note": why})
            continue
        prepared.append((p, ids, edge))
    if not prepared:
        raise PlipyError("no prompt to steer: " + "; ".join(s["note"] for s in skipped[:3]))
    return layers, patterns, prepared, skipped


def _generate_compute(
    lm: Any, layers: list[int], patterns: list[re.Pattern], prepared: list[tuple], config: GenerateConfig
) -> Callable[[list[int]], list]:
    engine = Engine(lm.model)

    def compute(batch: list[int]) -> list[tuple[dict[str, Any], None]]:
        with naming([f"prompt {prepared[i][0]['id']!r}" for i in batch]):
            pairs = generate_pairs(lm, engine, [(prepared[i][1], prepared[i][2]) for i in batch], layers, config)
        return [
            (_generate_row(lm, prepared[i][0], prepared[i][2], b, s, patterns), None)
            for i, (b, s) in zip(batch, pairs, strict=True)
        ]

    return compute


def generate_units(lm: Any, prompts: list[dict[str, Any]], config: GenerateConfig) -> Callable[[list[int]], list]:
    """A Ray worker's `compute(batch)` (`plipy.cluster`): the local path's own code on the worker's model."""
    layers, patterns, prepared, _ = _generate_plan(lm, prompts, config)
    return _generate_compute(lm, layers, patterns, prepared, config)


def run_generate(
    lm: Any,
    prompts: list[dict[str, Any]],
    config: GenerateConfig,
    *,
    source: str = "",
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    cluster: Any = None,
    load: dict[str, Any] | None = None,
) -> GenerateResult:
    """Baseline vs steered generation per prompt; detection of test markers; Fisher's exact test across prompts.
    With a `cluster` (`plipy.cluster.Cluster`) the batches run on Ray workers that load the model with `load`."""
    from plipy.cluster import pool as cp

    layers, patterns, prepared, skipped = _generate_plan(lm, prompts, config)
    settings = {
        "command": "steer generate",
        "prompts": source,
        "layers": layers,
        "scale": config.scale,
        "heads": config.heads,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "chat": config.chat,
        "detect": list(config.detect),
        "query_text": config.query_text,
        "key_text": config.key_text,
        "decoding": "both by model.generate() with KV cache, same GenerationConfig and seed; "
        + ("sampling" if config.temperature > 0 else "greedy"),
        "batch_size": config.batch_size or default_batch_size(lm.device),
        **config.extra,
    }
    units = checkpoint.open_run(
        "generate",
        lm,
        None,
        settings,
        resume=config.resume,
        fresh=config.fresh,
        seed=config.seed,
        prompt_texts=[(p["id"], p["prompt"]) for p, _, _ in prepared],
    )
    step = progress(units.label("generating"), len(prepared)) if progress else (lambda: None)
    t0 = time.perf_counter()

    batches = plan_batches([len(ids) for _, ids, _ in prepared], settings["batch_size"])
    done = {}
    with cp.executor(
        cluster,
        lm,
        load,
        f"{__name__}:generate_units",
        (prompts, config),
        lambda: _generate_compute(lm, layers, patterns, prepared, config),
    ) as ex:
        for i, got in units.batched(batches, ex.compute, ex.remote):
            done[i] = got[0]
            step()
        where = ex.describe()
    rows = [done[i] for i in range(len(prepared))]  # prompt order, whatever the batches
    n = len(rows)
    by = sum(r["baseline_has_test"] for r in rows)
    sy = sum(r["steered_has_test"] for r in rows)
    p_fisher = fisher_one_sided(by, sy, n)
    cats: dict[str, dict[str, int]] = {}
    for r in rows:
        c = cats.setdefault(str(r["category"]), {"total": 0, "baseline_preserved": 0, "steered_preserved": 0})
        c["total"] += 1
        c["baseline_preserved"] += r["baseline_has_test"]
        c["steered_preserved"] += r["steered_has_test"]
    prov = cp.stamp(provenance.build(model=lm, seed=config.seed, config=settings), where)
    prov["timing"] = {"seconds": time.perf_counter() - t0, "resumed_prompts": units.resumed}
    units.finish()
    return GenerateResult(
        {
            "provenance": prov,
            "samples": rows,
            "skipped": skipped,
            "summary": {
                "total": n,
                "baseline_preserved": by,
                "steered_preserved": sy,
                "improvement": sy - by,
                "baseline_rate": by / n,
                "steered_rate": sy / n,
                "gained": sum(r["change"] == "gained" for r in rows),
                "lost": sum(r["change"] == "lost" for r in rows),
                "identical": sum(r["identical"] for r in rows),
                "fisher_exact_p": p_fisher,
            },
            "by_category": cats,
        }
    )


def calibrate_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per sample of a calibration."""
    keys = ("id", "group", "status", "marker_token", "attention", "uniform_null", "scale_to_a", "note")
    return [{k: s.get(k) for k in keys} for s in result["samples"]]


def generate_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per prompt of a steered generation."""
    keys = (
        "id",
        "category",
        "baseline",
        "steered",
        "baseline_tokens",
        "steered_tokens",
        "identical",
        "baseline_has_test",
        "steered_has_test",
        "change",
    )
    return [{k: s.get(k) for k in keys} for s in result["samples"]]
