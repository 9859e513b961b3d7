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

`ablation`: `zero` removes the edges (the knockout); `mean` and `resample` set each edge row's total weight to the
group's mean or a donor's clean value instead (`plipy.experiments.edge_ablation`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from plipy import divergence, stats
from plipy.corpus import Corpus, SamplePositions, token_positions, valid_targets
from plipy.engine import EdgeEdit, Engine
from plipy.engine.batch import pad_id
from plipy.engine.runner import RULES_VERSION, Baseline, ConditionRunner, dead_row, layer_windows
from plipy.engine.spec import compile_edits
from plipy.errors import ParameterError, PlipyError
from plipy.experiments.edge_ablation import (
    ABLATIONS,
    DESCRIPTIONS,
    AblationValues,
    EdgeMasses,
    ablation_values,
    mass_edits,
)
from plipy.experiments.samples import after_marker, choose_groups, identity
from plipy.finite import naming
from plipy.models import LoadedModel
from plipy.options import check_choice, check_positive, layer_label, parse_layers, plip_default_layer
from plipy.results import KnockoutResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, length_batches

EDGE_KINDS = ("marker-to-targets", "to-marker", "from-marker")
MODES = ("layer", "layers", "scan-layers", "scan-windows", "slide-window")


@dataclass
class Condition:
    """One knockout condition: the layers it edits and how it is named in tables."""

    layers: list[int]
    label: str
    extra: dict = field(default_factory=dict)  # e.g. {"radius": 2} or {"start": 4}


# -- conditions ----------------------------------------------------------------------------------------------------


def _check_layer(layer: int, n_layers: int, param: str) -> int:
    """`layer` if the model has it (a ParameterError naming `param` otherwise)."""
    return parse_layers(int(layer), n_layers, param=param)[0]


def build_conditions(
    mode: str,
    n_layers: int,
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    center: int | None = None,
    max_radius: int | None = 5,
    window: int | None = None,
) -> list[Condition]:
    """The conditions of a mode: one layer, a set of layers together (`layers`: indices, as
    `plipy.options.parse_layers` resolves the grammar), each layer, expanding windows c±r, or sliding windows."""
    if mode == "layer":
        lay = plip_default_layer(n_layers) if layer is None else _check_layer(layer, n_layers, "layer")
        return [Condition([lay], str(lay))]
    if mode == "layers":
        if not layers:
            raise ParameterError("layers", "names no layer: give the layers knocked out together")
        rng = sorted({int(x) for x in layers})
        return [Condition(rng, layer_label(rng))]
    if mode == "scan-layers":
        return [Condition([i], str(i)) for i in range(n_layers)]
    if mode == "scan-windows":
        return _windows(n_layers, center, max_radius)
    if mode == "slide-window":
        if window is None or not 1 <= window <= n_layers:
            raise ParameterError("slide_window", f"needs a width 1-{n_layers}, got {window}")
        return [
            Condition(list(range(s, s + window)), layer_label(range(s, s + window)), {"start": s})
            for s in range(n_layers - window + 1)
        ]
    raise ParameterError("mode", f"unknown knockout mode {mode!r}; one of {', '.join(MODES)}")


def _windows(n_layers: int, center: int | None, max_radius: int | None) -> list[Condition]:
    """Expanding windows c±r, r = 0…max_radius, clipped to the model (a clipped repeat is dropped)."""
    c = plip_default_layer(n_layers) if center is None else _check_layer(center, n_layers, "center")
    max_radius = 5 if max_radius is None else check_positive(max_radius, param="max_radius", minimum=0)
    out: list[Condition] = []
    seen: set[tuple[int, int]] = set()
    for r in range(max_radius + 1):
        lo, hi = max(0, c - r), min(c + r, n_layers - 1)
        if (lo, hi) in seen:  # both ends clipped: the same window again
            continue
        seen.add((lo, hi))
        out.append(Condition(list(range(lo, hi + 1)), f"{c}±{r}", {"center": c, "radius": r}))
    return out


# -- edges per sample ----------------------------------------------------------------------------------------------


def knockout_edges(sp: SamplePositions, kind: str) -> tuple[list[tuple[int, int]], str, str | None]:
    """(edges, status, note) of one sample: status `ok`, `failed` (no exact marker token) or `no-edges`."""
    check_choice(kind, EDGE_KINDS, param="edges")
    m = sp.marker_token
    if m is None or sp.marker_match != "exact":
        return [], "failed", "the marker has no exact token (PLIP's knockout uses the exact rule only)"
    if kind == "marker-to-targets":
        targets = sorted(set(valid_targets(sp, exact_only=True)))  # a duplicated target is one edge
        if not targets:
            if sp.after_marker and all(sp.after_marker):
                return [], "no-edges", "every target is after the marker: there is no marker → target attention"
            if sp.unusable and all(sp.unusable):
                return [], "no-edges", "every target is after the marker or on its own token: no marker → target edge"
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

KL_NOTE = "KL(P_base || P_knockout), nats, last input position, full vocabulary, float64, all terms"
KL_PLIP_NOTE = "the same with only terms p > 1e-10 and q > 1e-10 (PLIP-rs), float64"


def check_heads(heads: Sequence[int] | None, n_heads: int) -> list[int] | None:
    """The sorted unique knocked-out heads (None = every head), each one the model has."""
    out = None if heads is None else sorted({int(h) for h in heads})
    for h in out or []:
        if not 0 <= h < n_heads:
            raise ParameterError(
                "heads", f"head {h} does not exist: the model has {n_heads} query heads (0-{n_heads - 1})"
            )
    return out


def prepare_samples(
    lm: LoadedModel,
    corpus: Corpus,
    edges: str,
    bos: bool,
    groups: list[str],
    pair: tuple[str, str],
    heads: list[int] | None,
) -> tuple[list[dict[str, Any]], list[SamplePositions]]:
    """Sample records with their edge sets and statuses; refuses a run that could give no statistics."""
    samples: list[dict[str, Any]] = []
    positions: list[SamplePositions] = []
    for s in corpus.samples(groups):
        sp = token_positions(s, lm.tokenizer, bos=bos, max_length=lm.max_positions)
        rec = sample_record(sp, edges)
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
        raise PlipyError(f"no usable sample for {edges} knockout: " + "; ".join(reasons))
    for g in pair:
        if sum(1 for s in usable if s["group"] == g) < 2:
            raise PlipyError(
                f"group {g!r} has fewer than 2 usable samples for {edges} knockout: no statistics possible"
            )
    return samples, positions


def status_rows(rec: dict[str, Any], n_conditions: int) -> list[dict[str, Any]]:
    """The rows of a sample that cannot run: its status under every condition."""
    return [
        {"id": rec["id"], "group": rec["group"], "kl": None, "status": rec["status"], "note": rec.get("note")}
        for _ in range(n_conditions)
    ]


def run_sample(
    lm: LoadedModel,
    runner: ConditionRunner,
    rec: dict[str, Any],
    base: Baseline,
    conditions: Sequence[Condition],
    heads: list[int] | None,
    windows: list[int | None],
    top_k: int = 5,
    values: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One sample under every condition, from its baseline: one measure row per condition (or a status row).
    `values`: the edge masses a mean or resample ablation sets (`[layers, heads, rows]`); None knocks out."""
    edges = [(int(q), int(k)) for q, k in rec["edges"]]
    conds = [
        condition_edits(edges, c.layers, heads, windows)
        if values is None
        else mass_edits(edges, c.layers, heads, windows, values)
        for c in conditions
    ]
    rows = []
    for out in runner.run(base, conds):
        row: dict[str, Any] = {"id": rec["id"], "group": rec["group"]}
        if out.logits is None:
            row.update(kl=None, status=out.status, note=out.note)
        else:
            row.update(status="ok", **divergence.compare_logits(base.logits, out.logits, lm.tokenizer, top_k))
            if out.status == "identity":
                # a planned condition (first_layer set) the logits cannot see, or one with nothing left to edit
                why = (
                    out.note
                    if out.first_layer is not None
                    else "nothing left to knock out (no heads, or edges outside a window)"
                )
                row["note"] = f"identity: {why}"
        rows.append(row)
    return rows


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


@dataclass
class KnockoutPlan:
    """Everything the units of a knockout depend on, computed alike on the driver and on every Ray worker."""

    heads: list[int] | None  # sorted; None = every head (the engine's own "all")
    all_heads: list[int]  # the heads as results list them
    groups: list[str]
    pair: tuple[str, str]
    samples: list[dict[str, Any]]
    positions: list[SamplePositions]
    windows: list[int | None]  # per layer, its sliding window (None: full attention)
    runner: ConditionRunner
    ablation: AblationValues | None = None  # mean or resample: what each sample's edge rows are set to


@dataclass
class Knockout(Experiment[KnockoutPlan, KnockoutResult]):
    """Every condition on every sample of the chosen groups: samples, per-condition runs and statistics.

    `heads` None = every head, [] = none (an identity run: KL exactly 0). `path` is the runner path (auto | fast |
    naive) and `max_batch` its conditions per batched forward; a `runner` given here is reused locally (Ray workers
    build their own from `path` and `max_batch`)."""

    kind = "knockout"
    label = "knockout"

    corpus: Corpus
    conditions: list[Condition]
    mode: str = "layer"
    edges: str = "marker-to-targets"
    heads: Sequence[int] | None = None
    groups: Sequence[str] | None = None
    include_baselines: bool = False
    bos: bool = False
    seed: int = 0
    n_resamples: int = 10000
    path: str = "auto"
    max_batch: int = 32
    top_k: int = 5
    extra: dict[str, Any] = field(default_factory=dict)
    runner: ConditionRunner | None = None
    ablation: str = "zero"
    masses: dict[str, np.ndarray] | None = None  # clean edge masses per sample id (`masses_phase`), for mean/resample

    def __post_init__(self) -> None:
        if self.runner is not None:  # the workers of a Ray run build the runner the caller gave
            self.path, self.max_batch = self.runner.path, self.runner.max_batch
        check_choice(self.ablation, ABLATIONS, param="ablation")

    def local_only(self) -> tuple[str, ...]:
        return ("runner",)  # it holds this process' model

    def _samples(self, lm: LoadedModel) -> tuple[list[int] | None, list[str], tuple[str, str], list, list]:
        """(heads, groups, compared pair, sample records, positions), checked."""
        check_choice(self.edges, EDGE_KINDS, param="edges")
        if not self.conditions:
            raise ParameterError("conditions", "no knockout condition to run")
        for c in self.conditions:
            parse_layers(list(c.layers), lm.n_layers, param="conditions")
        heads = check_heads(self.heads, lm.n_heads)
        groups, pair = choose_groups(self.corpus, self.groups)
        if self.include_baselines:
            groups = groups + [g for g in self.corpus.group_names if g.endswith("_baseline") and g not in groups]
        samples, positions = prepare_samples(lm, self.corpus, self.edges, self.bos, groups, pair, heads)
        return heads, groups, pair, samples, positions

    def masses_phase(self, lm: LoadedModel) -> EdgeMasses:
        """The phase that records every usable sample's clean edge masses (run it, set `masses`, then run this)."""
        _, _, _, samples, positions = self._samples(lm)
        layers = sorted({layer for c in self.conditions for layer in c.layers})
        return EdgeMasses(self.corpus, samples, positions, self.edges, layers)

    def plan(self, lm: LoadedModel) -> KnockoutPlan:
        heads, groups, pair, samples, positions = self._samples(lm)
        runner = self.runner or ConditionRunner(lm.model, Engine(lm.model), path=self.path, max_batch=self.max_batch)
        all_heads = heads if heads is not None else list(range(lm.n_heads))
        windows = layer_windows(lm.model, lm.n_layers)
        values = None
        if self.ablation != "zero":
            if self.masses is None:
                raise PlipyError(f"{self.ablation} ablation needs the clean edge masses (Knockout.masses_phase)")
            values = ablation_values(self.ablation, samples, self.masses, self.seed)
            _mark_no_donor(samples, values)
        return KnockoutPlan(heads, all_heads, groups, pair, samples, positions, windows, runner, values)

    def settings(self, lm: LoadedModel, plan: KnockoutPlan, batch_size: int) -> Settings:
        config = {
            "mode": self.mode,
            "conditions": [c.layers for c in self.conditions],
            "edges": self.edges,
            "heads": plan.all_heads,
            "groups": plan.groups,
            "compared": list(plan.pair),
            "include_baselines": self.include_baselines,
            "bos": self.bos,
            "n_resamples": self.n_resamples,
            "top_k": self.top_k,
            "kl": KL_NOTE,
            "kl_plip": KL_PLIP_NOTE,
            "batch_size": batch_size,
            "ablation": self.ablation,
            **self.extra,
        }
        # fast and naive agree to rounding, not bit for bit: units of one never finish a run of the other
        key: dict[str, Any] = {"runner": self.path, "runner_rules": RULES_VERSION}
        if plan.ablation is not None:  # the values set are part of what the units computed
            key["ablation_values"] = _digest(plan.ablation.values)
        return Settings(config, self.corpus, self.seed, key, described={"runner": plan.runner.describe()})

    def work(self, plan: KnockoutPlan, batch_size: int) -> Work:
        ok = [i for i, rec in enumerate(plan.samples) if rec["status"] == "ok"]
        lengths = [sp.seq_len for sp in plan.positions]
        # baselines of similar length share a forward; samples with a status need none
        return Work(length_batches(ok, lengths, batch_size), settled=len(plan.samples) - len(ok))

    def compute(self, lm: LoadedModel, plan: KnockoutPlan, batch: list[int]) -> list[Unit]:
        with naming([f"sample {plan.samples[i]['id']!r}" for i in batch]):
            bases = plan.runner.baselines([plan.positions[i].input_ids for i in batch], pad_token=pad_id(lm.tokenizer))
        out: list[Unit] = []
        for i, b in zip(batch, bases, strict=True):
            with naming(f"sample {plan.samples[i]['id']!r}"):
                values = None if plan.ablation is None else plan.ablation.values[plan.samples[i]["id"]]
                sample = run_sample(
                    lm, plan.runner, plan.samples[i], b, self.conditions, plan.heads, plan.windows, self.top_k, values
                )
            out.append((sample, {}))
        return out

    def assemble(
        self, lm: LoadedModel, plan: KnockoutPlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> KnockoutResult:
        runs = [
            {
                "layers": c.layers,
                "label": c.label,
                **c.extra,
                "edges": self.edges,
                "heads": plan.all_heads,
                "samples": [],
            }
            for c in self.conditions
        ]
        for i, rec in enumerate(plan.samples):  # rows in sample order, whatever order the batches ran in
            rows = units[i][0] if i in units else status_rows(rec, len(self.conditions))
            for run, row in zip(runs, rows, strict=True):
                run["samples"].append(row)
        for run in runs:
            run["groups"] = {g: stats.describe(_kls(run, g)) for g in plan.groups}
        _compare(runs, plan.pair, self.seed, self.n_resamples)
        # what the runner did (its forward calls, a fallback): known only now that it ran
        provenance["config"]["runner"] = plan.runner.describe()
        doc = {
            "provenance": provenance,
            "mode": self.mode,
            "edges": self.edges,
            "heads": plan.all_heads,
            "groups_compared": list(plan.pair),
            "samples": plan.samples,
            "excluded": _excluded(plan.samples, runs),
            "runs": runs,
        }
        if plan.ablation is not None:  # a knockout (zero ablation) keeps the document it always had
            doc["ablation"] = _ablation_block(self.ablation, plan, self.conditions)
        return KnockoutResult(doc)


def _mark_no_donor(samples: list[dict[str, Any]], values: AblationValues) -> None:
    """Resample ablation: a usable sample without a donor (no other sample of its group has as many edge rows)
    gets the status `no-donor` and is left out, named."""
    for rec in samples:
        if rec["status"] == "ok" and rec["id"] not in values.values:
            rec["status"] = "no-donor"
            rec["note"] = f"no other usable sample of group {rec['group']!r} has as many edge rows to resample from"
    for rec in samples:
        if rec["id"] in values.donors and rec["status"] == "ok":
            rec["donor"] = values.donors[rec["id"]]


def _ablation_block(kind: str, plan: KnockoutPlan, conditions: Sequence[Condition]) -> dict[str, Any]:
    """What the result says about a mean or resample ablation: the rule and, for mean, the values set per group,
    layer and head (the layers of the conditions)."""
    assert plan.ablation is not None
    block: dict[str, Any] = {"kind": kind, "description": DESCRIPTIONS[kind]}
    if kind == "mean":
        layers = sorted({layer for c in conditions for layer in c.layers})
        block["means"] = {
            g: {str(layer): [float(m[layer, h]) for h in plan.all_heads] for layer in layers}
            for g, m in plan.ablation.means.items()
        }
    return block


def _digest(values: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(values):
        h.update(key.encode())
        h.update(np.ascontiguousarray(values[key]).tobytes())
    return h.hexdigest()


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
