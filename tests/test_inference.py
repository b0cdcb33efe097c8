"""The verdicts' tests (normbench.report.inference) against the same statistics computed by hand
from their textbook formulas on fixed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from normbench.report.inference import difference, equivalence, holm, interaction, slope

# Two conditions' accuracies at log2 batch sizes 1, 4 and 7, three runs each (fixed numbers).
A = {1.0: [60.1, 62.3, 61.0], 4.0: [70.2, 71.5, 69.9], 7.0: [74.0, 72.8, 75.1]}
B = {1.0: [66.0, 65.2, 67.1], 4.0: [67.5, 66.1, 68.0], 7.0: [66.3, 67.9, 65.8]}


def _by_hand_slope(points):
    x = np.array([k for k, v in points.items() for _ in v])
    y = np.array([u for v in points.values() for u in v])
    sxx = ((x - x.mean()) ** 2).sum()
    b1 = ((x - x.mean()) * (y - y.mean())).sum() / sxx
    ssr = ((y - (y.mean() + b1 * (x - x.mean()))) ** 2).sum()
    return b1, ssr, sxx, len(y)


def test_interaction_is_the_slope_of_the_cells_gaps_with_each_cells_own_variance():
    # The estimate: the least-squares slope of the mean gaps on x (numpy's polyfit), which with
    # equal runs per cell is also the difference of the two conditions' slopes over their runs.
    xs = sorted(A)
    gaps = [np.mean(A[x]) - np.mean(B[x]) for x in xs]
    estimate = np.polyfit(xs, gaps, 1)[0]
    assert estimate == pytest.approx(_by_hand_slope(A)[0] - _by_hand_slope(B)[0], rel=1e-10)
    # Its variance: sum of w_i^2 Var(gap_i), w_i the slope's weight on gap i, Var(gap_i) from
    # each side's own sample variance; Welch-Satterthwaite degrees of freedom.
    sxx = sum((x - np.mean(xs)) ** 2 for x in xs)
    terms = [((x - np.mean(xs)) / sxx) ** 2 * np.var(side[x], ddof=1) / 3 for x in xs for side in (A, B)]
    var = sum(terms)
    df = var**2 / sum(t**2 / 2 for t in terms)
    fit = interaction(A, B)
    assert fit.n == 18 and f"{df:.1f} df" in fit.test
    assert fit.estimate == pytest.approx(estimate, rel=1e-10)
    assert fit.p == pytest.approx(2 * stats.t.sf(abs(estimate) / math.sqrt(var), df), rel=1e-8)
    half = stats.t.ppf(0.975, df) * math.sqrt(var)
    assert (fit.low, fit.high) == pytest.approx((estimate - half, estimate + half), rel=1e-8)
    # Swapping the conditions flips the sign and keeps p.
    swapped = interaction(B, A)
    assert swapped.estimate == pytest.approx(-fit.estimate) and swapped.p == pytest.approx(fit.p)


def test_interaction_keeps_its_level_when_bns_spread_at_small_batches_is_many_times_gns():
    # No interaction at all, BN's sd 8 at the smallest of 4 batch sizes, 0.5 elsewhere and for
    # GN, 3 runs per cell: a pooled-variance fit rejects about 22% of such cases at 0.05; this
    # test about 6%. 2,000 seeded cases: the share is within 0.035 of 0.05 (the binomial's
    # standard error there is 0.005).
    rng = np.random.default_rng(0)
    xs = [1.0, 3.0, 5.0, 7.0]
    rejected = 0
    for _ in range(2000):
        a = {x: list(rng.normal(80, 8.0 if x == 1.0 else 0.5, 3)) for x in xs}
        b = {x: list(rng.normal(80, 0.5, 3)) for x in xs}
        rejected += interaction(a, b).p < 0.05
    assert abs(rejected / 2000 - 0.05) < 0.035


def test_slope_matches_scipys_linregress():
    x = [k for k, v in A.items() for _ in v]
    y = [u for v in A.values() for u in v]
    ref = stats.linregress(x, y)
    fit = slope(A)
    assert fit.estimate == pytest.approx(ref.slope) and fit.p == pytest.approx(ref.pvalue)
    half = stats.t.ppf(0.975, len(y) - 2) * ref.stderr
    assert (fit.low, fit.high) == pytest.approx((ref.slope - half, ref.slope + half))


def test_too_few_runs_or_one_batch_size_give_no_fit():
    assert interaction({1.0: [60.0]}, {1.0: [61.0]}) is None
    assert interaction({1.0: [60.0, 61.0, 62.0]}, {1.0: [61.0, 63.0]}) is None  # x does not vary
    assert interaction({1.0: [60.0, 61.0], 2.0: [62.0]}, {1.0: [61.0, 63.0], 2.0: [61.0, 64.0]}) is None  # 1 run
    assert slope({2.0: [1.0, 2.0]}) is None


def _welch_tost(a, b, margin):
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    d = a.mean() - b.mean()
    p_low = stats.t.sf((d + margin) / se, df)  # H0: d <= -margin
    p_up = stats.t.cdf((d - margin) / se, df)  # H0: d >= +margin
    half = stats.t.ppf(0.95, df) * se
    return d, max(p_low, p_up), d - half, d + half


@pytest.mark.parametrize(
    "a, b",
    [
        ([70.1, 70.9, 71.4, 70.2], [70.6, 71.1, 70.0]),  # close and tight: equivalent
        ([70.1, 74.9, 66.4], [70.6, 71.1, 70.0]),  # close means, wide spread: not shown
        ([76.0, 76.5, 75.8], [70.6, 71.1, 70.0]),  # 5.5 points apart: not equivalent
    ],
)
def test_equivalence_is_two_one_sided_welch_tests(a, b):
    d, p, low, high = _welch_tost(a, b, 3.0)
    eq = equivalence(a, b, 3.0)
    assert eq.difference == pytest.approx(d) and eq.p == pytest.approx(p, rel=1e-8)
    assert (eq.low, eq.high) == pytest.approx((low, high), rel=1e-8)
    # TOST at 5% says equivalent exactly when the 90% interval lies inside the margin.
    assert eq.equivalent == (-3.0 < low and high < 3.0)
    assert (eq.n_a, eq.n_b) == (len(a), len(b))


def test_equivalence_decisions_on_the_fixed_numbers():
    assert equivalence([70.1, 70.9, 71.4, 70.2], [70.6, 71.1, 70.0], 3.0).equivalent
    # Not significantly different (Welch p > 0.05) and yet not shown equivalent.
    wide = ([70.1, 74.9, 66.4], [70.6, 71.1, 70.0])
    assert stats.ttest_ind(*wide, equal_var=False).pvalue > 0.05 and not equivalence(*wide, 3.0).equivalent
    assert equivalence([1.0], [1.0, 2.0], 3.0) is None


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize("than", [0.0, 1.0])
def test_difference_is_welchs_t_test_against_a_value(alternative, than):
    a, b = [72.4, 73.9, 72.8], [70.6, 71.1, 70.0, 71.9]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)  # Welch-Satterthwaite
    d = np.mean(a) - np.mean(b)
    t = (d - than) / se
    p = {"two-sided": 2 * stats.t.sf(abs(t), df), "greater": stats.t.sf(t, df), "less": stats.t.cdf(t, df)}
    half = stats.t.ppf(0.975 if alternative == "two-sided" else 0.95, df) * se
    diff = difference(a, b, than, alternative)
    assert diff.difference == pytest.approx(d) and diff.p == pytest.approx(p[alternative], rel=1e-8)
    assert (diff.low, diff.high) == pytest.approx((d - half, d + half), rel=1e-8)
    # At 5%, a one-sided test rejects exactly when the 90% interval's bound on its side passes the value.
    if alternative == "greater":
        assert (diff.p < 0.05) == (diff.low > than)
    assert f"{diff.level}% CI" in diff.text() and (diff.n_a, diff.n_b) == (3, 4)


def test_difference_needs_two_runs_a_side_with_a_spread_and_a_known_side():
    assert difference([1.0], [1.0, 2.0]) is None and difference([1.0, 1.0], [2.0, 2.0]) is None
    with pytest.raises(ValueError, match="alternative='above'"):
        difference([1.0, 2.0], [1.0, 2.0], alternative="above")


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1: 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.20.
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    # 0.5 x 2 = 1.0, then 0.9 x 1 = 0.9 raised to 1.0 to keep the order of the adjusted values.
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
