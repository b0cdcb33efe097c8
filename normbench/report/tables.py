"""Statistics over runs and the report's tables: mean and sample standard deviation with n,
failed, diverged and unfinished runs counted apart and never averaged as 0%."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from scipy import stats as scipy_stats
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from normbench.report.inference import p_text
from normbench.report.records import CONTEXT, FP32, Run
from normbench.results import DIVERGED, UNFINISHED

# A condition's runs learned when their mean accuracy reaches this many times chance (3x: 30% for
# 10 classes); below it they are marked "not learned" and never feed a verdict that compares.
LEARNED = 3.0


@dataclass
class Stat:
    """Mean and sample standard deviation of the finished runs of one condition; ``floor``: the
    accuracy its runs must reach on average to count as having learned (LEARNED x chance)."""

    values: list[float]
    failed: int = 0
    diverged: int = 0
    unfinished: int = 0  # still running, or interrupted and waiting to be resumed
    floor: float | None = None

    @property
    def learned(self) -> bool | None:
        """Whether the runs learned (None: no floor or no finished run)."""
        if self.floor is None or not self.values:
            return None
        return self.mean >= self.floor

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def cell(self, digits: int = 2) -> str:
        """``98.12 ± 0.10 (n=3)`` (``digits`` decimals); failures and divergences are named, never
        shown as 0%."""
        counts = ((self.failed, "failed"), (self.diverged, "diverged"), (self.unfinished, "unfinished"))
        notes = [f"{k} {name}" for k, name in counts if k]
        if not self.values:
            return ", ".join(notes) or "–"
        text = f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.std is not None else "")
        if self.learned is False:
            notes.append("not learned")
        return f"{text} (n={self.n}{', ' + ', '.join(notes) if notes else ''})"


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Steps every curve has, and the mean and sample std over the curves there: curves are
    averaged step by step, never by position, so a curve missing a step leaves that step out."""
    common = sorted(set.intersection(*({s for s, _ in c} for c in curves)))
    by_step = [dict(c) for c in curves]
    mean = [statistics.fmean(d[s] for d in by_step) for s in common]
    std = [statistics.stdev([d[s] for d in by_step]) if len(by_step) > 1 else 0.0 for s in common]
    return common, mean, std


def aggregate(runs: list[Run], keys: tuple[str, ...], metric: str = "best") -> dict[tuple, Stat]:
    """Group runs by ``keys`` and gather ``metric`` of the finished ones."""
    groups: dict[tuple, Stat] = defaultdict(lambda: Stat([]))
    for r in runs:
        stat = groups[tuple(getattr(r, k) for k in keys)]
        if metric in ("best", "final") and r.chance is not None:
            # One dataset per group when the keys hold it; else the most classes' chance.
            stat.floor = max(stat.floor or 0.0, LEARNED * r.chance)
        if r.ok:
            stat.values.append(getattr(r, metric))
        elif r.status == DIVERGED:
            stat.diverged += 1
        elif r.status in UNFINISHED:
            stat.unfinished += 1
        else:
            stat.failed += 1
    return dict(groups)


def _span(values: set) -> str:
    """One figure when all agree, else ``min–max``; ``–`` when none is recorded."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return "–"
    fmt = (lambda v: f"{v:g}") if isinstance(known[0], float) else str
    return fmt(known[0]) if known[0] == known[-1] else f"{fmt(known[0])}–{fmt(known[-1])}"


def budgets(runs: list[Run], keys: tuple[str, ...]) -> dict[tuple, tuple[str, str]]:
    """Group runs by ``keys``: the optimizer steps and the learning rate their finished runs
    took, each as one figure or a ``min–max`` span (``budget`` columns beside every accuracy)."""
    steps: dict[tuple, set] = defaultdict(set)
    lrs: dict[tuple, set] = defaultdict(set)
    for r in runs:
        key = tuple(getattr(r, k) for k in keys)
        steps[key]
        if r.ok:
            steps[key].add(r.steps)
            lrs[key].add(r.lr)
    return {k: (_span(steps[k]), _span(lrs[k])) for k in steps}


def sorted_values(values: Iterable) -> list:
    """Values of one key in order: numbers by value, None last, strings by name."""
    return sorted(values, key=lambda v: (v is None, v if not isinstance(v, str) else 0, str(v)))


def batch_size_tables(runs: list[Run]) -> list[tuple[tuple, list[str], list[list[str]]]]:
    """Per context (dataset, net, activation, depth): rows batch size, columns norm."""
    stats = aggregate(runs, (*CONTEXT, "batch_size", "norm"))
    budget = budgets(runs, (*CONTEXT, "batch_size"))
    tables = []
    for ctx in sorted_values({k[:4] for k in stats}):
        sub = {k[4:]: v for k, v in stats.items() if k[:4] == ctx}
        norms = sorted_values({n for _, n in sub})
        sizes = sorted_values({b for b, _ in sub})
        if len(norms) < 2 and len(sizes) < 2:
            continue
        rows = [[str(b), *budget[(*ctx, b)]] + [sub[(b, n)].cell() if (b, n) in sub else "–" for n in norms]
                for b in sizes]  # fmt: skip
        tables.append((ctx, ["batch size", "steps", "lr", *norms], rows))
    return tables


def depth_tables(runs: list[Run]) -> list[tuple[tuple, list[str], list[list[str]]]]:
    """Per (dataset, net, norm, batch size) where depth varies: rows blocks, columns activation."""
    keys = ("dataset", "net", "norm", "batch_size", "num_blocks")
    stats = aggregate(runs, (*keys, "activation"))
    budget = budgets(runs, keys)
    tables = []
    for ctx in sorted_values({k[:4] for k in stats}):
        sub = {k[4:]: v for k, v in stats.items() if k[:4] == ctx}
        depths, acts = sorted_values({d for d, _ in sub}), sorted_values({a for _, a in sub})
        if len(depths) < 2:
            continue
        rows = [[str(d), *budget[(*ctx, d)]] + [sub[(d, a)].cell() if (d, a) in sub else "–" for a in acts]
                for d in depths]  # fmt: skip
        tables.append((ctx, ["blocks", "steps", "lr", *acts], rows))
    return tables


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; ``align="right"`` right-aligns every column (tables of figures).

    Args:
        header: the column names.
        rows: the cells, row by row.
        align: None (the renderer's default) or ``right``.
    """
    rule = "---:|" if align == "right" else "---|"
    lines = ["| " + " | ".join(header) + " |", "|" + rule * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


@dataclass
class Comparison:
    """Two conditions' runs compared: the difference of their means (a - b, points) with its 95%
    interval, Welch's t-test (``scipy.stats.ttest_ind`` with unequal variances) and Hedges' g,
    the difference in pooled standard deviations with the small-sample correction."""

    a: Stat
    b: Stat

    @property
    def difference(self) -> float:
        return self.a.mean - self.b.mean

    @property
    def testable(self) -> bool:
        return self.a.n >= 2 and self.b.n >= 2 and (self.a.std or 0) + (self.b.std or 0) > 0

    def _test(self):
        """The test's result (``statistic``, ``pvalue``): Welch's t-test of the two sides."""
        return scipy_stats.ttest_ind(self.a.values, self.b.values, equal_var=False)

    @cached_property
    def _result(self):
        """The test, run once per comparison (None when it is not testable)."""
        return self._test() if self.testable else None

    @property
    def p(self) -> float | None:
        """The two-sided p-value of the test; None with fewer than 2 runs a side or no spread."""
        return None if self._result is None else float(self._result.pvalue)

    @property
    def t(self) -> float | None:
        return None if self._result is None else float(self._result.statistic)

    @property
    def hedges_g(self) -> float | None:
        if not self.testable:
            return None
        na, nb = self.a.n, self.b.n
        pooled = math.sqrt(((na - 1) * self.a.std**2 + (nb - 1) * self.b.std**2) / (na + nb - 2))
        return self.difference / pooled * (1 - 3 / (4 * (na + nb) - 9))

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p is not None and self.p < alpha

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% interval of a − b, Welch's (statsmodels' ``CompareMeans``); None untestable."""
        if not self.testable:
            return None
        low, high = CompareMeans.from_data(self.a.values, self.b.values).tconfint_diff(0.05, usevar="unequal")
        return float(low), float(high)

    def _head(self) -> str:
        """``+4.00 points (95% CI +2.10 to +5.90)``."""
        low, high = self.interval
        return f"{self.difference:+.2f} points (95% CI {low:+.2f} to {high:+.2f})"

    def text(self) -> str:
        """``+4.00 points (95% CI +2.10 to +5.90), Welch's t-test t = 9.80, p = 0.0006, n = 3 and 3,
        Hedges' g = 6.40``."""
        if not self.testable:
            return (
                f"{self.difference:+.2f} points (n = {self.a.n} and {self.b.n}: too few runs or no spread for a test)"
            )
        return (f"{self._head()}, Welch's t-test t = {self.t:.2f}, p = {p_text(self.p)}, n = {self.a.n} and "
                f"{self.b.n}, Hedges' g = {self.hedges_g:.2f}")  # fmt: skip


class PairedComparison(Comparison):
    """Two figures of the same runs compared (a_i - b_i for run i, the runs in the same order):
    the mean difference, the paired t-test (``scipy.stats.ttest_rel``) and Cohen's d_z, the mean
    difference over the differences' standard deviation."""

    @property
    def _differences(self) -> list[float]:
        if self.a.n != self.b.n:
            raise ValueError(f"a paired comparison needs the same runs on both sides, got {self.a.n} and {self.b.n}")
        return [x - y for x, y in zip(self.a.values, self.b.values, strict=True)]

    @property
    def testable(self) -> bool:
        d = self._differences
        return len(d) >= 2 and statistics.stdev(d) > 0

    def _test(self):
        return scipy_stats.ttest_rel(self.a.values, self.b.values)

    @property
    def hedges_g(self) -> float | None:  # d_z for paired figures
        return statistics.fmean(self._differences) / statistics.stdev(self._differences) if self.testable else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% interval of the mean difference (statsmodels' ``DescrStatsW``); None untestable."""
        if not self.testable:
            return None
        low, high = DescrStatsW(self._differences).tconfint_mean(0.05)
        return float(low), float(high)

    def text(self) -> str:
        if not self.testable:
            return f"{self.difference:+.2f} points (n = {self.a.n}: too few runs or no spread for a test)"
        test = f"paired t-test t = {self.t:.2f}, p = {p_text(self.p)}, n = {self.a.n}"
        return f"{self._head()}, {test}, Cohen's d_z = {self.hedges_g:.2f}"


def precision_tables(runs: list[Run]) -> list[tuple[tuple, list[str], list[list[str]]]]:
    """Per context where runs differ in ``trainer.precision``: rows (batch size, norm), the best
    accuracy in fp32 and in each other precision, and each one's difference from fp32 with
    Welch's t-test over seeds (``Comparison``)."""
    stats = aggregate(runs, (*CONTEXT, "batch_size", "norm_name", "precision"))
    tables = []
    for ctx in sorted_values({k[:4] for k in stats}):
        sub = {k[4:]: v for k, v in stats.items() if k[:4] == ctx}
        others = sorted_values({p for _, _, p in sub} - {FP32})
        if not others or FP32 not in {p for _, _, p in sub}:
            continue
        rows = []
        for b, n in sorted_values({(b, n) for b, n, p in sub if p != FP32}):
            base = sub.get((b, n, FP32))
            row = [str(b), n, base.cell() if base else "–"]
            for p in others:
                other = sub.get((b, n, p))
                row.append(other.cell() if other else "–")
                row.append(Comparison(other, base).text() if other and base and other.n and base.n else "–")
            rows.append(row)
        header = ["batch size", "norm", f"{FP32} (%)"]
        for p in others:
            header += [f"{p} (%)", f"{p} − {FP32}"]
        tables.append((ctx, header, rows))
    return tables
