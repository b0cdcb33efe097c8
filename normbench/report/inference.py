"""The tests behind the verdicts, from statsmodels and scipy:

- ``interaction``: does the gap between two conditions change with a factor (log2 of the batch
  size)? The least-squares slope of the cells' mean a − b gaps on x (per doubling of the batch),
  tested with each cell's own variance and Welch–Satterthwaite degrees of freedom (Welch's
  t-test carried to a linear contrast; the t distribution from scipy), with its 95% interval
  and two-sided p. BN's spread at small batches is many times GN's, which a pooled variance
  (an OLS fit over every run) would ignore.
- ``slope``: does one condition's accuracy change with a factor? OLS ``y = b0 + b1 x``.
- ``equivalence``: are two conditions within ``margin`` points of each other? Two one-sided
  Welch t-tests against -margin and +margin (TOST, ``statsmodels.stats.weightstats.ttost_ind``);
  p < alpha shows equivalence, and "not significantly different" never does. The interval given
  is the 90% one, whose lying inside (-margin, margin) is the same decision at alpha = 0.05.
- ``difference``: a − b against a value, two-sided or one-sided: Welch's t-test
  (``scipy.stats.ttest_ind``) with the interval of the difference (statsmodels' ``CompareMeans``),
  95% for a two-sided test and 90% for a one-sided one (whose bound on the tested side passing
  the value is the same decision at alpha = 0.05).
- ``holm``: p-values of one report adjusted for multiplicity (Holm's step-down,
  ``statsmodels.stats.multitest.multipletests``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import statsmodels.api as sm
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW, ttost_ind


def p_text(p: float) -> str:
    """A p-value as the reports write it: 3 decimals, or 2 significant digits below 0.001."""
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


@dataclass(frozen=True)
class Fit:
    """A slope (an OLS coefficient, or the interaction's contrast): its estimate, 95% interval,
    two-sided p and the runs used."""

    test: str
    estimate: float
    low: float
    high: float
    p: float
    n: int

    def text(self, unit: str) -> str:
        return (f"{self.estimate:+.2f} {unit} (95% CI {self.low:+.2f} to {self.high:+.2f}), {self.test}, "
                f"p = {p_text(self.p)}, n = {self.n} runs")  # fmt: skip


def _ols(y: list[float], columns: list[list[float]], index: int, test: str) -> Fit | None:
    """Coefficient ``index`` of OLS of ``y`` on an intercept and ``columns``; None when the fit
    has no residual degree of freedom or a column is constant."""
    design = np.column_stack([np.ones(len(y)), *columns])
    if len(y) <= design.shape[1] or np.linalg.matrix_rank(design) < design.shape[1]:
        return None
    fit = sm.OLS(np.asarray(y, dtype=float), design).fit()
    low, high = fit.conf_int(alpha=0.05)[index]
    if not math.isfinite(float(fit.bse[index])) or float(fit.bse[index]) == 0:
        return None
    return Fit(test, float(fit.params[index]), float(low), float(high), float(fit.pvalues[index]), len(y))


def interaction(a: dict[float, list[float]], b: dict[float, list[float]]) -> Fit | None:
    """The change of the a − b gap per unit of x: the contrast sum_i c_i (mean a_i − mean b_i),
    c_i = (x_i − x̄) / sum_j (x_j − x̄)², the least-squares slope of the cells' mean gaps on x.

    Its variance is sum_i c_i² (s²_ai / n_ai + s²_bi / n_bi), each cell with its own sample
    variance, and its degrees of freedom Welch–Satterthwaite's, as in Welch's t-test. With BN's
    standard deviation 16 times GN's at one of 4 batch sizes and 3 runs per cell, a pooled-
    variance OLS fit called 22% of simulated null cases significant at 0.05; this test 6%.
    None unless both conditions have 2 or more runs at every x and x takes 2 or more values.

    Args:
        a: x -> the values of condition a's runs at x.
        b: x -> the values of condition b's runs at x.
    """
    xs = sorted(set(a) | set(b))
    if len(xs) < 2 or any(len(a.get(x, ())) < 2 or len(b.get(x, ())) < 2 for x in xs):
        return None
    x = np.asarray(xs, dtype=float)
    c = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
    estimate = sum(ci * (np.mean(a[xi]) - np.mean(b[xi])) for ci, xi in zip(c, xs))
    # Each cell's share of the contrast's variance, and its degrees of freedom.
    shares = [(ci**2 * np.var(side[xi], ddof=1) / len(side[xi]), len(side[xi]) - 1)
              for ci, xi in zip(c, xs) for side in (a, b)]  # fmt: skip
    variance = sum(v for v, _ in shares)
    if not variance > 0:
        return None
    df = variance**2 / sum(v**2 / d for v, d in shares)
    se = math.sqrt(variance)
    half = float(scipy_stats.t.ppf(0.975, df)) * se
    p = float(2 * scipy_stats.t.sf(abs(estimate) / se, df))
    n = sum(len(side[xi]) for xi in xs for side in (a, b))
    test = f"Welch contrast of the cells' gaps (norm x log2 batch size, {df:.1f} df)"
    return Fit(test, float(estimate), float(estimate - half), float(estimate + half), p, n)


def slope(points: dict[float, list[float]], test: str = "OLS slope") -> Fit | None:
    """The change of the values per unit of x: OLS over every run.

    Args:
        points: x -> the values of the runs at x.
        test: the test's name as the evidence states it.
    """
    y = [v for values in points.values() for v in values]
    x = [float(xv) for xv, values in points.items() for _ in values]
    return _ols(y, [x], 1, test)


@dataclass(frozen=True)
class Equivalence:
    """TOST of a − b against (-margin, margin): the difference of the means, its 90% interval
    (Welch), the TOST p (the larger one-sided p) and each side's n."""

    difference: float
    low: float
    high: float
    p: float
    margin: float
    n_a: int
    n_b: int

    @property
    def equivalent(self) -> bool:
        return self.p < 0.05

    def text(self) -> str:
        return (f"{self.difference:+.2f} points (90% CI {self.low:+.2f} to {self.high:+.2f}), TOST (two one-sided "
                f"Welch t-tests) against ±{self.margin:g}: p = {p_text(self.p)}, n = {self.n_a} and {self.n_b}")  # fmt: skip


def equivalence(a: list[float], b: list[float], margin: float) -> Equivalence | None:
    """TOST of a − b within (-margin, margin); None with fewer than 2 runs a side or no spread.

    Args:
        a: one condition's values.
        b: the other's.
        margin: the equivalence margin, in the values' unit.
    """
    if len(a) < 2 or len(b) < 2 or (np.std(a) + np.std(b)) == 0:
        return None
    p, _, _ = ttost_ind(np.asarray(a, float), np.asarray(b, float), -margin, margin, usevar="unequal")
    compare = CompareMeans(DescrStatsW(np.asarray(a, float)), DescrStatsW(np.asarray(b, float)))
    low, high = compare.tconfint_diff(alpha=0.10, usevar="unequal")
    return Equivalence(float(np.mean(a) - np.mean(b)), float(low), float(high), float(p), margin, len(a), len(b))


# How each alternative reads in the evidence: a − b is ... than the value tested.
_SIDES = {"two-sided": "≠", "greater": ">", "less": "<"}


@dataclass(frozen=True)
class Difference:
    """a − b (Welch): the difference of the means, its interval, the p of the test against
    ``than`` on the side ``alternative`` names, and each side's n."""

    difference: float
    low: float
    high: float
    p: float
    than: float
    alternative: str
    n_a: int
    n_b: int

    @property
    def level(self) -> int:
        return 95 if self.alternative == "two-sided" else 90

    def text(self) -> str:
        return (f"{self.difference:+.2f} points ({self.level}% CI {self.low:+.2f} to {self.high:+.2f}), Welch's "
                f"t-test of a difference {_SIDES[self.alternative]} {self.than:g}: p = {p_text(self.p)}, "
                f"n = {self.n_a} and {self.n_b}")  # fmt: skip


def difference(a: list[float], b: list[float], than: float = 0.0, alternative: str = "two-sided") -> Difference | None:
    """Welch's t-test of mean(a) − mean(b) against ``than``; None with fewer than 2 runs a side
    or no spread.

    Args:
        a: one condition's values.
        b: the other's.
        than: the difference tested against (H0: a − b = than, or on the wrong side of it).
        alternative: "two-sided", "greater" (H1: a − b > than) or "less" (H1: a − b < than).
    """
    if alternative not in _SIDES:
        raise ValueError(f"alternative={alternative!r}: use one of {', '.join(_SIDES)}")
    if len(a) < 2 or len(b) < 2 or (np.std(a) + np.std(b)) == 0:
        return None
    xa, xb = np.asarray(a, float), np.asarray(b, float)
    p = scipy_stats.ttest_ind(xa - than, xb, equal_var=False, alternative=alternative).pvalue
    compare = CompareMeans(DescrStatsW(xa), DescrStatsW(xb))
    low, high = compare.tconfint_diff(alpha=0.05 if alternative == "two-sided" else 0.10, usevar="unequal")
    return Difference(float(xa.mean() - xb.mean()), float(low), float(high), float(p), than, alternative,
                      len(a), len(b))  # fmt: skip


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given."""
    if not p_values:
        return []
    return [float(p) for p in multipletests(p_values, method="holm")[1]]
