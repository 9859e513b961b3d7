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

import inspect
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plipy import provenance, stats
from plipy.corpus import Corpus, CorpusError, _char_to_token, load_corpus
from plipy.engine import Engine, ResidualCapture
from plipy.errors import ParameterError, PlipyError
from plipy.finite import naming, require_finite
from plipy.results import ProbeResult

FEATURES = ("last", "marker")
LABELS = ("group", "prefix")
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


@dataclass
class ProbeConfig:
    """`feature`: the last token or the marker token; `folds`: stratified k-fold splits (fewer when a class is
    smaller); `permutations`: shuffled-label refits per layer; `C`: inverse L2 strength."""

    feature: str = "last"
    layers: Sequence[int] | None = None
    folds: int = 5
    permutations: int = 20
    C: float = 1.0
    max_iter: int = 1000
    seed: int = 0
    bos: bool = False
    extra: dict = field(default_factory=dict)


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
    if label_by not in LABELS:
        raise ParameterError("label", f"must be one of {', '.join(LABELS)}, got {label_by!r}")
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
    tok, how = _char_to_token(offs, item.marker_char)
    if tok is None or how != "exact":
        return None, "the marker has no exact token"
    return tok + shift, None


def features(
    lm: Any, data: ProbeData, config: ProbeConfig, layers: list[int], step: Callable[[], None] = lambda: None
) -> tuple[dict[int, np.ndarray], list[dict], list[dict]]:
    """Per layer, the resid_post vector of every usable item at its feature position `[n, d]` (float64); the
    sample records and the excluded ones."""
    from plipy.corpus import _encode

    engine = Engine(lm.model)
    tok = lm.tokenizer
    rows: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    samples, excluded = [], []
    bos_id = getattr(tok, "bos_token_id", None)
    if config.bos and bos_id is None:
        raise PlipyError(f"--bos: tokenizer {type(tok).__name__} has no BOS token")
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.model.forward).parameters else {}
    for it in data.items:
        ids, offs = _encode(tok, it.code)
        shift = 1 if config.bos else 0
        ids = [int(bos_id), *ids] if config.bos else ids
        pos, why = _position(tok, it, ids, offs, config.feature, shift)
        if pos is None or (lm.max_positions is not None and len(ids) > lm.max_positions):
            why = why or f"{len(ids)} tokens, longer than the model's context ({lm.max_positions})"
            excluded.append({"id": it.id, "group": it.group, "label": it.label, "note": why})
            step()
            continue
        x = torch.tensor([ids], device=lm.device)
        cap = ResidualCapture(layers=layers, where=("post",), positions=[pos])
        with torch.inference_mode(), engine.run(residual_capture=cap) as rec, naming(f"sample {it.id!r}"):
            out = lm.model(input_ids=x, attention_mask=torch.ones_like(x), **keep)
            for layer in layers:  # scikit-learn would stop on NaN features with a traceback
                require_finite(rec.resid[(layer, "post")].reshape(-1), "the residual stream after the layer", layer)
            require_finite(out.logits[0, -1], "the next-token logits")
        for layer in layers:
            rows[layer].append(rec.resid[(layer, "post")][0, 0].double().cpu().numpy())
        samples.append(
            {
                "id": it.id,
                "group": it.group,
                "label": it.label,
                "position": pos,
                "n_tokens": len(ids),
                "token": tok.decode([ids[pos]], skip_special_tokens=False),
            }
        )
        step()
    return {layer: np.stack(v) if v else np.zeros((0, 0)) for layer, v in rows.items()}, samples, excluded


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


def run_probe(
    lm: Any, data: ProbeData, config: ProbeConfig, *, progress: Callable[[str, int], Callable[[], None]] | None = None
) -> ProbeResult:
    """One probe per layer on the chosen feature; accuracies beside the shuffled control and the majority baseline."""
    from plipy.options import parse_layers

    if config.feature not in FEATURES:
        raise ParameterError("feature", f"must be one of {', '.join(FEATURES)}, got {config.feature!r}")
    if config.permutations < 0:
        raise ParameterError("permutations", f"must be ≥ 0, got {config.permutations}")
    check_classes([it.label for it in data.items], config.folds)
    layers = parse_layers(config.layers, lm.n_layers)
    t0 = time.perf_counter()
    step = progress("residuals", len(data.items)) if progress else (lambda: None)
    X, samples, excluded = features(lm, data, config, layers, step)
    labels = [s["label"] for s in samples]
    classes, folds = check_classes(labels, config.folds)
    y = np.asarray([classes.index(lab) for lab in labels])
    counts = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    step = progress("probes", len(layers)) if progress else (lambda: None)
    per_layer = []
    for layer in layers:
        per_layer.append(
            {
                "layer": layer,
                **probe_layer(X[layer], y, folds, config.permutations, config.C, config.max_iter, config.seed),
            }
        )
        step()
    if config.permutations > 0:
        for rec, ph in zip(per_layer, stats.holm([r["p_perm"] for r in per_layer]), strict=True):
            rec["p_holm"] = ph
    settings = {
        "command": "probe",
        "feature": config.feature,
        "layers": layers,
        "folds": folds,
        "folds_asked": config.folds,
        "permutations": config.permutations,
        "C": config.C,
        "max_iter": config.max_iter,
        "bos": config.bos,
        "data": data.source,
        "estimator": f"StandardScaler + LogisticRegression(C={config.C}, lbfgs, L2), refitted per fold",
        "cv": f"StratifiedKFold(n_splits={folds}, shuffle=True, random_state={config.seed})",
        "control": "permutation_test_score: the same CV on shuffled labels",
        **config.extra,
    }
    prov = provenance.build(model=lm, seed=config.seed, config=settings)
    prov["timing"] = {"seconds": time.perf_counter() - t0}
    return ProbeResult(
        {
            "provenance": prov,
            "feature": config.feature,
            "classes": classes,
            "counts": counts,
            "n_samples": len(samples),
            "n_features": int(X[layers[0]].shape[1]),
            "folds": folds,
            "majority_baseline": max(counts.values()) / len(samples),
            "chance": 1.0 / len(classes),
            "layers": per_layer,
            "samples": samples,
            "excluded": excluded,
        }
    )


def probe_rows(result: dict) -> list[dict[str, Any]]:
    """One row per layer."""
    keys = (
        "layer",
        "accuracy",
        "accuracy_std",
        "shuffled_mean",
        "shuffled_p95",
        "p_perm",
        "p_holm",
        "train_accuracy",
        "converged",
    )
    return [{**{k: r.get(k) for k in keys}, "majority_baseline": result["majority_baseline"]} for r in result["layers"]]
