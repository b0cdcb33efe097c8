"""Statistics over runs and the report's tables: mean and sample standard deviation with n,
failed, diverged and unfinished runs counted apart and never averaged as 0%."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from normbench.report.records import CONTEXT, Run
from normbench.results import DIVERGED, UNFINISHED


@dataclass
class Stat:
    """Mean and sample standard deviation of the finished runs of one condition."""

    values: list[float]
    failed: int = 0
    diverged: int = 0
    unfinished: int = 0  # still running, or interrupted and waiting to be resumed

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def cell(self) -> str:
        """``98.12 ± 0.10 (n=3)``; failures and divergences are named, never shown as 0%."""
        counts = ((self.failed, "failed"), (self.diverged, "diverged"), (self.unfinished, "unfinished"))
        notes = [f"{k} {name}" for k, name in counts if k]
        if not self.values:
            return ", ".join(notes) or "–"
        text = f"{self.mean:.2f} ± {self.std:.2f}" if self.std is not None else f"{self.mean:.2f}"
        return f"{text} (n={self.n}{', ' + ', '.join(notes) if notes else ''})"


def aggregate(runs: list[Run], keys: tuple[str, ...], metric: str = "best") -> dict[tuple, Stat]:
    """Group runs by ``keys`` and gather ``metric`` of the finished ones."""
    groups: dict[tuple, Stat] = defaultdict(lambda: Stat([]))
    for r in runs:
        stat = groups[tuple(getattr(r, k) for k in keys)]
        if r.ok:
            stat.values.append(getattr(r, metric))
        elif r.status == DIVERGED:
            stat.diverged += 1
        elif r.status in UNFINISHED:
            stat.unfinished += 1
        else:
            stat.failed += 1
    return dict(groups)


def sorted_values(values: Iterable) -> list:
    """Values of one key in order: numbers by value, None last, strings by name."""
    return sorted(values, key=lambda v: (v is None, v if not isinstance(v, str) else 0, str(v)))


def batch_size_tables(runs: list[Run]) -> list[tuple[tuple, list[str], list[list[str]]]]:
    """Per context (dataset, net, activation, depth): rows batch size, columns norm."""
    stats = aggregate(runs, (*CONTEXT, "batch_size", "norm"))
    tables = []
    for ctx in sorted_values({k[:4] for k in stats}):
        sub = {k[4:]: v for k, v in stats.items() if k[:4] == ctx}
        norms = sorted_values({n for _, n in sub})
        sizes = sorted_values({b for b, _ in sub})
        if len(norms) < 2 and len(sizes) < 2:
            continue
        rows = [[str(b)] + [sub[(b, n)].cell() if (b, n) in sub else "–" for n in norms] for b in sizes]
        tables.append((ctx, ["batch size", *norms], rows))
    return tables


def depth_tables(runs: list[Run]) -> list[tuple[tuple, list[str], list[list[str]]]]:
    """Per (dataset, net, norm, batch size) where depth varies: rows blocks, columns activation."""
    stats = aggregate(runs, ("dataset", "net", "norm", "batch_size", "num_blocks", "activation"))
    tables = []
    for ctx in sorted_values({k[:4] for k in stats}):
        sub = {k[4:]: v for k, v in stats.items() if k[:4] == ctx}
        depths, acts = sorted_values({d for d, _ in sub}), sorted_values({a for _, a in sub})
        if len(depths) < 2:
            continue
        rows = [[str(d)] + [sub[(d, a)].cell() if (d, a) in sub else "–" for a in acts] for d in depths]
        tables.append((ctx, ["blocks", *acts], rows))
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
