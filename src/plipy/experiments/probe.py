"""Linear probes: can a logistic regression read a sample's label (its corpus group, or the language) from the
residual stream after layer L, at the last token or at the marker token?

PLIP-rs trained one probe per layer on one 80/20 split of a tiny corpus and reported accuracy 1.0 everywhere. With
fewer samples than dimensions, any labelling of the training set is linearly separable, so that number says
little. plipy reports, per layer: stratified k-fold cross-validated accuracy (mean and per fold), the same
estimator on shuffled labels (the control: what the probe reaches when there is nothing to find) with a
permutation p-value (scikit-learn's `permutation_test_score`), and the majority-class baseline.

The estimator is `StandardScaler` → `LogisticRegression(C, lbfgs)`, refitted inside every fold (no leakage).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plipy import options as opt
from plipy import stats
from plipy.corpus import Corpus, CorpusError, char_to_token, encode_text, load_corpus
from plipy.engine import Engine, ResidualCapture
from plipy.errors import ParameterError, PlipyError
from plipy.finite import naming, require_finite
from plipy.models import LoadedModel
from plipy.results import ProbeResult
from plipy.runtime.experiment import Experiment, Settings, Unit, Work, chunks

FEATURES = opt.PROBE_FEATURES
LABELS = opt.PROBE_LABELS
DEFAULT_GROUPS = ("python_doctest", "rust_test")


@dataclass
class ProbeItem:
    """One labelled text; `marker_char` is the marker's first character (None: the data has no markers)."""

    id: str
    group: str
    label: str
    code: str
    marker_char: int | None = None


@dataclass
class ProbeData:
    items: list[ProbeItem]
    source: dict[str, Any]


# -- data ------------------------------------------------------------------------------------------------------------


def _label(group: str, label_by: str) -> str:
    """The class of a corpus group: the group itself, or its prefix (`python_doctest` → `python`)."""
    return group if label_by == "group" else group.split("_", 1)[0]


def from_corpus(corpus: Corpus, groups: Sequence[str] | None = None, label_by: str = "group") -> ProbeData:
    """Probe items from a corpus: default groups python_doctest and rust_test when present, else all groups."""
    if groups is None:
        names = corpus.group_names
        groups = list(DEFAULT_GROUPS) if all(g in names for g in DEFAULT_GROUPS) else names
    items = [
        ProbeItem(s.id, s.group, _label(s.group, label_by), s.code, s.marker_char_pos) for s in corpus.samples(groups)
    ]
    return ProbeData(
        items,
        {
            "kind": "corpus",
            "path": str(corpus.path),
            "sha256": corpus.sha256,
            "groups": list(groups),
            "label_by": label_by,
        },
    )


def _labelled_rows(text: str, where: str) -> list[Any] | None:
    """Rows of a labelled-snippet file (`{"samples": [...]}`, a list, or JSON Lines), None if it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        except json.JSONDecodeError:
            raise PlipyError(f"{where}: neither JSON nor JSON Lines") from None
    if isinstance(data, dict) and isinstance(data.get("samples"), list):
        return data["samples"]
    if isinstance(data, list):
        return data
    return None


def from_labelled(path: str | Path, groups: Sequence[str] | None = None) -> ProbeData:
    """Probe items from labelled snippets: `{"samples": [{"code", "label" | "language" | "group", "id"?}]}`
    (PLIP-rs' probe corpus), a JSON list of them, or JSON Lines. No markers: the feature is the last token."""
    p = Path(path)
    rows = _labelled_rows(p.read_text(encoding="utf-8"), str(p))
    if rows is None:
        raise PlipyError(f"{p}: not a labelled-snippet file")
    items = []
    for i, r in enumerate(rows):
        label = next((r.get(k) for k in ("label", "language", "group") if isinstance(r, dict) and r.get(k)), None)
        if not isinstance(r, dict) or not isinstance(r.get("code"), str) or not r["code"] or label is None:
            raise PlipyError(f'{p}: sample {i} needs a non-empty "code" and a "label" (or "language"/"group")')
        items.append(ProbeItem(str(r.get("id", i)), str(label), str(label), r["code"]))
    if groups:
        unknown = sorted(set(groups) - {it.label for it in items})
        if unknown:
            raise PlipyError(f"{p}: no sample labelled {', '.join(unknown)}")
        items = [it for it in items if it.label in groups]
    return ProbeData(
        items, {"kind": "labelled-snippets", "path": str(p), "groups": list(groups or []), "label_by": "label"}
    )


def load_data(
    data: Any = None, *, groups: Sequence[str] | None = None, label_by: str = "group", offsets: str = "chars"
) -> ProbeData:
    """A corpus (path, `Corpus` or None: the bundled one) or a labelled-snippet file, as probe items."""
    opt.check_choice(label_by, LABELS, param="label")
    if isinstance(data, ProbeData):
        return data
    if isinstance(data, Corpus):
        return from_corpus(data, groups, label_by)
    if data is None:
        return from_corpus(load_corpus(None, offsets=offsets), groups, label_by)
    try:
        return from_corpus(load_corpus(data, offsets=offsets), groups, label_by)
    except CorpusError as e:
        p = Path(data)
        try:
            text = p.read_text(encoding="utf-8") if p.is_file() else None
        except UnicodeDecodeError:
            text = None
        if text is None or _labelled_rows(text, str(p)) is None:
            raise e from None
        return from_labelled(p, groups)


def check_classes(labels: Sequence[str], folds: int) -> tuple[list[str], int]:
    """The sorted classes and the number of folds to use (≤ the smallest class); errors if a probe is impossible."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    if len(classes) < 2:
        raise PlipyError(f"a probe needs at least two classes, got {list(classes) or 'none'}")
    small = int(counts.min())
    if small < 2:
        which = [str(c) for c, n in zip(classes, counts, strict=True) if n < 2]
        raise PlipyError(
            f"class {which[0]!r} has {small} sample: stratified cross-validation needs at least 2 per class"
        )
    if folds < 2:
        raise ParameterError("folds", f"must be ≥ 2, got {folds}")
    return [str(c) for c in classes], min(folds, small)


# -- features --------------------------------------------------------------------------------------------------------


def _position(
    tokenizer: Any, item: ProbeItem, ids: list[int], offs: list[tuple[int, int]], feature: str, shift: int
) -> tuple[int | None, str | None]:
    """The token position of the feature, or (None, why)."""
    if feature == "last":
        return len(ids) - 1, None
    if item.marker_char is None:
        return None, "the data has no marker position"
    tok, how = char_to_token(offs, item.marker_char)
    if tok is None or how != "exact":
        return None, "the marker has no exact token"
    return tok + shift, None


def _excluded(item: ProbeItem, note: str) -> dict[str, Any]:
    return {"id": item.id, "group": item.group, "label": item.label, "note": note}


def _inputs(lm: LoadedModel, data: ProbeData, feature: str, bos: bool) -> list[tuple[list[int], int] | str]:
    """Per item, its token ids and feature position, or why it cannot be measured."""
    tok = lm.tokenizer
    bos_id = getattr(tok, "bos_token_id", None)
    if bos and bos_id is None:
        raise PlipyError(f"--bos: tokenizer {type(tok).__name__} has no BOS token")
    out: list[tuple[list[int], int] | str] = []
    for it in data.items:
        ids, offs = encode_text(tok, it.code)
        shift = 1 if bos else 0
        ids = [int(bos_id), *ids] if bos and bos_id is not None else ids
        pos, why = _position(tok, it, ids, offs, feature, shift)
        if pos is None or (lm.max_positions is not None and len(ids) > lm.max_positions):
            out.append(why or f"{len(ids)} tokens, longer than the model's context ({lm.max_positions})")
        else:
            out.append((ids, pos))
    return out


@dataclass
class Features:
    """Per layer, the resid_post vector of every measured item at its feature position `[n, d]` (float64), in item
    order; the measured items' records and the excluded ones with why; the time it took (provenance)."""

    layers: list[int]
    X: dict[int, np.ndarray]
    samples: list[dict[str, Any]]
    excluded: list[dict[str, Any]]
    timing: dict[str, Any] = field(default_factory=dict)

    def sha256(self) -> str:
        """A digest of every number and record: what the probes' checkpoint is keyed by."""
        h = hashlib.sha256(json.dumps([self.layers, self.samples, self.excluded]).encode())
        for layer in self.layers:
            h.update(np.ascontiguousarray(self.X[layer]).tobytes())
        return h.hexdigest()


@dataclass
class FeaturesPlan:
    """Per item, its token ids and feature position or why it cannot be measured; the layers; the engine."""

    layers: list[int]
    inputs: list[tuple[list[int], int] | str]
    engine: Engine


@dataclass
class ProbeFeatures(Experiment[FeaturesPlan, Features]):
    """The probes' first phase: one forward per item (never padded together: the numbers would change) capturing
    the residual after every probed layer at the feature token ("last" or "marker"). A unit is one item; an item
    that cannot be measured is settled by the plan with its note. `layers` None = all."""

    kind = "probe-features"
    label = "residuals"
    default_batch_size = 1  # items per batch of work (each still its own forward)

    data: ProbeData
    feature: str = "last"
    layers: Sequence[int] | None = None
    bos: bool = False

    def plan(self, lm: LoadedModel) -> FeaturesPlan:
        layers = opt.parse_layers(self.layers, lm.n_layers)
        return FeaturesPlan(layers, _inputs(lm, self.data, self.feature, self.bos), Engine(lm.model))

    def settings(self, lm: LoadedModel, plan: FeaturesPlan, batch_size: int) -> Settings:
        config = {
            "command": "probe",
            "phase": "features",
            "feature": self.feature,
            "layers": plan.layers,
            "bos": self.bos,
            "data": self.data.source,
        }
        items = [[it.id, it.group, it.label, it.code, it.marker_char] for it in self.data.items]
        return Settings(config, key={"items": items})

    def work(self, plan: FeaturesPlan, batch_size: int) -> Work:
        measurable = [i for i, inp in enumerate(plan.inputs) if not isinstance(inp, str)]
        return Work(chunks(measurable, batch_size), settled=len(plan.inputs) - len(measurable))

    def compute(self, lm: LoadedModel, plan: FeaturesPlan, batch: list[int]) -> list[Unit]:
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.model.forward).parameters else {}
        out: list[Unit] = []
        for i in batch:
            it, inp = self.data.items[i], plan.inputs[i]
            assert not isinstance(inp, str), "work() sends only the measurable items"
            ids, pos = inp
            x = torch.tensor([ids], device=lm.device)
            cap = ResidualCapture(layers=plan.layers, where=("post",), positions=[pos])
            with torch.inference_mode(), plan.engine.run(residual_capture=cap) as rec, naming(f"sample {it.id!r}"):
                logits = lm.model(input_ids=x, attention_mask=torch.ones_like(x), **keep).logits
                for layer in plan.layers:  # scikit-learn would stop on NaN features with a traceback
                    require_finite(rec.resid[(layer, "post")].reshape(-1), "the residual stream after the layer", layer)
                require_finite(logits[0, -1], "the next-token logits")
            resid = np.stack([rec.resid[(layer, "post")][0, 0].double().cpu().numpy() for layer in plan.layers])
            record = {
                "id": it.id,
                "group": it.group,
                "label": it.label,
                "position": pos,
                "n_tokens": len(ids),
                "token": lm.tokenizer.decode([ids[pos]], skip_special_tokens=False),
            }
            out.append((record, {"resid": resid}))
        return out

    def assemble(
        self, lm: LoadedModel, plan: FeaturesPlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> Features:
        order = sorted(units)  # item order
        samples = [units[i][0] for i in order]
        excluded = [
            _excluded(it, inp) for it, inp in zip(self.data.items, plan.inputs, strict=True) if isinstance(inp, str)
        ]
        X = {
            layer: np.stack([units[i][1]["resid"][li] for i in order]) if order else np.zeros((0, 0))
            for li, layer in enumerate(plan.layers)
        }
        return Features(plan.layers, X, samples, excluded, provenance.get("timing", {}))


# -- the probe -------------------------------------------------------------------------------------------------------


def estimator(C: float = 1.0, max_iter: int = 1000) -> Any:
    """The probe: standardise each feature (fitted on the training folds only), then L2 logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def probe_layer(
    X: np.ndarray, y: np.ndarray, folds: int, permutations: int, C: float, max_iter: int, seed: int
) -> dict[str, Any]:
    """Cross-validated accuracy of one layer's probe, its shuffled-label control and permutation p."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_score, permutation_test_score
    from threadpoolctl import threadpool_limits

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    est = estimator(C, max_iter)
    # hundreds of fits on a few dozen rows: one BLAS thread is ~10× faster than several fighting over them
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded below as `converged`
        fold_acc = cross_val_score(est, X, y, cv=cv)
        out = {
            "accuracy": float(fold_acc.mean()),
            "accuracy_std": float(fold_acc.std(ddof=1)),
            "fold_accuracies": fold_acc.tolist(),
        }
        if permutations > 0:
            _, perm, p = permutation_test_score(est, X, y, cv=cv, n_permutations=permutations, random_state=seed)
            out.update(
                shuffled_mean=float(perm.mean()),
                shuffled_std=float(perm.std(ddof=1)) if len(perm) > 1 else 0.0,
                shuffled_p95=float(np.quantile(perm, 0.95)),
                p_perm=float(p),
            )
        fit = estimator(C, max_iter).fit(X, y)
    out["converged"] = bool(fit[-1].n_iter_.max() < max_iter)
    out["train_accuracy"] = float(fit.score(X, y))
    return out


@dataclass
class ProbePlan:
    """The classes, the label of every measured item as a class index, the folds used (≤ the smallest class)."""

    classes: list[str]
    y: np.ndarray
    folds: int


@dataclass
class Probe(Experiment[ProbePlan, ProbeResult]):
    """The probes' second phase (`plipy probe`), given the features: one probe per layer, accuracies beside the
    shuffled control and the majority baseline. A unit is one layer's fits (CV accuracy, permutation control,
    training accuracy). `folds`: stratified k-fold splits (fewer when a class is smaller); `permutations`:
    shuffled-label refits per layer; `C`: inverse L2 strength; `source`: where the data came from."""

    kind = "probe"
    label = "probes"
    default_batch_size = 1  # layers per batch of work

    features: Features
    feature: str = "last"
    source: dict[str, Any] = field(default_factory=dict)
    folds: int = 5
    permutations: int = 20
    C: float = 1.0
    max_iter: int = 1000
    seed: int = 0
    bos: bool = False

    def plan(self, lm: LoadedModel) -> ProbePlan:
        labels = [s["label"] for s in self.features.samples]
        classes, folds = check_classes(labels, self.folds)
        return ProbePlan(classes, np.asarray([classes.index(lab) for lab in labels]), folds)

    def settings(self, lm: LoadedModel, plan: ProbePlan, batch_size: int) -> Settings:
        config = {
            "command": "probe",
            "feature": self.feature,
            "layers": self.features.layers,
            "folds": plan.folds,
            "folds_asked": self.folds,
            "permutations": self.permutations,
            "C": self.C,
            "max_iter": self.max_iter,
            "bos": self.bos,
            "data": self.source,
            "estimator": f"StandardScaler + LogisticRegression(C={self.C}, lbfgs, L2), refitted per fold",
            "cv": f"StratifiedKFold(n_splits={plan.folds}, shuffle=True, random_state={self.seed})",
            "control": "permutation_test_score: the same CV on shuffled labels",
        }
        return Settings(config, seed=self.seed, key={"features_sha256": self.features.sha256()})

    def work(self, plan: ProbePlan, batch_size: int) -> Work:
        return Work(chunks(list(range(len(self.features.layers))), batch_size))

    def compute(self, lm: LoadedModel, plan: ProbePlan, batch: list[int]) -> list[Unit]:
        out: list[Unit] = []
        for j in batch:
            layer = self.features.layers[j]
            fit = probe_layer(
                self.features.X[layer], plan.y, plan.folds, self.permutations, self.C, self.max_iter, self.seed
            )
            out.append(({"layer": layer, **fit}, {}))
        return out

    def assemble(
        self, lm: LoadedModel, plan: ProbePlan, units: dict[int, Unit], provenance: dict[str, Any]
    ) -> ProbeResult:
        per_layer = [units[j][0] for j in sorted(units)]  # layer order
        if self.permutations > 0:
            for rec, ph in zip(per_layer, stats.holm([r["p_perm"] for r in per_layer]), strict=True):
                rec["p_holm"] = ph
        # the run's time: both phases (the features' forwards, then the fits)
        provenance["timing"] = {**provenance.get("timing", {}), "features": self.features.timing}
        y, samples = plan.y, self.features.samples
        counts = {c: int((y == i).sum()) for i, c in enumerate(plan.classes)}
        return ProbeResult(
            {
                "provenance": provenance,
                "feature": self.feature,
                "classes": plan.classes,
                "counts": counts,
                "n_samples": len(samples),
                "n_features": int(self.features.X[self.features.layers[0]].shape[1]),
                "folds": plan.folds,
                "majority_baseline": max(counts.values()) / len(samples),
                "chance": 1.0 / len(plan.classes),
                "layers": per_layer,
                "samples": samples,
                "excluded": self.features.excluded,
            }
        )
