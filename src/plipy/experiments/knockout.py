"""Attention knockout: remove marker ↔ target attention edges in some layers and measure the next-token change.

Every condition (a set of layers) runs on every sample of the chosen groups. Per sample the baseline forward runs
once; conditions reuse it (`plipy.engine.runner`). The measure is KL(P_base ‖ P_knockout) in nats at the last
input position, over the full vocabulary in float64 (plus PLIP's truncated `kl_plip`, entropy change, top-1 flip and
the top-5 changed tokens). Samples where a knockout is empty or impossible carry a status and are left out of the
statistics, never counted as 0.

Edge sets (m = the marker token, S = sequence length):
- `marker-to-targets` (PLIP's default): query m → each target key before or at m (exact token matches only);
- `to-marker` (PLIP's `--all-edges`): every query q ≥ m → key m, the marker's self edge included;
- `from-marker`: query m → every key k < m (the whole marker row except its self edge).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from plipy import checkpoint, measures, provenance, stats
from plipy.corpus import Corpus, SamplePositions, token_positions, valid_targets
from plipy.engine import EdgeEdit, Engine
from plipy.engine.batch import default_batch_size, pad_id, plan_batches
from plipy.engine.runner import RULES_VERSION, Baseline, ConditionRunner, dead_row, layer_windows
from plipy.engine.spec import compile_edits
from plipy.errors import PlipyError
from plipy.experiments.scan import after_marker, choose_groups, identity
from plipy.finite import naming
from plipy.options import parse_layers
from plipy.results import KnockoutResult

EDGE_KINDS = ("marker-to-targets", "to-marker", "from-marker")
MODES = ("layer", "layers", "scan-layers", "scan-windows", "slide-window")


@dataclass
class Condition:
    """One knockout condition: the layers it edits and how it is named in tables."""

    layers: list[int]
    label: str
    extra: dict = field(default_factory=dict)  # e.g. {"radius": 2} or {"start": 4}


@dataclass
class KnockoutConfig:
    """What to knock out. `heads` None = every head, [] = none (an identity run: KL exactly 0)."""

    conditions: list[Condition]
    mode: str = "layer"
    edges: str = "marker-to-targets"
    heads: Sequence[int] | None = None
    groups: Sequence[str] | None = None
    include_baselines: bool = False
    bos: bool = False
    seed: int = 0
    n_resamples: int = 10000
    path: str = "auto"  # runner path: auto | fast | naive
    max_batch: int = 32
    top_k: int = 5
    extra: dict = field(default_factory=dict)
    resume: bool = True  # keep finished samples on disk until the result is complete (plipy.checkpoint)
    fresh: bool = False  # discard what an interrupted run with the same settings left
    batch_size: int | None = None  # baselines per forward (None: plipy.engine.batch.default_batch_size)


# -- conditions ----------------------------------------------------------------------------------------------------


def plip_default_layer(n_layers: int) -> int:
    """PLIP-rs' default knockout layer: 20 for ≥ 32 layers, 16 for ≥ 28, else 14 (clipped to the model)."""
    layer = 20 if n_layers >= 32 else 16 if n_layers >= 28 else 14
    return min(layer, n_layers - 1)


def layer_label(layers: Sequence[int]) -> str:
    """`5`, `3-7` for a contiguous range, else `1,4,9`."""
    ls = sorted(layers)
    if len(ls) == 1:
        return str(ls[0])
    if ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return ",".join(map(str, ls))


def _check_layer(layer: int, n_layers: int, what: str = "layer") -> int:
    """`layer` if the model has it (a ParameterError naming `what` otherwise)."""
    return parse_layers(int(layer), n_layers, param=what)[0]


def build_conditions(
    mode: str,
    n_layers: int,
    layer: int | None = None,
    layers: Any = None,
    center: int | None = None,
    max_radius: int | None = 5,
    window: int | None = None,
) -> list[Condition]:
    """The conditions of a mode: one layer, a set of layers together (the `plipy.options` grammar: `10-14`,
    `3,5,7`, a list…), each layer, expanding windows c±r, or sliding windows."""
    if mode == "layer":
        lay = plip_default_layer(n_layers) if layer is None else _check_layer(layer, n_layers)
        return [Condition([lay], str(lay))]
    if mode == "layers":
        rng = parse_layers(layers, n_layers)
        return [Condition(rng, layer_label(rng))]
    if mode == "scan-layers":
        return [Condition([i], str(i)) for i in range(n_layers)]
    if mode == "scan-windows":
        c = plip_default_layer(n_layers) if center is None else _check_layer(center, n_layers, "center")
        max_radius = 5 if max_radius is None else max_radius
        if max_radius < 0:
            raise PlipyError(f"--max-radius must be ≥ 0, got {max_radius}")
        out: list[Condition] = []
        seen: set[tuple[int, int]] = set()
        for r in range(max_radius + 1):
            lo, hi = max(0, c - r), min(c + r, n_layers - 1)
            if (lo, hi) in seen:  # both ends clipped: the same window again
                continue
            seen.add((lo, hi))
            out.append(Condition(list(range(lo, hi + 1)), f"{c}±{r}", {"center": c, "radius": r}))
        return out
    if mode == "slide-window":
        if window is None or not 1 <= window <= n_layers:
            raise PlipyError(f"--slide-window needs a width 1-{n_layers}, got {window}")
        return [
            Condition(list(range(s, s + window)), layer_label(range(s, s + window)), {"start": s})
            for s in range(n_layers - window + 1)
        ]
    raise PlipyError(f"unknown knockout mode {mode!r}; one of {', '.join(MODES)}")


# -- edges per sample ----------------------------------------------------------------------------------------------


def knockout_edges(sp: SamplePositions, kind: str) -> tuple[list[tuple[int, int]], str, str | None]:
    """(edges, status, note) of one sample: status `ok`, `failed` (no exact marker token) or `no-edges`."""
    if kind not in EDGE_KINDS:
        raise PlipyError(f"unknown edge set {kind!r}; one of {', '.join(EDGE_KINDS)}")
    m = sp.marker_token
    if m is None or sp.marker_match != "exact":
        return [], "failed", "the marker has no exact token (PLIP's knockout uses the exact rule only)"
    if kind == "marker-to-targets":
        targets = sorted(set(valid_targets(sp, exact_only=True)))  # a duplicated target is one edge
        if not targets:
            if sp.after_marker and all(sp.after_marker):
                return [], "no-edges", "every target is after the marker: there is no marker → target attention"
            return [], "no-edges", "no target converts to an exact token before the marker"
        return [(m, t) for t in targets], "ok", None
    if kind == "to-marker":
        return [(q, m) for q in range(m, sp.seq_len)], "ok", None
    if m == 0:
        return [], "no-edges", "the marker is token 0: its row has only its self edge"
    return [(m, k) for k in range(m)], "ok", None


def condition_edits(
    edges: list[tuple[int, int]], layers: Sequence[int], heads: Sequence[int] | None, windows: list[int | None]
) -> list[EdgeEdit]:
    """The engine edits of one (sample, condition). On sliding-window layers edges outside the window are
    dropped: the model's own mask already removes them, so knocking them out is a no-op, not an error."""
    by_window: dict[int | None, list[int]] = {}
    for layer in layers:
        by_window.setdefault(windows[layer], []).append(layer)
    out = []
    for w, ls in by_window.items():
        kept = edges if w is None else [(q, k) for q, k in edges if q - k < w]
        out.append(EdgeEdit(layers=ls, edges=kept, scale=0.0, heads=heads))
    return out


def sample_record(sp: SamplePositions, kind: str) -> dict[str, Any]:
    """Identity, positions and edge set of one sample."""
    edges, status, note = knockout_edges(sp, kind)
    rec = {
        **identity(sp),
        "targets_after_marker": after_marker(sp),
        "n_edges": len(edges),
        "edges": [list(e) for e in edges],
        "status": status,
    }
    if note:
        rec["note"] = note
    return rec


# -- the experiment ------------------------------------------------------------------------------------------------


def _check_config(config: KnockoutConfig, n_layers: int, n_heads: int) -> list[int] | None:
    """Validate the config against the model; returns the sorted heads (None = every head)."""
    if config.edges not in EDGE_KINDS:
        raise PlipyError(f"unknown edge set {config.edges!r}; one of {', '.join(EDGE_KINDS)}")
    if not config.conditions:
        raise PlipyError("no knockout condition to run")
    for c in config.conditions:
        for layer in c.layers:
            _check_layer(layer, n_layers)
    heads = None if config.heads is None else sorted({int(h) for h in config.heads})
    for h in heads or []:
        if not 0 <= h < n_heads:
            raise PlipyError(f"head {h} does not exist: the model has {n_heads} query heads (0-{n_heads - 1})")
    return heads


def prepare_samples(
    lm: Any, corpus: Corpus, config: KnockoutConfig, groups: list[str], pair: tuple[str, str], heads: list[int] | None
) -> tuple[list[dict[str, Any]], list[SamplePositions]]:
    """Sample records with their edge sets and statuses; refuses a run that could give no statistics."""
    samples: list[dict[str, Any]] = []
    positions: list[SamplePositions] = []
    for s in corpus.samples(groups):
        sp = token_positions(s, lm.tokenizer, bos=config.bos, max_length=lm.max_positions)
        rec = sample_record(sp, config.edges)
        if rec["status"] == "ok":
            # a knockout that empties a row is impossible whatever the layer: say so before running anything
            dead = dead_row(compile_edits([EdgeEdit([0], rec["edges"], 0.0, heads)], lm.n_layers, lm.n_heads))
            if dead:
                rec["status"], rec["note"] = "row-fully-masked", dead.split(": ", 1)[1]
        samples.append(rec)
        positions.append(sp)
    usable = [s for s in samples if s["status"] == "ok"]
    if not usable:
        reasons = sorted({f"{s['status']} ({s.get('note', '')})" for s in samples})
        raise PlipyError(f"no usable sample for {config.edges} knockout: " + "; ".join(reasons))
    for g in pair:
        if sum(1 for s in usable if s["group"] == g) < 2:
            raise PlipyError(
                f"group {g!r} has fewer than 2 usable samples for {config.edges} knockout: no statistics possible"
            )
    return samples, positions


def status_rows(rec: dict[str, Any], config: KnockoutConfig) -> list[dict[str, Any]]:
    """The rows of a sample that cannot run: its status under every condition."""
    return [
        {"id": rec["id"], "group": rec["group"], "kl": None, "status": rec["status"], "note": rec.get("note")}
        for _ in config.conditions
    ]


def run_sample(
    lm: Any,
    runner: ConditionRunner,
    rec: dict[str, Any],
    base: Baseline,
    config: KnockoutConfig,
    heads: list[int] | None,
    windows: list[int | None],
) -> list[dict[str, Any]]:
    """One sample under every condition, from its baseline: one measure row per condition (or a status row)."""
    edges = [tuple(e) for e in rec["edges"]]
    conds = [condition_edits(edges, c.layers, heads, windows) for c in config.conditions]
    rows = []
    for out in runner.run(base, conds):
        row: dict[str, Any] = {"id": rec["id"], "group": rec["group"]}
        if out.logits is None:
            row.update(kl=None, status=out.status, note=out.note)
        else:
            row.update(status="ok", **measures.compare_logits(base.logits, out.logits, lm.tokenizer, config.top_k))
            if out.status == "identity":
                # a planned condition (first_layer set) the logits cannot see, or one with nothing left to edit
                why = (
                    out.note
                    if out.first_layer is not None
                    else "nothing left to knock out (no heads, or edges outside a window)"
                )
                row["note"] = "identity: " + why
        rows.append(row)
    return rows


def _batches(indices: list[int], positions: list[SamplePositions], batch_size: int) -> list[list[int]]:
    """The samples `indices` in deterministic batches of similar length (their baselines share a forward)."""
    return [[indices[j] for j in b] for b in plan_batches([positions[i].seq_len for i in indices], batch_size)]


def _excluded(samples: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples left out of the statistics, before running (statuses) or while running (a condition failed)."""
    excluded = [
        {"id": s["id"], "group": s["group"], "status": s["status"], "note": s.get("note")}
        for s in samples
        if s["status"] != "ok"
    ]
    for run in runs:
        for r in run["samples"]:
            if r["status"] != "ok" and not any(e["id"] == r["id"] for e in excluded):
                excluded.append(
                    {
                        "id": r["id"],
                        "group": r["group"],
                        "status": r["status"],
                        "note": r.get("note"),
                        "condition": run["label"],
                    }
                )
    return excluded


def _prepare(
    lm: Any, corpus: Corpus, config: KnockoutConfig
) -> tuple[list[int] | None, list[str], tuple[str, str], list[dict[str, Any]], list[SamplePositions]]:
    """(heads, groups, compared pair, sample records, positions): alike on the driver and on every Ray worker."""
    heads = _check_config(config, lm.n_layers, lm.n_heads)
    groups, pair = choose_groups(corpus, config.groups)
    if config.include_baselines:
        groups = groups + [g for g in corpus.group_names if g.endswith("_baseline") and g not in groups]
    samples, positions = prepare_samples(lm, corpus, config, groups, pair, heads)
    return heads, groups, pair, samples, positions


def _compute(
    lm: Any,
    runner: ConditionRunner,
    samples: list[dict[str, Any]],
    positions: list[SamplePositions],
    config: KnockoutConfig,
    heads: list[int] | None,
) -> Callable[[list[int]], list]:
    windows = layer_windows(lm.model, lm.n_layers)

    def compute(batch: list[int]) -> list[tuple[list[dict[str, Any]], None]]:
        with naming([f"sample {samples[i]['id']!r}" for i in batch]):
            bases = runner.baselines([positions[i].input_ids for i in batch], pad_token=pad_id(lm.tokenizer))
        out = []
        for i, b in zip(batch, bases, strict=True):
            with naming(f"sample {samples[i]['id']!r}"):
                out.append((run_sample(lm, runner, samples[i], b, config, heads, windows), None))
        return out

    return compute


def unit_compute(lm: Any, corpus: Corpus, config: KnockoutConfig) -> Callable[[list[int]], list]:
    """A Ray worker's `compute(batch)` (`plipy.cluster`): the local path's own code on the worker's model."""
    heads, _, _, samples, positions = _prepare(lm, corpus, config)
    runner = ConditionRunner(lm.model, Engine(lm.model), path=config.path, max_batch=config.max_batch)
    return _compute(lm, runner, samples, positions, config, heads)


def run_knockout(
    lm: Any,
    corpus: Corpus,
    config: KnockoutConfig,
    *,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    runner: ConditionRunner | None = None,
    cluster: Any = None,
    load: dict[str, Any] | None = None,
) -> KnockoutResult:
    """Every condition on every sample of the chosen groups; returns samples, per-condition runs and statistics.
    With a `cluster` (`plipy.cluster.Cluster`) the batches run on Ray workers that load the model with `load`."""
    from plipy.cluster import pool as cp

    heads, groups, pair, samples, positions = _prepare(lm, corpus, config)
    runner = runner or ConditionRunner(lm.model, Engine(lm.model), path=config.path, max_batch=config.max_batch)
    batch_size = config.batch_size or default_batch_size(lm.device)
    all_heads = heads if heads is not None else list(range(lm.n_heads))
    runs = [
        {"layers": c.layers, "label": c.label, **c.extra, "edges": config.edges, "heads": all_heads, "samples": []}
        for c in config.conditions
    ]
    settings = {
        "mode": config.mode,
        "conditions": [c.layers for c in config.conditions],
        "edges": config.edges,
        "heads": all_heads,
        "groups": groups,
        "compared": list(pair),
        "include_baselines": config.include_baselines,
        "bos": config.bos,
        "n_resamples": config.n_resamples,
        "top_k": config.top_k,
        "kl": "KL(P_base || P_knockout), nats, last input position, full vocabulary, float64, all terms",
        "kl_plip": "the same with only terms p > 1e-10 and q > 1e-10 (PLIP-rs), float64",
        "batch_size": batch_size,
        **config.extra,
    }
    units = checkpoint.open_run(
        "knockout",
        lm,
        corpus,
        settings,
        resume=config.resume,
        fresh=config.fresh,
        runner=config.path,  # fast and naive agree to rounding, not bit for bit
        runner_rules=RULES_VERSION,
    )
    step = progress(units.label("knockout"), len(samples)) if progress else (lambda: None)
    t0 = time.perf_counter()
    rows_of: dict[int, list[dict[str, Any]]] = {}
    for i, rec in enumerate(samples):
        if rec["status"] != "ok":
            rows_of[i] = status_rows(rec, config)
            step()

    ok = [i for i, rec in enumerate(samples) if rec["status"] == "ok"]
    with cp.executor(
        cluster,
        lm,
        load,
        f"{__name__}:unit_compute",
        (corpus, config),
        lambda: _compute(lm, runner, samples, positions, config, heads),
    ) as ex:
        for i, got in units.batched(_batches(ok, positions, batch_size), ex.compute, ex.remote):
            rows_of[i] = got[0]
            step()
        where = ex.describe()
    for i in range(len(samples)):
        for run, row in zip(runs, rows_of[i], strict=True):
            run["samples"].append(row)
    elapsed = time.perf_counter() - t0
    for run in runs:
        run["groups"] = {g: stats.describe(_kls(run, g)) for g in groups}
    _compare(runs, pair, config.seed, config.n_resamples)
    prov = provenance.build(model=lm, corpus=corpus, seed=config.seed, config={**settings, "runner": runner.describe()})
    # wall-clock time is provenance: it differs between two runs that give the same numbers
    prov["timing"] = {
        "seconds": elapsed,
        "path": runner.path,
        "samples": sum(s["status"] == "ok" for s in samples),
        "conditions": len(config.conditions),
        "resumed_samples": units.resumed,
    }
    if where is not None:
        prov["cluster"] = where
    result = KnockoutResult(
        {
            "provenance": prov,
            "mode": config.mode,
            "edges": config.edges,
            "heads": all_heads,
            "groups_compared": list(pair),
            "samples": samples,
            "excluded": _excluded(samples, runs),
            "runs": runs,
        }
    )
    units.finish()
    return result


def _kls(run: dict, group: str) -> list[float]:
    return [r["kl"] for r in run["samples"] if r["group"] == group and r["status"] == "ok"]


def _compare(runs: list[dict], pair: tuple[str, str], seed: int, n_resamples: int) -> None:
    """Welch, Hedges' g, bootstrap CI and the group ratio per condition; Holm/BH across the conditions."""
    ga, gb = pair
    ok = [i for i, r in enumerate(runs) if len(_kls(r, ga)) >= 2 and len(_kls(r, gb)) >= 2]
    results = stats.compare_conditions(
        [(_kls(runs[i], ga), _kls(runs[i], gb)) for i in ok], seed=seed, n_resamples=n_resamples, names=pair
    )
    for i, res in zip(ok, results, strict=True):
        res = dict(res)
        res.pop("groups", None)  # every group is described in run["groups"] already
        # PLIP's ratio is 0 whenever mean_b ≤ 0.001, i.e. for most KLs (nats): keep it, but report the plain one
        res["ratio_plip"] = res["ratio"]
        ma, mb = runs[i]["groups"][ga]["mean"], runs[i]["groups"][gb]["mean"]
        res["ratio"] = ma / mb if mb else None
        runs[i].update(res)
    for i, r in enumerate(runs):
        if i not in ok:
            r.update(t=None, df=None, p=None, note=f"fewer than 2 usable samples in {ga} or {gb}")


def sample_rows(result: dict) -> list[dict[str, Any]]:
    """One flat row per (condition, sample) for pandas (the Parquet file)."""
    rows = []
    for i, run in enumerate(result["runs"]):
        for r in run["samples"]:
            rows.append(
                {
                    "condition": i,
                    "label": run["label"],
                    "layers": run["layers"],
                    "edges": run["edges"],
                    "id": r["id"],
                    "group": r["group"],
                    "status": r["status"],
                    "kl": r.get("kl"),
                    "kl_plip": r.get("kl_plip"),
                    "entropy_base": r.get("entropy_base"),
                    "entropy_intervened": r.get("entropy_intervened"),
                    "entropy_change": r.get("entropy_change"),
                    "top1_changed": r.get("top1_changed"),
                    "top1_base_token": r.get("top1_base_token"),
                    "top1_intervened_token": r.get("top1_intervened_token"),
                }
            )
    return rows
