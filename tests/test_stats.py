"""plipy.stats against independent references: scipy's from-stats Welch, hand formulas, hand-worked corrections."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from plipy import stats
from plipy.errors import PlipyError

RNG = np.random.default_rng(20240601)


# ---------------------------------------------------------------------------------------------------------- describe
def test_describe_sample_std_and_small_n():
    d = stats.describe([1.0, 2.0, 4.0, 7.0])
    assert d["n"] == 4 and d["mean"] == pytest.approx(3.5) and d["median"] == pytest.approx(3.0)
    assert d["std"] == pytest.approx(math.sqrt(((2.5**2) + 1.5**2 + 0.5**2 + 3.5**2) / 3))  # ddof=1
    assert (d["min"], d["max"]) == (1.0, 7.0)
    assert stats.describe([0.3])["std"] == 0.0  # PLIP: 0 if n <= 1
    assert stats.describe([]) == {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    assert all(type(v) in (int, float) for v in stats.describe(np.array([1.0, 2.0])).values())


@pytest.mark.parametrize("bad", [[1.0, float("nan")], [1.0, None], [float("inf")], np.array([np.nan])])
def test_describe_rejects_missing_values(bad):
    with pytest.raises(ValueError, match="NaN|None|inf"):
        stats.describe(bad)
    with pytest.raises(PlipyError):  # also a PlipyError, so the CLI prints it as one line
        stats.welch(bad, [1.0, 2.0])


def test_plip_ratio_and_stars():
    assert stats.plip_ratio(0.3, 0.1) == pytest.approx(3.0)
    assert stats.plip_ratio(0.3, 0.001) == 0.0 and stats.plip_ratio(0.3, -1.0) == 0.0
    assert [stats.stars(p) for p in (0.0009, 0.001, 0.009, 0.01, 0.049, 0.05, 0.5)] == [
        "***",
        "**",
        "**",
        "*",
        "*",
        "",
        "",
    ]


# ------------------------------------------------------------------------------------------------------------- welch
@pytest.mark.parametrize("n1,n2", [(10, 10), (5, 17), (30, 3)])
def test_welch_equals_from_stats_and_hand_df(n1, n2):
    a, b = RNG.normal(0.3, 0.2, n1), RNG.normal(0.2, 0.05, n2)
    w = stats.welch(a, b)
    m1, m2, s1, s2 = a.mean(), b.mean(), a.std(ddof=1), b.std(ddof=1)
    ref = scipy.stats.ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    se1, se2 = s1**2 / n1, s2**2 / n2  # PLIP-rs' compute_t_test, by hand
    assert w["t"] == pytest.approx((m1 - m2) / math.sqrt(se1 + se2), rel=1e-12)
    df = (se1 + se2) ** 2 / (se1**2 / (n1 - 1) + se2**2 / (n2 - 1))
    assert w["df"] == pytest.approx(df, rel=1e-12)
    assert w["p"] == pytest.approx(2 * scipy.stats.t.sf(abs(w["t"]), df), rel=1e-10)
    assert all(type(v) is float for v in w.values())


def test_welch_alternative_passthrough():
    a, b = RNG.normal(1.0, 1, 12), RNG.normal(0.5, 1, 9)
    for alt in ("greater", "less"):
        ref = scipy.stats.ttest_ind(a, b, equal_var=False, alternative=alt)
        assert stats.welch(a, b, alternative=alt)["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    g, two = stats.welch(a, b, alternative="greater")["p"], stats.welch(a, b)["p"]
    assert g == pytest.approx(two / 2 if a.mean() > b.mean() else 1 - two / 2)


@pytest.mark.parametrize(
    "a,b,df",
    [
        ([0.2], [0.1, 0.3, 0.5], 2.0),
        ([0.2], [0.4], 0.0),
        ([], [0.1, 0.2], 0.0),
        ([0.1, 0.1, 0.1], [0.1, 0.1], 3.0),
        ([0.1, 0.1, 0.1], [0.7, 0.7], 3.0),
    ],
)
def test_welch_degenerate_is_p1_not_nan(a, b, df):
    for alt in ("two-sided", "greater", "less"):
        assert stats.welch(a, b, alternative=alt) == {"t": 0.0, "df": df, "p": 1.0}


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # from the scipy reference call only
def test_welch_one_constant_group_is_still_tested():
    a, b = [0.2, 0.2, 0.2, 0.2], [0.25, 0.31, 0.28, 0.4, 0.33]
    w, ref = stats.welch(a, b), scipy.stats.ttest_ind(a, b, equal_var=False)
    assert w["p"] == pytest.approx(ref.pvalue) and w["df"] == pytest.approx(len(b) - 1)


# ---------------------------------------------------------------------------------------------------------- hedges_g
def test_hedges_g_hand_computed():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    # var_a = 5/3, var_b = 4; pooled var = (3·5/3 + 2·4)/5 = 2.6; d = (2.5 − 4)/sqrt(2.6)
    d = -1.5 / math.sqrt(2.6)
    j = math.gamma(2.5) / (math.sqrt(2.5) * math.gamma(2.0))  # exact J at df = 5
    assert stats.hedges_g(a, b) == pytest.approx(j * d, rel=1e-12)
    assert stats.hedges_g(a, b) == pytest.approx((1 - 3 / (4 * 5 - 1)) * d, rel=2e-3)  # the usual approximation
    assert stats.hedges_g(b, a) == pytest.approx(-j * d, rel=1e-12)
    assert stats.hedges_g([0.5, 0.5], [0.1, 0.1, 0.1]) == 0.0  # pooled SD 0
    assert stats.hedges_g([0.5], [0.1]) == 0.0


# ------------------------------------------------------------------------------------------------ multiple comparisons
def test_holm_and_bh_hand_worked():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005·4=0.02, 0.01·3=0.03, 0.03·2=0.06, 0.04·1=0.04 → running max 0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted 0.005·4/1=0.02, 0.01·4/2=0.02, 0.03·4/3=0.04, 0.04·4/4=0.04 → running min from the top
    assert stats.bh(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert stats.holm([0.01, 0.02, 0.03, 0.5]) == pytest.approx([0.04, 0.06, 0.06, 0.5])
    assert stats.bh([0.01, 0.02, 0.03, 0.5]) == pytest.approx([0.04, 0.04, 0.04, 0.5])
    assert stats.holm([0.4, 0.6]) == pytest.approx([0.8, 0.8]) and stats.holm([0.9, 0.8]) == [1.0, 1.0]


def test_corrections_none_passthrough_and_bad_input():
    p = [0.01, None, 0.04, float("nan"), 0.03, 0.005]
    holm, bh = stats.holm(p), stats.bh(p)
    assert holm[1] is None and holm[3] is None and bh[1] is None and bh[3] is None
    assert [holm[i] for i in (0, 2, 4, 5)] == pytest.approx([0.03, 0.06, 0.06, 0.02])  # m = 4, not 6
    assert [bh[i] for i in (0, 2, 4, 5)] == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert stats.holm([]) == [] and stats.bh([None]) == [None]
    with pytest.raises(ValueError):
        stats.holm([0.5, 1.2])


def test_corrections_monotone_and_bounded():
    for _ in range(20):
        p = RNG.uniform(0, 0.2, 15) ** 2
        order = np.argsort(p)
        for adj in (np.array(stats.holm(p.tolist())), np.array(stats.bh(p.tolist()))):
            assert (adj >= p - 1e-15).all() and (adj <= 1).all()
            assert (np.diff(adj[order]) >= -1e-15).all()  # same order as the raw p-values
        assert (np.array(stats.bh(p.tolist())) <= np.array(stats.holm(p.tolist())) + 1e-15).all()


# ------------------------------------------------------------------------------------------ bootstrap / permutation
def test_bootstrap_ci_covers_truth_and_is_seeded():
    a, b = RNG.normal(0.30, 0.1, 1500), RNG.normal(0.20, 0.1, 1200)
    ci = stats.bootstrap_ci(a, b, seed=1, n_resamples=2000)
    lo, hi = ci["diff"]
    assert lo < 0.10 < hi
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)
    rlo, rhi = ci["ratio"]
    assert rlo < 1.5 < rhi and rlo < a.mean() / b.mean() < rhi
    assert stats.bootstrap_ci(a, b, seed=1, n_resamples=2000) == ci
    assert stats.bootstrap_ci(a, b, seed=2, n_resamples=2000) != ci


def test_bootstrap_ci_ratio_none_and_small_n():
    ci = stats.bootstrap_ci([0.3, 0.4, 0.5, 0.35], [-0.2, 0.1, 0.05, 0.15], seed=0, n_resamples=1000)
    assert ci["diff"] is not None and ci["ratio"] is None  # some resamples of b have mean <= 0
    assert stats.bootstrap_ci([0.3], [0.1, 0.2], seed=0) == {"diff": None, "ratio": None}
    assert stats.bootstrap_ci([0.3, 0.3], [0.1, 0.1], seed=0, n_resamples=200)["diff"] == pytest.approx((0.2, 0.2))


def test_permutation_close_to_welch_and_seeded():
    a, b = RNG.normal(0.22, 1, 300), RNG.normal(0.0, 1, 300)
    pw = stats.welch(a, b)["p"]
    pp = stats.permutation_p(a, b, seed=3, n_resamples=4000)
    assert 0.001 < pw < 0.2 and pp == pytest.approx(pw, abs=0.015, rel=0.25)
    assert stats.permutation_p(a, b, seed=3, n_resamples=4000) == pp
    assert stats.permutation_p([1.0, 1.0], [1.0, 1.0, 1.0], seed=0) == 1.0
    assert stats.permutation_p([], [1.0], seed=0) == 1.0
    # exact test when few partitions: a = top 3 of 6 distinct values → 2 of C(6,3)=20 partitions are as extreme
    assert stats.permutation_p([4.0, 5.0, 6.0], [1.0, 2.0, 3.0], seed=0) == pytest.approx(2 / 20)


# ------------------------------------------------------------------------------------------------ compare and scans
def test_compare_is_complete_and_json_plain():
    a, b = RNG.normal(0.3, 0.1, 10), RNG.normal(0.2, 0.1, 10)
    r = stats.compare(a, b, seed=0, n_resamples=500, names=("python_doctest", "rust_test"))
    assert set(r) >= {"groups", "ratio", "t", "df", "p", "stars", "hedges_g", "ci_diff", "ci_ratio", "p_perm"}
    assert list(r["groups"]) == ["python_doctest", "rust_test"]
    assert r["ratio"] == pytest.approx(a.mean() / b.mean())
    assert r["p"] == pytest.approx(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)
    json.dumps(r, allow_nan=False)
    assert stats.compare(a, b, seed=0, n_resamples=500, names=("python_doctest", "rust_test")) == r


def test_compare_conditions_and_best_condition():
    base = RNG.normal(0.2, 0.05, 8)
    rows = [
        (base + 0.02, base[::-1]),  # a > b, weak
        (base + 0.2, base[::-1]),  # a > b, strong
        (base[::-1], base + 0.5),  # a < b, strongest: ignored by the PLIP rule
        (base + 0.2, base[::-1]),  # tie with condition 1 → first wins
    ]
    res = stats.compare_conditions(rows, seed=0, n_resamples=200)
    ps = [r["p"] for r in res]
    assert [r["p_holm"] for r in res] == pytest.approx(stats.holm(ps))
    assert [r["p_bh"] for r in res] == pytest.approx(stats.bh(ps))
    assert stats.best_condition_plip(res) == (1, ps[1])
    assert stats.best_condition_corrected(res) == (2, res[2]["p_holm"])
    assert stats.best_condition_plip(res[2:3]) == (None, 1.0)
    assert stats.best_condition_corrected([]) == (None, 1.0)


def test_per_head_welch_equals_loop():
    a, b = RNG.normal(0.2, 0.05, (9, 3, 4)), RNG.normal(0.21, 0.05, (7, 3, 4))
    a[:, 0, 0], b[:, 0, 0] = 0.25, 0.125  # constant in both groups → p = 1
    b[:, 2, 1] += 0.1  # a real difference
    r = stats.per_head_welch(a, b)
    t, p = np.array(r["t"]), np.array(r["p"])
    assert t.shape == p.shape == np.array(r["p_bh"]).shape == (3, 4)
    for la in range(3):
        for h in range(4):
            w = stats.welch(a[:, la, h], b[:, la, h])
            assert (t[la, h], p[la, h]) == pytest.approx((w["t"], w["p"]), rel=1e-10)
            if (la, h) != (0, 0):
                ref = scipy.stats.ttest_ind(a[:, la, h], b[:, la, h], equal_var=False)
                assert p[la, h] == pytest.approx(ref.pvalue, rel=1e-10)
    assert p[0, 0] == 1.0 and t[0, 0] == 0.0 and p[2, 1] < 0.01
    assert np.array(r["p_bh"]).ravel() == pytest.approx(stats.bh(p.ravel().tolist()))
    assert stats.per_head_welch(a[:1], b)["p"] == np.ones((3, 4)).tolist()
    with pytest.raises(ValueError):
        stats.per_head_welch(a, b[:, :2])


def test_compare_conditions_vectorised_equals_per_condition():
    """The one-call path (all conditions resampled together) equals each condition's own compare() (to rounding)."""
    rng = np.random.default_rng(5)
    rows = [(rng.normal(2 + 0.1 * i, 1, 9), rng.normal(2, 0.5, 7)) for i in range(6)]
    rows.append((np.full(9, 0.5), np.full(7, 0.5)))  # degenerate: constant groups
    rows.append((rng.normal(1, 1, 9), rng.normal(-0.2, 0.1, 7)))  # mean(b) <= 0 in resamples: ratio CI None
    got = stats.compare_conditions(rows, seed=3, n_resamples=500)
    for r, (a, b) in zip(got, rows, strict=True):
        want = stats.compare(a, b, seed=3, n_resamples=500)
        for key in ("ci_diff", "ci_ratio"):  # same resamples; means summed along another axis: ~1 ulp apart
            assert (r[key] is None) == (want[key] is None)
            if want[key] is not None:
                assert r[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15)
        assert r["p_perm"] == pytest.approx(want["p_perm"], abs=1e-12)
    assert got[-1]["ci_ratio"] is None and got[0]["ci_ratio"] is not None
    # exact permutation enumeration (few partitions) takes the same path
    small = [(rng.normal(0, 1, 3), rng.normal(0.5, 1, 3)) for _ in range(3)]
    for r, (a, b) in zip(stats.compare_conditions(small, seed=1, n_resamples=1000), small, strict=True):
        assert r["p_perm"] == pytest.approx(stats.permutation_p(a, b, seed=1, n_resamples=1000), abs=1e-12)
