"""Which heads carry the effect: activation patching, ablations, path patching and attribution patching.

Every sample of the chosen groups gets a counterfactual twin with aligned tokens (`experiments.counterfactual`).
A unit is one sample (one clean/corrupt pair): its unpatched runs once, then every condition × site as patched
runs of one of them (`plipy.engine.patching.PatchRunner`: the cached prefix and the layers below the patched one
are reused, many sites per batched forward). The metric m (KL(P_clean ‖ P) in nats, float64, or the probability,
the logit or a logit difference of named tokens) is normalised so that 0 is no effect and 1 the whole clean −
corrupt difference:

- denoising (the corrupt run, one site from the clean run): (m − m_corrupt) / (m_clean − m_corrupt), 1 = restored;
- noising and the ablations (the clean run, one site from the corrupt run / zero / the corpus mean at the same
  position class / another sample, seeded): (m_clean − m) / (m_clean − m_corrupt), 1 = as damaged as the corrupt
  run.

Statistics per site: the mean over samples with a seeded bootstrap CI (`plipy.stats.bootstrap_means`). Nulls beside
the effects: the identity (each direction's target run patched with its own values at every site: exactly 0) and
the ablation baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plipy import stats
from plipy.corpus import Corpus, SamplePositions, token_positions, valid_targets
from plipy.engine.batch import pad_id
from plipy.engine.patching import PatchRunner, Run, Site, SitePatch, Traced
from plipy.errors import PlipyError
from plipy.experiments.counterfactual import PAIRS_TEXT, RULE, RULE_TEXT, Twin, marker_twin, paired_twin
from plipy.experiments.samples import DEFAULT_GROUPS, identity
from plipy.results import PatchResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, chunks

POSITIONS = ("all", "marker", "targets", "last")
DIRECTIONS = ("denoising", "noising")
ABLATIONS = ("zero", "mean", "resample")
MODES = DIRECTIONS + ABLATIONS
METRICS = ("kl", "prob", "logit", "logit-diff")
SITE_SETS = ("heads", "attn", "mlp")
INPUTS = ("q", "k", "v")
# Bumped when a change alters the numbers of an unchanged configuration (checkpoints of before are not resumed).
RULES_VERSION = 1

NORMALISED = {
    "denoising": "(m − m_corrupt) / (m_clean − m_corrupt): the corrupt run with one site from the clean run; "
    "1 = the clean behaviour restored",
    "noising": "(m_clean − m) / (m_clean − m_corrupt): the clean run with one site from the corrupt run (or "
    "ablated); 1 = as damaged as the corrupt run",
}


# -- the metric ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """What is measured at the last position: `kl` = KL(P_clean ‖ P) (nats, float64, every term), `prob` or
    `logit` of the answer token, `logit-diff` = logit(answer) − logit(wrong). `answer` None: each sample's clean
    top-1 token; `wrong` None: the corrupt run's most probable token other than the answer."""

    name: str = "kl"
    answer: int | None = None
    wrong: int | None = None

    def tokens(self, clean: torch.Tensor, corrupt: torch.Tensor) -> tuple[int | None, int | None]:
        """(answer, wrong) token ids of one sample (None where the metric needs none)."""
        if self.name == "kl":
            return None, None
        answer = self.answer if self.answer is not None else int(clean.argmax())
        if self.name != "logit-diff":
            return answer, None
        if self.wrong is not None:
            return answer, self.wrong
        order = corrupt.detach().argsort(descending=True)[:2].tolist()
        return answer, order[1] if order[0] == answer else order[0]

    def value(self, logits: torch.Tensor, clean: torch.Tensor, answer: int | None, wrong: int | None) -> torch.Tensor:
        """m of logits `[..., V]` (differentiable, float64) → `[...]`."""
        x = logits.to(torch.float64)
        if self.name == "kl":
            lp = torch.log_softmax(clean.detach().to(torch.float64), -1)
            lq = torch.log_softmax(x, -1)
            p = lp.exp()
            return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
        assert answer is not None
        if self.name == "prob":
            return torch.softmax(x, -1)[..., answer]
        if self.name == "logit":
            return x[..., answer]
        assert wrong is not None
        return x[..., answer] - x[..., wrong]

    def describe(self, tokenizer: Any) -> dict[str, Any]:
        """The metric as the result states it."""
        text = {
            "kl": "KL(P_clean ‖ P_patched) in nats at the last input position, full vocabulary, float64",
            "prob": "probability of the answer token at the last input position (float64)",
            "logit": "logit of the answer token at the last input position",
            "logit-diff": "logit(answer) − logit(wrong) at the last input position",
        }[self.name]
        out: dict[str, Any] = {"name": self.name, "description": text, "normalised": NORMALISED}
        if self.name != "kl":
            out["answer"] = self.answer if self.answer is not None else "each sample's clean top-1 token"
        if self.name == "logit-diff":
            out["wrong"] = self.wrong if self.wrong is not None else "the corrupt run's top token other than the answer"
        for key in ("answer", "wrong"):
            if isinstance(out.get(key), int):
                out[f"{key}_token"] = tokenizer.decode([out[key]])
        return out


def normalise(values: np.ndarray, mode: str, m_clean: float, m_corrupt: float) -> np.ndarray | None:
    """Raw metric values → 0 = no effect, 1 = the whole clean − corrupt difference (None: that difference is 0)."""
    denom = m_clean - m_corrupt
    if denom == 0:
        return None
    return (values - m_corrupt) / denom if mode == "denoising" else (m_clean - values) / denom


# -- samples ---------------------------------------------------------------------------------------------------------


def class_positions(sp: SamplePositions) -> dict[str, list[int]]:
    """The absolute token positions of each position class of a sample (empty: the class has none here)."""
    marker = [] if sp.marker_token is None else [sp.marker_token]
    return {
        "all": list(range(sp.seq_len)),
        "marker": marker,
        "targets": sorted(set(valid_targets(sp, exact_only=True))),
        "last": [sp.seq_len - 1],
    }


def choose_groups(corpus: Corpus, groups: Sequence[str] | None) -> list[str]:
    """The groups patched: those named, else PLIP's two (when the corpus has them), else every group."""
    names = corpus.group_names
    if groups:
        unknown = [g for g in groups if g not in names]
        if unknown:
            raise PlipyError(f"unknown group(s) {', '.join(unknown)}; the corpus has: {', '.join(names)}")
        return list(groups)
    return list(DEFAULT_GROUPS) if all(g in names for g in DEFAULT_GROUPS) else names


@dataclass
class Samples:
    """The samples of a run with their twins, alike on the driver and every Ray worker."""

    groups: list[str]
    positions: list[SamplePositions]
    twins: list[Twin]
    classes: list[dict[str, list[int]]]
    records: list[dict[str, Any]]


def prepare_samples(
    lm: Any, corpus: Corpus, groups: Sequence[str] | None, pairs: dict[str, str] | None, bos: bool
) -> Samples:
    """Every sample of the chosen groups, its token positions and its counterfactual twin (refused, named, when
    the twin cannot be aligned)."""
    chosen = choose_groups(corpus, groups)
    positions, twins, records = [], [], []
    for s in corpus.samples(chosen):
        sp = token_positions(s, lm.tokenizer, bos=bos, max_length=lm.max_positions)
        if pairs is None:
            twin = marker_twin(sp, lm.tokenizer)
        elif s.id in pairs:
            twin = paired_twin(sp, pairs[s.id], lm.tokenizer)
        else:
            raise PlipyError(f"sample {s.id!r} has no counterfactual in the pairs given")
        rec = {**identity(sp), "first_diff": twin.first_diff, "status": "ok"}
        if twin.replacement is not None:
            rec["replacement"] = twin.replacement
        else:
            rec["counterfactual"] = twin.code
        positions.append(sp)
        twins.append(twin)
        records.append(rec)
    if not records:
        raise PlipyError("no sample to patch in the chosen groups")
    return Samples(chosen, positions, twins, [class_positions(sp) for sp in positions], records)


def resample_sources(samples: Samples, classes: Sequence[str], seed: int) -> dict[str, list[int | None]]:
    """Per position class, each sample's resample donor: another sample (seeded) with at least as many positions of
    that class (the k-th position takes the donor's k-th), or None when there is none."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int | None]] = {}
    for cls in classes:
        sizes = [len(c[cls]) for c in samples.classes]
        donors: list[int | None] = []
        for i, n in enumerate(sizes):
            fits = [j for j, m in enumerate(sizes) if j != i and m >= n > 0]
            donors.append(int(fits[rng.integers(len(fits))]) if fits else None)
        out[cls] = donors
    return out


def _counterfactual(pairs: dict[str, str] | None) -> dict[str, Any]:
    return {"rule": RULE, "description": RULE_TEXT} if pairs is None else {"rule": "pairs", "description": PAIRS_TEXT}


def sites_of(
    n_layers: int, n_heads: int, layers: Sequence[int], heads: Sequence[int], kinds: Sequence[str]
) -> list[Site]:
    """The sites patched: every chosen head of every chosen layer, then each layer's attention block, then its MLP."""
    out = [Site("head", layer, h) for layer in layers for h in heads] if "heads" in kinds else []
    out += [Site("attn", layer) for layer in layers] if "attn" in kinds else []
    out += [Site("mlp", layer) for layer in layers] if "mlp" in kinds else []
    return out


def _site_json(s: Site) -> dict[str, Any]:
    return {"label": s.label, "kind": s.kind, "layer": s.layer, "head": s.head}


# -- the shared unit machinery ----------------------------------------------------------------------------------------


@dataclass
class PatchPlan:
    """What every unit of a patching run depends on (alike on the driver and every Ray worker)."""

    samples: Samples
    sites: list[Site]
    conditions: list[dict[str, Any]]
    runner: PatchRunner
    donors: dict[str, list[int | None]] = field(default_factory=dict)


class _Pair:
    """One unit's runs: the clean and corrupt runs of the sample (and donors' clean runs), and its metric."""

    def __init__(self, metric: Metric, clean: Run, corrupt: Run):
        self.clean, self.corrupt = clean, corrupt
        self.metric = metric
        self.answer, self.wrong = metric.tokens(clean.logits, corrupt.logits)
        self.m_clean, self.m_corrupt = (float(v) for v in self.values([clean.logits, corrupt.logits]))

    def values(self, logits: Sequence[torch.Tensor]) -> np.ndarray:
        """m of each logits vector, float64, one vector at a time: a vocabulary-wide sum over a `[n, V]` stack may
        add in another order than over `[1, V]`, and the identity null must give the target's own m bit for bit."""
        with torch.no_grad():
            v = [self.metric.value(x, self.clean.logits, self.answer, self.wrong) for x in logits]
        return torch.stack(v).cpu().numpy().astype(np.float64)

    def target(self, mode: str) -> Run:
        return self.corrupt if mode == "denoising" else self.clean

    def record(self, tokenizer: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {"clean_metric": self.m_clean, "corrupt_metric": self.m_corrupt}
        for key, tok in (("answer", self.answer), ("wrong", self.wrong)):
            if tok is not None:
                rec[key] = tok
                rec[f"{key}_token"] = tokenizer.decode([tok])
        if self.m_clean == self.m_corrupt:
            rec["status"] = "no-effect"
            rec["note"] = "the counterfactual leaves the metric unchanged: nothing to normalise by"
        return rec


def _work(plan: PatchPlan, batch_size: int) -> Work:
    return Work(chunks(list(range(len(plan.samples.records))), batch_size))


def _runs(lm: Any, runner: PatchRunner, samples: Samples, batch: list[int], donors: list[int]) -> dict:
    """The clean and corrupt runs of the batch's samples and the clean runs of their donors, from one left-padded
    forward: {("clean" | "corrupt", sample): Run}."""
    keys = [(k, i) for i in batch for k in ("clean", "corrupt")]
    keys += [("clean", j) for j in sorted(set(donors)) if ("clean", j) not in keys]
    seqs = [samples.positions[i].input_ids if k == "clean" else list(samples.twins[i].ids) for k, i in keys]
    return dict(zip(keys, runner.baselines(seqs, pad_id(lm.tokenizer)), strict=True))


def _identity(pair: _Pair, runner: PatchRunner, sites: list[Site], modes: Sequence[str]) -> dict[str, float]:
    """Each direction's target run patched with its own values at every site and position: its own m exactly."""
    out = {}
    for mode in [m for m in DIRECTIONS if m in modes]:
        target = pair.target(mode)
        every = torch.arange(target.n_tokens)
        logits = runner.run(target, [[SitePatch(s, every, target.value(s)) for s in sites]])
        out[mode] = float(pair.values(logits)[0])
    return out


def assemble_patch(
    plan: PatchPlan,
    units: dict[int, Unit],
    provenance: dict[str, Any],
    *,
    method: str,
    seed: int,
    n_resamples: int,
    head: dict[str, Any],
    array: str = "metric",
) -> PatchResult:
    """The result document: sample records, per condition the per-sample raw and normalised values and their
    means with bootstrap CIs, the identity nulls, exclusions."""
    records = plan.samples.records
    for i, (value, _) in units.items():
        records[i].update(value)
    order = sorted(units)  # sample order, whatever order the batches ran in
    conditions = []
    for ci, cond in enumerate(plan.conditions):
        ids, raw, norm = [], [], []
        for i in order:
            row = units[i][1][array][ci]
            if np.isnan(row).all():
                continue  # the class has no position in this sample, or no donor
            rec = records[i]
            if cond.get("estimate") == "attribution":  # a first-order Δm: normalised like the difference it stands for
                n = _attribution_normalised(row, cond, rec)
            else:
                n = normalise(row, cond["mode"], rec["clean_metric"], rec["corrupt_metric"])
            ids.append(rec["id"])
            raw.append(_floats(row))
            norm.append(None if n is None or rec["status"] != "ok" else _floats(n))
        usable = np.array([r for r in norm if r is not None], dtype=float).reshape(-1, len(plan.sites))
        c = {k: v for k, v in cond.items() if k != "mode"}
        c["n"] = int(usable.shape[0])
        c["mean"] = _floats(usable.mean(0)) if len(usable) else [None] * len(plan.sites)
        c["ci"] = stats.bootstrap_means(usable, seed=seed, n_resamples=n_resamples) if len(usable) else None
        c["metric_mean"] = _floats(np.nanmean(np.array(raw, dtype=float), 0)) if raw else [None] * len(plan.sites)
        c["samples"] = {"ids": ids, "metric": raw, "normalised": norm}
        conditions.append(c)
    provenance["config"]["runner"] = plan.runner.describe()
    data = {
        "provenance": provenance,
        "method": method,
        **head,
        "sites": [_site_json(s) for s in plan.sites],
        "samples": records,
        "excluded": [
            {"id": r["id"], "group": r["group"], "status": r["status"], "note": r.get("note")}
            for r in records
            if r["status"] != "ok"
        ],
        "conditions": conditions,
        "identity": _identity_summary(records),
    }
    return PatchResult(data)


def _attribution_normalised(row: np.ndarray, cond: dict[str, Any], rec: dict[str, Any]) -> np.ndarray | None:
    """A first-order estimate of m_patched − m_target, normalised as the exact value is (None: nothing to
    normalise by)."""
    denom = rec["clean_metric"] - rec["corrupt_metric"]
    if denom == 0:
        return None
    return row / denom if cond["direction"] == "denoising" else -row / denom


def _floats(a: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=float)]


def _identity_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per direction: the identity null (the target run patched with its own values) over the samples."""
    out = []
    for mode in DIRECTIONS:
        rows = [r for r in records if mode in r.get("identity", {})]
        if not rows:
            continue
        key = "corrupt_metric" if mode == "denoising" else "clean_metric"
        diffs = [abs(r["identity"][mode] - r[key]) for r in rows]
        out.append(
            {
                "direction": mode,
                "n": len(rows),
                "max_abs_metric_change": max(diffs),
                "exact": all(d == 0 for d in diffs),
                "note": "every site of the target run patched with its own values at every position: the metric "
                "must be the target's own, exactly",
            }
        )
    return out


# -- activation patching and ablations --------------------------------------------------------------------------------


@dataclass
class PatchHeads(Experiment[PatchPlan, PatchResult]):
    """Activation patching (denoising, noising) and ablations (zero, mean, resample) of every site, per position
    class. `means`: the corpus means per class and site kind (from `PatchMeans`), needed for `mean`."""

    kind = "patch"
    label = "patching"
    default_batch_size = 4  # pairs per unpatched forward: each keeps every layer's activations

    corpus: Corpus
    sites: list[Site]
    positions: list[str]
    modes: list[str]
    metric: Metric = field(default_factory=Metric)
    groups: Sequence[str] | None = None
    pairs: dict[str, str] | None = None
    bos: bool = False
    seed: int = 0
    n_resamples: int = 10000
    means: dict[str, dict[str, np.ndarray]] | None = None
    path: str = "auto"
    condition_batch: int = 32
    extra: dict[str, Any] = field(default_factory=dict)

    def plan(self, lm: Any) -> PatchPlan:
        samples = prepare_samples(lm, self.corpus, self.groups, self.pairs, self.bos)
        if "mean" in self.modes and self.means is None:
            raise PlipyError("mean ablation needs the corpus means (PatchMeans)")
        conditions = [
            {
                "position": p,
                "direction": "denoising" if m == "denoising" else "noising",
                "ablation": m if m in ABLATIONS else None,
                "mode": m,
            }
            for p in self.positions
            for m in self.modes
        ]
        runner = PatchRunner(lm.model, path=self.path, max_batch=self.condition_batch)
        donors = resample_sources(samples, self.positions, self.seed) if "resample" in self.modes else {}
        return PatchPlan(samples, list(self.sites), conditions, runner, donors)

    def settings(self, lm: Any, plan: PatchPlan, batch_size: int) -> Settings:
        config = {
            "method": "activation",
            "groups": plan.samples.groups,
            "sites": [s.label for s in plan.sites],
            "positions": list(self.positions),
            "modes": list(self.modes),
            "metric": self.metric.describe(lm.tokenizer),
            "counterfactual": _counterfactual(self.pairs)["rule"],
            "bos": self.bos,
            "n_resamples": self.n_resamples,
            "batch_size": batch_size,
            **self.extra,
        }
        key = {"runner": plan.runner.path, "rules": RULES_VERSION, "pairs": self.pairs}
        if self.means is not None:
            key["means"] = {c: {k: _digest(v) for k, v in d.items()} for c, d in self.means.items()}
        return Settings(config, corpus=self.corpus, seed=self.seed, key=key)

    def work(self, plan: PatchPlan, batch_size: int) -> Work:
        return _work(plan, batch_size)

    def compute(self, lm: Any, plan: PatchPlan, batch: list[int]) -> list[Unit]:
        donors = [d for i in batch for ds in plan.donors.values() if (d := ds[i]) is not None]
        runs = _runs(lm, plan.runner, plan.samples, batch, donors)
        out = []
        for i in batch:
            pair = _Pair(self.metric, runs[("clean", i)], runs[("corrupt", i)])
            values = np.full((len(plan.conditions), len(plan.sites)), np.nan)
            for ci, cond in enumerate(plan.conditions):
                source = self._source(plan, i, cond, pair, runs)
                if source is not None:
                    pos = torch.as_tensor(plan.samples.classes[i][cond["position"]], dtype=torch.long)
                    patches = [[SitePatch(s, pos, source(s, pos))] for s in plan.sites]
                    values[ci] = pair.values(plan.runner.run(pair.target(cond["mode"]), patches))
            rec = pair.record(lm.tokenizer)
            rec["identity"] = _identity(pair, plan.runner, plan.sites, self.modes)
            out.append((rec, {"metric": values}))
        return out

    def _source(
        self, plan: PatchPlan, i: int, cond: dict[str, Any], pair: _Pair, runs: dict
    ) -> Callable[[Site, torch.Tensor], torch.Tensor] | None:
        """The values a condition writes at a site's positions, or None when it cannot run on this sample."""
        cls, mode = cond["position"], cond["mode"]
        if not plan.samples.classes[i][cls]:
            return None
        if mode in DIRECTIONS:
            src = pair.clean if mode == "denoising" else pair.corrupt
            return lambda s, pos: src.value(s)[pos.to(src.logits.device)]
        if mode == "zero":
            return lambda s, pos: torch.zeros_like(pair.clean.value(s)[: len(pos)])
        if mode == "mean":
            assert self.means is not None
            means = self.means[cls]
            return lambda s, pos: _mean_of(means, s, pair.clean).expand(len(pos), -1)
        donor = plan.donors[cls][i]
        if donor is None:
            return None
        run, theirs = runs[("clean", donor)], plan.samples.classes[donor][cls]
        return lambda s, pos: run.value(s)[torch.as_tensor(theirs[: len(pos)], device=run.logits.device)]

    def assemble(self, lm: Any, plan: PatchPlan, units: dict[int, Unit], provenance: dict[str, Any]) -> PatchResult:
        head = {"metric": self.metric.describe(lm.tokenizer), "counterfactual": _counterfactual(self.pairs)}
        return assemble_patch(
            plan, units, provenance, method="activation", seed=self.seed, n_resamples=self.n_resamples, head=head
        )


def _digest(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _mean_of(means: dict[str, np.ndarray], site: Site, like: Run) -> torch.Tensor:
    """A site's corpus mean as a `[1, d]` tensor on the run's device and dtype."""
    v = means["z"][site.layer, site.head] if site.kind == "head" else means[site.kind][site.layer]
    return torch.as_tensor(v).to(like.logits.device, like.z[0].dtype)[None]


@dataclass
class PatchMeans(Experiment[PatchPlan, dict]):
    """The mean of every site's activation over the clean runs of the corpus, per position class (each token of
    the class weighted equally): what mean ablation writes. A phase before `PatchHeads`."""

    kind = "patch-means"
    label = "corpus means"
    default_batch_size = 4

    corpus: Corpus
    positions: list[str]
    groups: Sequence[str] | None = None
    pairs: dict[str, str] | None = None
    bos: bool = False

    def plan(self, lm: Any) -> PatchPlan:
        samples = prepare_samples(lm, self.corpus, self.groups, self.pairs, self.bos)
        return PatchPlan(samples, [], [], PatchRunner(lm.model, path="naive"))

    def settings(self, lm: Any, plan: PatchPlan, batch_size: int) -> Settings:
        config = {"groups": plan.samples.groups, "positions": list(self.positions), "bos": self.bos}
        return Settings(config, corpus=self.corpus, key={"batch_size": batch_size, "pairs": self.pairs})

    def work(self, plan: PatchPlan, batch_size: int) -> Work:
        return _work(plan, batch_size)

    def compute(self, lm: Any, plan: PatchPlan, batch: list[int]) -> list[Unit]:
        seqs = [plan.samples.positions[i].input_ids for i in batch]
        runs = plan.runner.baselines(seqs, pad_id(lm.tokenizer))
        out = []
        for i, run in zip(batch, runs, strict=True):
            arrays, counts = {}, {}
            for cls in self.positions:
                pos = torch.as_tensor(plan.samples.classes[i][cls], dtype=torch.long, device=run.logits.device)
                counts[cls] = len(pos)
                for name, acts in (("z", run.z), ("attn", run.attn), ("mlp", run.mlp)):
                    arrays[f"{cls}.{name}"] = torch.stack([a[pos].double().sum(0) for a in acts]).cpu().numpy()
            out.append((counts, arrays))
        return out

    def assemble(self, lm: Any, plan: PatchPlan, units: dict[int, Unit], provenance: dict[str, Any]) -> dict:
        means: dict[str, dict[str, np.ndarray]] = {}
        np_dtype = np.float64 if next(lm.model.parameters()).dtype == torch.float64 else np.float32
        for cls in self.positions:
            count = sum(units[i][0][cls] for i in sorted(units))
            if count == 0:
                continue
            means[cls] = {
                name: (sum(units[i][1][f"{cls}.{name}"] for i in sorted(units)) / count).astype(np_dtype)
                for name in ("z", "attn", "mlp")
            }
        return means


# -- attribution patching ---------------------------------------------------------------------------------------------


@dataclass
class PatchAttribution(Experiment[PatchPlan, PatchResult]):
    """The first-order (gradient) estimate of every site's patching effect: per direction one forward of the
    target run in grad mode and one backward, the source run's activations from one plain forward; the estimate of
    m_patched − m_target at a site is Σ over its positions of (source − target) · ∂m/∂activation."""

    kind = "patch-attribution"
    label = "attribution"
    default_batch_size = 1

    corpus: Corpus
    sites: list[Site]
    positions: list[str]
    directions: list[str]
    metric: Metric = field(default_factory=Metric)
    groups: Sequence[str] | None = None
    pairs: dict[str, str] | None = None
    bos: bool = False
    seed: int = 0
    n_resamples: int = 10000
    extra: dict[str, Any] = field(default_factory=dict)

    def plan(self, lm: Any) -> PatchPlan:
        samples = prepare_samples(lm, self.corpus, self.groups, self.pairs, self.bos)
        conditions = [
            {"position": p, "direction": d, "ablation": None, "estimate": "attribution", "mode": d}
            for p in self.positions
            for d in self.directions
        ]
        return PatchPlan(samples, list(self.sites), conditions, PatchRunner(lm.model))

    def settings(self, lm: Any, plan: PatchPlan, batch_size: int) -> Settings:
        config = {
            "method": "attribution",
            "groups": plan.samples.groups,
            "sites": [s.label for s in plan.sites],
            "positions": list(self.positions),
            "directions": list(self.directions),
            "metric": self.metric.describe(lm.tokenizer),
            "counterfactual": _counterfactual(self.pairs)["rule"],
            "bos": self.bos,
            "n_resamples": self.n_resamples,
            **self.extra,
        }
        return Settings(config, corpus=self.corpus, seed=self.seed, key={"rules": RULES_VERSION, "pairs": self.pairs})

    def work(self, plan: PatchPlan, batch_size: int) -> Work:
        return _work(plan, batch_size)

    def compute(self, lm: Any, plan: PatchPlan, batch: list[int]) -> list[Unit]:
        return [self._sample(lm, plan, i) for i in batch]

    def _sample(self, lm: Any, plan: PatchPlan, i: int) -> Unit:
        runner = plan.runner
        ids = {"clean": list(plan.samples.positions[i].input_ids), "corrupt": list(plan.samples.twins[i].ids)}
        targets = {"corrupt" if d == "denoising" else "clean" for d in self.directions}
        # The second run computes only the positions from the first token the twins differ in, from the first
        # run's K/V (before it the runs are the same: source − target is exactly 0 there, and so is every term).
        first = "corrupt" if "corrupt" in targets else "clean"
        second = "clean" if first == "corrupt" else "corrupt"
        traced: dict[str, Traced] = {first: runner.traced(ids[first])}
        runs: dict[str, Run] = {first: traced[first].run}
        if second in targets:
            traced[second] = runner.traced(ids[second], prefix=runs[first])
            runs[second] = traced[second].run
        else:
            runs[second] = runner.suffix_run(ids[second], prefix=runs[first])
        pair = _Pair(self.metric, runs["clean"], runs["corrupt"])
        values = np.full((len(plan.conditions), len(plan.sites)), np.nan)
        for d in self.directions:
            target, source = ("corrupt", "clean") if d == "denoising" else ("clean", "corrupt")
            t = traced[target]
            grads = runner.gradients(t, self.metric.value(t.logits, pair.clean.logits, pair.answer, pair.wrong))
            for ci, cond in enumerate(plan.conditions):
                pos = plan.samples.classes[i][cond["position"]]
                if cond["direction"] != d or not pos:
                    continue
                p = torch.as_tensor(pos, dtype=torch.long, device=t.run.logits.device)
                values[ci] = first_order(runs[source], t.run, grads, plan.sites, p, t.start)
        return pair.record(lm.tokenizer), {"estimate": values}

    def assemble(self, lm: Any, plan: PatchPlan, units: dict[int, Unit], provenance: dict[str, Any]) -> PatchResult:
        head = {"metric": self.metric.describe(lm.tokenizer), "counterfactual": _counterfactual(self.pairs)}
        return assemble_patch(
            plan,
            units,
            provenance,
            method="attribution",
            seed=self.seed,
            n_resamples=self.n_resamples,
            head=head,
            array="estimate",
        )


def first_order(
    source: Run,
    target: Run,
    grads: dict[str, list[torch.Tensor]],
    sites: Sequence[Site],
    p: torch.Tensor,
    start: int = 0,
) -> list[float]:
    """Per site, Σ over positions `p` and dimensions of (source − target activation) × gradient, in float64: the
    first-order estimate of patching it. `grads` cover the positions from `start` on; earlier positions of `p` add
    nothing (the caller's two runs are equal there). A layer's heads are summed in one pass (per-site calls cost
    more than the backward on a CPU)."""
    p = p[p >= start]
    g = p - start
    per_layer: dict[int, list[float]] = {}
    out = []
    for s in sites:
        if s.kind == "head":
            assert s.head is not None
            if s.layer not in per_layer:
                delta = (source.z[s.layer][p] - target.z[s.layer][p]).double()  # [P, heads, d_head]
                per_layer[s.layer] = (delta * grads["z"][s.layer][g].double()).sum(dim=(0, 2)).tolist()
            out.append(per_layer[s.layer][s.head])
        else:
            delta = (source.value(s)[p] - target.value(s)[p]).double()
            out.append(float((delta * grads[s.kind][s.layer][g].double()).sum()))
    return out


def top_heads(result: PatchResult, top: int) -> dict[tuple[str, str], list[int]]:
    """Per (position, direction) of an attribution result, the indices (into its sites) of the `top` heads with
    the largest mean |normalised estimate|, largest first."""
    out = {}
    for c in result["conditions"]:
        heads = [j for j, s in enumerate(result["sites"]) if s["kind"] == "head" and c["mean"][j] is not None]
        heads.sort(key=lambda j: (-abs(c["mean"][j]), j))
        out[(c["position"], c["direction"])] = heads[:top]
    return out


def with_exact_check(attribution: PatchResult, exact: PatchResult, top: int) -> PatchResult:
    """The attribution result with the exact patching of its top heads beside it: the exact conditions (on their
    sites only) and, per condition, the Spearman rank correlation of estimate and exact value over those heads."""
    data = attribution.to_dict()
    label_index = {s["label"]: j for j, s in enumerate(data["sites"])}
    chosen = top_heads(attribution, top)
    checks = []
    for c in exact["conditions"]:
        want = chosen[(c["position"], c["direction"])]
        mine = {exact["sites"][j]["label"]: j for j in range(len(exact["sites"]))}
        cols = [mine[data["sites"][j]["label"]] for j in want]
        kept = {**c, "site_index": [label_index[exact["sites"][k]["label"]] for k in cols]}
        kept["mean"] = [c["mean"][k] for k in cols]
        kept["metric_mean"] = [c["metric_mean"][k] for k in cols]
        kept["ci"] = None if c["ci"] is None else [c["ci"][k] for k in cols]
        per = c["samples"]
        kept["samples"] = {
            "ids": per["ids"],
            "metric": [[row[k] for k in cols] for row in per["metric"]],
            "normalised": [None if row is None else [row[k] for k in cols] for row in per["normalised"]],
        }
        data["conditions"].append(kept)
        est = next(
            a for a in attribution["conditions"] if (a["position"], a["direction"]) == (c["position"], c["direction"])
        )
        pairs = [(est["mean"][j], v) for j, v in zip(want, kept["mean"], strict=True) if v is not None]
        rho = stats.spearman([a for a, _ in pairs], [b for _, b in pairs])
        checks.append(
            {
                "position": c["position"],
                "direction": c["direction"],
                "sites": [data["sites"][j]["label"] for j in want],
                "attribution": [est["mean"][j] for j in want],
                "exact": kept["mean"],
                "spearman": rho["rho"],
                "p": rho["p"],
            }
        )
    data["attribution"] = {
        "top": top,
        "note": "the heads with the largest mean |attribution estimate| per condition, patched exactly; Spearman's "
        "rank correlation of estimate and exact mean over them",
        "checks": checks,
    }
    data["identity"] = exact["identity"]
    data["provenance"]["exact"] = exact.provenance
    return PatchResult(data)


# -- path patching ---------------------------------------------------------------------------------------------------


@dataclass
class PatchPaths(Experiment[PatchPlan, PatchResult]):
    """Path patching: per sender head, the metric when only the receiver heads' query, key or value input (each
    entry of `inputs`, e.g. "q" or "kv") sees the sender's direct effect (every other path frozen at the target
    run's values)."""

    kind = "patch-paths"
    label = "path patching"
    default_batch_size = 4

    corpus: Corpus
    senders: list[Site]
    receivers: list[tuple[int, int]]
    inputs: list[str]
    positions: list[str]
    directions: list[str]
    metric: Metric = field(default_factory=Metric)
    groups: Sequence[str] | None = None
    pairs: dict[str, str] | None = None
    bos: bool = False
    seed: int = 0
    n_resamples: int = 10000
    path: str = "auto"
    condition_batch: int = 32
    extra: dict[str, Any] = field(default_factory=dict)

    def plan(self, lm: Any) -> PatchPlan:
        samples = prepare_samples(lm, self.corpus, self.groups, self.pairs, self.bos)
        conditions = [
            {"position": p, "direction": d, "ablation": None, "input": x, "mode": d}
            for p in self.positions
            for d in self.directions
            for x in self.inputs
        ]
        runner = PatchRunner(lm.model, path=self.path, max_batch=self.condition_batch)
        return PatchPlan(samples, list(self.senders), conditions, runner)

    def settings(self, lm: Any, plan: PatchPlan, batch_size: int) -> Settings:
        config = {
            "method": "path",
            "groups": plan.samples.groups,
            "senders": [s.label for s in plan.sites],
            "receivers": [list(r) for r in self.receivers],
            "inputs": list(self.inputs),
            "positions": list(self.positions),
            "directions": list(self.directions),
            "metric": self.metric.describe(lm.tokenizer),
            "counterfactual": _counterfactual(self.pairs)["rule"],
            "bos": self.bos,
            "n_resamples": self.n_resamples,
            "batch_size": batch_size,
            **self.extra,
        }
        key = {"runner": plan.runner.path, "rules": RULES_VERSION, "pairs": self.pairs}
        return Settings(config, corpus=self.corpus, seed=self.seed, key=key)

    def work(self, plan: PatchPlan, batch_size: int) -> Work:
        return _work(plan, batch_size)

    def compute(self, lm: Any, plan: PatchPlan, batch: list[int]) -> list[Unit]:
        runs = _runs(lm, plan.runner, plan.samples, batch, [])
        receivers: dict[int, list[int]] = {}
        for layer, h in self.receivers:
            receivers.setdefault(layer, []).append(h)
        out = []
        for i in batch:
            pair = _Pair(self.metric, runs[("clean", i)], runs[("corrupt", i)])
            values = np.full((len(plan.conditions), len(plan.sites)), np.nan)
            for ci, cond in enumerate(plan.conditions):
                pos = torch.as_tensor(plan.samples.classes[i][cond["position"]], dtype=torch.long)
                if not len(pos):
                    continue
                target = pair.target(cond["direction"])
                source = pair.clean if cond["direction"] == "denoising" else pair.corrupt
                deltas = plan.runner.sender_delta(target, source, plan.sites, pos)
                logits = plan.runner.run_paths(target, receivers, list(cond["input"]), plan.sites, deltas)
                values[ci] = pair.values(logits)
            rec = pair.record(lm.tokenizer)
            rec["identity"] = {}
            for d in self.directions:  # the sender patched with the target's own output: no delta, no change
                target = pair.target(d)
                none = plan.runner.sender_delta(target, target, plan.sites[:1], torch.arange(target.n_tokens))
                logits = plan.runner.run_paths(target, receivers, list(self.inputs[0]), plan.sites[:1], none)
                rec["identity"][d] = float(pair.values(logits)[0])
            out.append((rec, {"metric": values}))
        return out

    def assemble(self, lm: Any, plan: PatchPlan, units: dict[int, Unit], provenance: dict[str, Any]) -> PatchResult:
        head = {
            "metric": self.metric.describe(lm.tokenizer),
            "counterfactual": _counterfactual(self.pairs),
            "receivers": [{"layer": layer, "head": h, "label": f"L{layer}.H{h}"} for layer, h in self.receivers],
            "path_note": "direct path: each sender's effect reaches the receivers' inputs through the residual "
            "stream only; every other head and MLP between them is frozen at the target run's values",
        }
        return assemble_patch(
            plan, units, provenance, method="path", seed=self.seed, n_resamples=self.n_resamples, head=head
        )
