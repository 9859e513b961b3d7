"""Two-group statistics for layer scans and knockouts: PLIP-rs' rules (§5.3 of the notes) on scipy's tests, plus
effect size, seeded bootstrap/permutation checks and multiple-comparison corrections. numpy + scipy only.

Every public function returns plain Python floats/ints/None (JSON-serialisable) and never NaN; results depend only
on the inputs and the seed. Inputs with NaN/None/inf are rejected: callers drop excluded samples themselves.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import scipy.special
import scipy.stats

from plipy.errors import PlipyError

Alternative = Literal["two-sided", "greater", "less"]
CI = tuple[float, float]
_MAX_CELLS = 2_000_000  # resampled values held at once by bootstrap / permutation (memory bound)
# scipy >= 1.15 takes `rng=`; older versions only `random_state=` (same Generator stream either way)
_RNG_KW = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


class StatsInputError(PlipyError, ValueError):
    """Invalid statistical input (NaN/None/inf value, wrong shape, p-value outside [0, 1])."""


def _array(values: Any, what: str = "values") -> np.ndarray:
    """1-D float array of finite values, or StatsInputError naming the problem."""
    if not isinstance(values, np.ndarray) and any(v is None for v in values):
        raise StatsInputError(f"{what} contain None: drop excluded samples before computing statistics")
    a = np.asarray(values, dtype=float)
    if a.ndim != 1:
        raise StatsInputError(f"{what} must be one-dimensional, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = "NaN" if np.isnan(a).any() else "inf"
        raise StatsInputError(f"{what} contain {bad}: drop excluded samples before computing statistics")
    return a


def _constant(a: np.ndarray) -> bool:
    """All values identical (exactly; float variance of equal values can be a tiny non-zero number)."""
    return a.size == 0 or bool(np.ptp(a) == 0)


def _batch(n: int, n_resamples: int) -> int:
    return max(1, min(n_resamples, _MAX_CELLS // max(n, 1)))


def describe(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """n, mean, std, median, min, max. std is the sample std (ddof=1) and 0.0 when n <= 1 (PLIP-rs' rule);
    with n = 0 every statistic but n is None."""
    a = _array(values)
    n = int(a.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {
        "n": n,
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if n > 1 else 0.0,
        "median": float(np.median(a)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def plip_ratio(mean_a: float, mean_b: float) -> float:
    """PLIP-rs' ratio: mean_a / mean_b if mean_b > 0.001, else 0.0 (0.0 means 'undefined', not 'no effect')."""
    return float(mean_a / mean_b) if mean_b > 0.001 else 0.0


def stars(p: float) -> str:
    """Significance stars as PLIP-rs prints them (without its padding): *** p<0.001, ** p<0.01, * p<0.05."""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def welch(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, alternative: Alternative = "two-sided"
) -> dict[str, float]:
    """Welch's t-test (scipy `ttest_ind(equal_var=False)`): {t, df, p}. Degenerate cases follow PLIP-rs and never
    give NaN: a group with n < 2, or both groups constant, → t=0, df=max(n1+n2-2, 0) (0 if a group is empty), p=1.0
    (for every `alternative`). Deviations from PLIP-rs: n=1 against a varying group is not tested (PLIP took the
    lone value's variance as 0), and with one constant group df is scipy's Welch-Satterthwaite limit n_other-1
    (PLIP used n1+n2-2)."""
    x, y = _array(a, "group a"), _array(b, "group b")
    n1, n2 = x.size, y.size
    if n1 < 2 or n2 < 2 or (_constant(x) and _constant(y)):
        return {"t": 0.0, "df": float(n1 + n2 - 2) if n1 and n2 else 0.0, "p": 1.0}
    with warnings.catch_warnings():  # one constant group: scipy warns about precision loss, the result is right
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        r = scipy.stats.ttest_ind(x, y, equal_var=False, alternative=alternative)
    return {"t": float(r.statistic), "df": float(r.df), "p": float(r.pvalue)}


def hedges_g(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Hedges' g = J·(mean_a − mean_b)/pooled SD with the exact small-sample factor
    J = Γ(df/2) / (sqrt(df/2)·Γ((df−1)/2)), df = n_a+n_b−2 (J=0 at df=1). 0.0 if df < 1 or both groups constant."""
    x, y = _array(a, "group a"), _array(b, "group b")
    n1, n2 = x.size, y.size
    df = n1 + n2 - 2
    if n1 == 0 or n2 == 0 or df < 1 or (_constant(x) and _constant(y)):
        return 0.0
    ss = (x.var(ddof=1) * (n1 - 1) if n1 > 1 else 0.0) + (y.var(ddof=1) * (n2 - 1) if n2 > 1 else 0.0)
    sd = np.sqrt(ss / df)
    if not sd > 0:
        return 0.0
    j = np.exp(scipy.special.gammaln(df / 2) - scipy.special.gammaln((df - 1) / 2)) / np.sqrt(df / 2)
    return float(j * (x.mean() - y.mean()) / sd)


def _diff_of_means(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _ratio_of_means(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    mx, my = np.mean(x, axis=axis), np.mean(y, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(my > 0, mx / my, np.nan)  # NaN marks a resample whose mean(b) <= 0


def bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    seed: int,
    n_resamples: int = 10000,
    confidence: float = 0.95,
) -> dict[str, CI | None]:
    """Seeded percentile-bootstrap CIs (scipy `bootstrap`, each group resampled independently) of mean(a)−mean(b)
    and mean(a)/mean(b): {diff: (lo, hi) | None, ratio: (lo, hi) | None}. None when a group has n < 2; ratio None
    when any resample has mean(b) <= 0. Both CIs use the same resamples."""
    x, y = _array(a, "group a"), _array(b, "group b")
    if x.size < 2 or y.size < 2:
        return {"diff": None, "ratio": None}
    out: dict[str, CI | None] = {}
    for key, statistic in (("diff", _diff_of_means), ("ratio", _ratio_of_means)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate (constant) data: the CI is then a point, which is right
            res = scipy.stats.bootstrap(
                (x, y),
                statistic,
                n_resamples=n_resamples,
                batch=_batch(x.size + y.size, n_resamples),
                vectorized=True,
                paired=False,
                confidence_level=confidence,
                method="percentile",
                **{_RNG_KW: np.random.default_rng(seed)},
            )
        if np.isnan(res.bootstrap_distribution).any():
            out[key] = None
        else:
            out[key] = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    return out


def permutation_p(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, seed: int, n_resamples: int = 10000
) -> float:
    """Two-sided permutation-test p of mean(a)−mean(b) (scipy `permutation_test`, independent samples, seeded;
    exact when there are fewer distinct partitions than n_resamples). 1.0 if a group is empty."""
    x, y = _array(a, "group a"), _array(b, "group b")
    if x.size == 0 or y.size == 0:
        return 1.0
    res = scipy.stats.permutation_test(
        (x, y),
        _diff_of_means,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_resamples,
        batch=_batch(x.size + y.size, n_resamples),
        alternative="two-sided",
        **{_RNG_KW: np.random.default_rng(seed)},
    )
    return float(min(1.0, res.pvalue))


def _pvalues(pvalues: Sequence[float | None]) -> tuple[list[int], np.ndarray]:
    """Indices and values of the present (non-None, non-NaN) p-values; each must lie in [0, 1]."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not np.isnan(p)]
    ps = np.array([pvalues[i] for i in idx], dtype=float)
    if ((ps < 0) | (ps > 1)).any():
        raise StatsInputError(f"p-values must lie in [0, 1], got {ps[(ps < 0) | (ps > 1)].tolist()}")
    return idx, ps


def _scatter(n: int, idx: list[int], adjusted: np.ndarray) -> list[float | None]:
    out: list[float | None] = [None] * n
    for i, v in zip(idx, adjusted, strict=True):
        out[i] = float(v)
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (family-wise error), in input order: sorted ascending, the k-th smallest
    (k from 0) becomes max over j<=k of (m−j)·p_(j), capped at 1. None/NaN pass through as None, not counted in m."""
    idx, ps = _pvalues(pvalues)
    m = ps.size
    order = np.argsort(ps, kind="stable")
    adj_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * ps[order]))
    adjusted = np.empty(m)
    adjusted[order] = adj_sorted
    return _scatter(len(pvalues), idx, adjusted)


def bh(pvalues: Sequence[float | None]) -> list[float | None]:
    """Benjamini–Hochberg adjusted p-values (false discovery rate; scipy `false_discovery_control`), in input
    order. None/NaN pass through as None, not counted in m."""
    idx, ps = _pvalues(pvalues)
    adjusted = scipy.stats.false_discovery_control(ps, method="bh") if ps.size else ps
    return _scatter(len(pvalues), idx, np.asarray(adjusted))


def compare(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    seed: int = 0,
    n_resamples: int = 10000,
    names: tuple[str, str] = ("a", "b"),
    resample: bool = True,
) -> dict[str, Any]:
    """Everything for two groups at one condition: groups (describe), mean_diff, ratio (PLIP rule; None if a group
    is empty), Welch t/df/p/stars, hedges_g, bootstrap ci_diff/ci_ratio, permutation p_perm. `resample=False`
    leaves the last three None (compare_conditions computes them for all conditions at once)."""
    da, db = describe(a), describe(b)
    w = welch(a, b)
    ci = bootstrap_ci(a, b, seed=seed, n_resamples=n_resamples) if resample else {"diff": None, "ratio": None}
    empty = da["mean"] is None or db["mean"] is None
    return {
        "groups": {names[0]: da, names[1]: db},
        "mean_diff": None if empty else da["mean"] - db["mean"],
        "ratio": None if empty else plip_ratio(da["mean"], db["mean"]),
        "t": w["t"],
        "df": w["df"],
        "p": w["p"],
        "stars": stars(w["p"]),
        "hedges_g": hedges_g(a, b),
        "ci_diff": None if ci["diff"] is None else list(ci["diff"]),
        "ci_ratio": None if ci["ratio"] is None else list(ci["ratio"]),
        "p_perm": permutation_p(a, b, seed=seed, n_resamples=n_resamples) if resample else None,
    }


def _stack(rows: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[np.ndarray, np.ndarray] | None:
    """[conditions, n] arrays when every condition has the same group sizes (≥ 2) and finite values, else None."""
    try:
        a = [_array(r[0], "group a") for r in rows]
        b = [_array(r[1], "group b") for r in rows]
    except StatsInputError:
        return None  # the per-condition path raises the precise error
    if len(rows) < 2 or len({x.size for x in a}) != 1 or len({y.size for y in b}) != 1:
        return None
    if a[0].size < 2 or b[0].size < 2:
        return None
    return np.stack(a), np.stack(b)


def _bootstrap_many(x: np.ndarray, y: np.ndarray, seed: int, n_resamples: int) -> dict[str, list[list[float] | None]]:
    """bootstrap_ci for each row of x [C, n_a] vs y [C, n_b] in one scipy call per statistic (axis=-1)."""
    out: dict[str, list[list[float] | None]] = {}
    for key, statistic in (("diff", _diff_of_means), ("ratio", _ratio_of_means)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = scipy.stats.bootstrap(
                (x, y),
                statistic,
                n_resamples=n_resamples,
                batch=_batch(x.shape[1] + y.shape[1], n_resamples),
                vectorized=True,
                paired=False,
                confidence_level=0.95,
                method="percentile",
                axis=-1,
                **{_RNG_KW: np.random.default_rng(seed)},
            )
        bad = np.isnan(res.bootstrap_distribution).any(axis=-1)
        lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
        out[key] = [None if bad[i] else [float(lo[i]), float(hi[i])] for i in range(x.shape[0])]
    return out


def _permutation_many(x: np.ndarray, y: np.ndarray, seed: int, n_resamples: int) -> list[float]:
    """permutation_p for each row of x [C, n_a] vs y [C, n_b] in one scipy call (axis=-1)."""
    res = scipy.stats.permutation_test(
        (x, y),
        _diff_of_means,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_resamples,
        batch=_batch(x.shape[1] + y.shape[1], n_resamples),
        alternative="two-sided",
        axis=-1,
        **{_RNG_KW: np.random.default_rng(seed)},
    )
    return [float(min(1.0, p)) for p in np.atleast_1d(res.pvalue)]


def compare_conditions(
    rows: Sequence[tuple[Sequence[float], Sequence[float]]],
    seed: int = 0,
    n_resamples: int = 10000,
    names: tuple[str, str] = ("a", "b"),
) -> list[dict[str, Any]]:
    """`compare` per condition (e.g. per layer; same seed for each) plus p_holm and p_bh: Welch p corrected across
    the conditions."""
    stacked = _stack(rows)
    results = [
        compare(a, b, seed=seed, n_resamples=n_resamples, names=names, resample=stacked is None) for a, b in rows
    ]
    if stacked is not None:
        # One scipy call for all conditions: the same resample indices (same seed) for every condition, so each
        # result equals its own per-condition call (to float rounding), at a fraction of the cost (scipy draws
        # permutations in a Python loop).
        x, y = stacked
        cis = _bootstrap_many(x, y, seed, n_resamples)
        perm = _permutation_many(x, y, seed, n_resamples)
        for i, r in enumerate(results):
            r["ci_diff"], r["ci_ratio"] = cis["diff"][i], cis["ratio"][i]
            r["p_perm"] = perm[i]
    ps = [r["p"] for r in results]
    for r, ph, pb in zip(results, holm(ps), bh(ps), strict=True):
        r["p_holm"], r["p_bh"] = ph, pb
    return results


def best_condition_plip(results: Sequence[dict[str, Any]]) -> tuple[int | None, float]:
    """PLIP-rs' best layer: among conditions with mean_a > mean_b, the minimum (uncorrected) Welch p, first on
    ties. None qualifying → (None, 1.0); PLIP-rs reported layer 0 there. Selected after looking: not a valid p."""
    best, best_p = None, 1.0
    for i, r in enumerate(results):
        if r["mean_diff"] is not None and r["mean_diff"] > 0 and (best is None or r["p"] < best_p):
            best, best_p = i, r["p"]
    return best, float(best_p)


def best_condition_corrected(results: Sequence[dict[str, Any]]) -> tuple[int | None, float]:
    """Condition with the minimum Holm-corrected p over all conditions (either direction), first on ties; uses
    each result's p_holm (computed here if absent). Empty → (None, 1.0)."""
    if not results:
        return None, 1.0
    ph = [r["p_holm"] for r in results] if all("p_holm" in r for r in results) else holm([r["p"] for r in results])
    ps = [math.inf if p is None else float(p) for p in ph]  # a condition without a test (None) is never best
    best = min(range(len(ps)), key=ps.__getitem__)
    return (best, ps[best]) if math.isfinite(ps[best]) else (None, 1.0)


def per_head_welch(a: np.ndarray, b: np.ndarray) -> dict[str, list[list[float]]]:
    """Welch t and p per (layer, head) for a [n_a, layers, heads] vs b [n_b, layers, heads] (scipy, vectorised),
    p_bh = BH over all layer×head cells. Cells that `welch` calls degenerate (n < 2, both groups constant) get
    t=0, p=1 and stay in the BH family. Returned as nested [layers][heads] lists."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 3 or y.ndim != 3 or x.shape[1:] != y.shape[1:]:
        raise StatsInputError(
            f"per-head arrays must be [n, layers, heads] with equal layers×heads, got {x.shape} and {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise StatsInputError("per-head arrays contain NaN/inf: drop excluded samples before computing statistics")
    cells = x.shape[1:]
    if x.shape[0] < 2 or y.shape[0] < 2:
        t, p = np.zeros(cells), np.ones(cells)
    else:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = scipy.stats.ttest_ind(x, y, axis=0, equal_var=False)
        t, p = np.asarray(r.statistic, dtype=float), np.asarray(r.pvalue, dtype=float)
        bad = ((np.ptp(x, axis=0) == 0) & (np.ptp(y, axis=0) == 0)) | ~np.isfinite(t) | ~np.isfinite(p)
        t, p = np.where(bad, 0.0, t), np.where(bad, 1.0, p)
    p_bh = np.array(bh(p.ravel().tolist()), dtype=float).reshape(cells)
    return {"t": t.tolist(), "p": p.tolist(), "p_bh": p_bh.tolist()}


def bootstrap_means(
    values: Sequence[Sequence[float]] | np.ndarray, seed: int, n_resamples: int = 10000, confidence: float = 0.95
) -> list[list[float] | None]:
    """Seeded percentile-bootstrap CIs of the mean of each column of `values` [n samples, k columns]: the samples
    are resampled together (one resample serves every column, as a sample's values of all columns belong
    together). None for each column when n < 2."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 2:
        raise StatsInputError(f"values must be [samples, columns], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise StatsInputError("values contain NaN/inf: drop excluded samples before computing statistics")
    n, k = x.shape
    if n < 2:
        return [None] * k
    rng = np.random.default_rng(seed)
    step = _batch(n * max(k, 1), n_resamples)
    means = []
    for done in range(0, n_resamples, step):
        idx = rng.integers(0, n, size=(min(step, n_resamples - done), n))
        means.append(x[idx].mean(axis=1))  # [resamples, k]
    dist = np.concatenate(means)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(dist, tail, axis=0), np.percentile(dist, 100 - tail, axis=0)
    return [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)]


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """Spearman's rank correlation of paired values (scipy) and its two-sided p; None for both with fewer than 3
    pairs or a constant side (a rank correlation is undefined there)."""
    x, y = _array(a, "a"), _array(b, "b")
    if x.size != y.size:
        raise StatsInputError(f"paired values of unequal lengths {x.size} and {y.size}")
    if x.size < 3 or _constant(x) or _constant(y):
        return {"rho": None, "p": None}
    r = scipy.stats.spearmanr(x, y)
    return {"rho": float(r.statistic), "p": float(r.pvalue)}
