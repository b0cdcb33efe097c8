"""``normbench report``: tables, plots and the studies' verdicts from run records.

It reads ``metrics.json`` run records only and never retrains. Every figure is a mean +- the
sample standard deviation over seeds, with n; failed and diverged runs are counted as such and
never enter a mean as 0%.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse import ArgumentParser

from normbench.data import DATAMODULES, dataset_name
from normbench.results import RECORD

# Points of accuracy within which two norms "perform alike": the studies' "within 3 points".
CLOSE = 3.0
# How much BRN must gain over BN, in points, to count as beating it.
BEATS = 1.0
CONTEXT = ("dataset", "net", "activation", "num_blocks")


class BatchSize(int):
    """A run's global batch size (images per optimizer step) and the processes it was split
    over. It sorts and plots as the number, and equals only a batch size of the same layout, so
    that a batch of 8 made of 4 devices x 2 is never averaged with one device's 8 (or 2);
    written ``8 (4x2)``.

    Args:
        value: the global batch size.
        world_size: processes (devices x nodes).
    """

    world_size: int

    def __new__(cls, value: int, world_size: int = 1) -> BatchSize:  # noqa: PYI034 - Self needs Python 3.11
        obj = super().__new__(cls, value)
        obj.world_size = int(world_size or 1)
        return obj

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, int):
            return NotImplemented
        return int(self) == int(other) and self.world_size == getattr(other, "world_size", 1)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(int(self)) if self.world_size == 1 else hash((int(self), self.world_size))

    def __str__(self) -> str:
        if self.world_size == 1:
            return str(int(self))
        return f"{int(self)} ({self.world_size}x{int(self) // self.world_size})"

    __repr__ = __str__


def _batch_size(record: dict, per_device: int | None) -> BatchSize | None:
    """The record's global batch size with its layout; records before layouts were one device's."""
    layout = record.get("layout") or {}
    world = layout.get("world_size") or 1
    total = layout.get("global_batch_size") or (per_device * world if per_device else None)
    return None if total is None else BatchSize(total, world)


@dataclass
class Run:
    """What the report needs from one run record; ``batch_size`` is the global one."""

    path: str
    dataset: str
    norm: str
    batch_size: BatchSize | None
    seed: int | None
    net: str
    activation: str
    num_blocks: int | None
    val_split: float
    status: str
    best: float | None  # percent
    final: float | None
    curve: list[float] = field(default_factory=list)  # percent per epoch
    wall_time_s: float | None = None
    hardware: str | None = None
    max_steps: int | None = None  # set for runs measured in iterations (study 1), not epochs
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, percent) per validation
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss of that batch)

    @property
    def ok(self) -> bool:
        return self.status == "finished" and self.best is not None

    def points(self) -> tuple[str, list[int], list[float]]:
        """(unit, x, accuracy %) of the accuracy curve: per epoch (1, 2, ...), or per evaluation
        at its iteration for iteration runs (the untrained network at 0 left out)."""
        if self.iterations:
            kept = [(s, a) for s, a in self.evals if s > 0]
            return "iteration", [s for s, _ in kept], [a for _, a in kept]
        return "epoch", list(range(1, len(self.curve) + 1)), self.curve

    @property
    def iterations(self) -> bool:
        """A run measured in optimizer steps (``trainer.max_steps``), as study 1's are."""
        return self.max_steps is not None and self.max_steps > 0

    def context(self) -> tuple:
        return tuple(getattr(self, k) for k in CONTEXT)


def load_run(path: Path) -> Run:
    """A ``Run`` from one record; failed runs fall back on their sweep cell's values."""
    record = json.loads(path.read_text())
    config = record.get("config") or {}
    model, data = config.get("model", {}), config.get("data", {})
    init = data.get("init_args", {})
    values = record.get("sweep", {}).get("values", {})

    def pick(config_value, *keys, default=None):
        if config_value is not None:
            return config_value
        return next((values[k] for k in keys if k in values), default)

    dataset = dataset_name(data.get("class_path", "")) if data else None
    dataset = pick(dataset, "dataset", default="?")
    if dataset not in DATAMODULES and "data" in values:
        dataset = dataset_name(str(values["data"]))
    pct = lambda v: None if v is None else 100.0 * v
    return Run(
        path=str(path.parent),
        dataset=dataset,
        norm=pick(model.get("norm"), "model.norm", default="?"),
        batch_size=_batch_size(record, pick(init.get("batch_size"), "data.batch_size")),
        seed=pick(config.get("seed_everything"), "seed_everything"),
        net=pick(model.get("net"), "model.net", default="seed_cnn"),
        activation=pick(model.get("activation"), "model.activation", default="relu"),
        num_blocks=pick(model.get("num_blocks"), "model.num_blocks", default=4),
        val_split=init.get("val_split", 0.0) or 0.0,
        status=record.get("status", "unknown"),
        best=pct(record.get("val_acc_best")),
        final=pct(record.get("val_acc_final")),
        curve=[100.0 * e["val/acc"] for e in record.get("epochs", []) if "val/acc" in e],
        wall_time_s=record.get("wall_time_s"),
        hardware=record.get("hardware"),
        max_steps=(config.get("trainer") or {}).get("max_steps"),
        evals=[(e["step"], 100.0 * e["val/acc"]) for e in record.get("evals", []) if "val/acc" in e],
        losses=[(int(s), float(v)) for s, v in record.get("train_loss_steps", [])],
    )


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run record under ``paths`` (sweep directories, run directories or record files)."""
    files: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            files.add(p)
        elif p.is_dir():
            files.update(p.rglob(RECORD))
        else:
            raise FileNotFoundError(f"{p} does not exist; pass sweep or run directories")
    return [load_run(f) for f in sorted(files)]


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


# Statuses of runs that have not ended: neither a result nor a failure yet.
UNFINISHED = ("running", "interrupted", "pending")


def aggregate(runs: list[Run], keys: tuple[str, ...], metric: str = "best") -> dict[tuple, Stat]:
    """Group runs by ``keys`` and gather ``metric`` of the finished ones."""
    groups: dict[tuple, Stat] = defaultdict(lambda: Stat([]))
    for r in runs:
        stat = groups[tuple(getattr(r, k) for k in keys)]
        if r.ok:
            stat.values.append(getattr(r, metric))
        elif r.status == "diverged":
            stat.diverged += 1
        elif r.status in UNFINISHED:
            stat.unfinished += 1
        else:
            stat.failed += 1
    return dict(groups)


def _sort(values: Iterable) -> list:
    return sorted(values, key=lambda v: (v is None, v if not isinstance(v, str) else 0, str(v)))


def batch_size_tables(runs: list[Run]) -> list[tuple[tuple, list[str], list[list[str]]]]:
    """Per context (dataset, net, activation, depth): rows batch size, columns norm."""
    stats = aggregate(runs, (*CONTEXT, "batch_size", "norm"))
    tables = []
    for ctx in _sort({k[:4] for k in stats}):
        sub = {k[4:]: v for k, v in stats.items() if k[:4] == ctx}
        norms = _sort({n for _, n in sub})
        sizes = _sort({b for b, _ in sub})
        if len(norms) < 2 and len(sizes) < 2:
            continue
        rows = [[str(b)] + [sub[(b, n)].cell() if (b, n) in sub else "–" for n in norms] for b in sizes]
        tables.append((ctx, ["batch size", *norms], rows))
    return tables


def depth_tables(runs: list[Run]) -> list[tuple[tuple, list[str], list[list[str]]]]:
    """Per (dataset, net, norm, batch size) where depth varies: rows blocks, columns activation."""
    stats = aggregate(runs, ("dataset", "net", "norm", "batch_size", "num_blocks", "activation"))
    tables = []
    for ctx in _sort({k[:4] for k in stats}):
        sub = {k[4:]: v for k, v in stats.items() if k[:4] == ctx}
        depths, acts = _sort({d for d, _ in sub}), _sort({a for _, a in sub})
        if len(depths) < 2:
            continue
        rows = [[str(d)] + [sub[(d, a)].cell() if (d, a) in sub else "–" for a in acts] for d in depths]
        tables.append((ctx, ["blocks", *acts], rows))
    return tables


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# --------------------------------------------------------------------------- verdicts


@dataclass
class Verdict:
    claim: str
    verdict: str  # "supported", "not supported" or "not enough data"
    evidence: str


def _means(runs: list[Run], **fixed) -> dict[tuple, float]:
    """(dataset, batch size) -> mean best accuracy of the finished runs matching ``fixed``."""
    chosen = [r for r in runs if all(getattr(r, k) == v for k, v in fixed.items())]
    return {k: s.mean for k, s in aggregate(chosen, ("dataset", "batch_size")).items() if s.mean is not None}


# Each study's network as the study ran it: (net, activation, blocks).
STUDY_NETS = (("seed_cnn", "relu", 4), ("dilated_cnn", "gelu", 4))


def _main_runs(runs: list[Run]) -> list[Run]:
    """The runs of the studies' networks at their usual depth and activation."""
    return [r for r in runs if (r.net, r.activation, r.num_blocks) in STUDY_NETS]


def gn_stable(runs: list[Run]) -> Verdict:
    claim = "GroupNorm stays stable across batch sizes"
    gn = _means(_main_runs(runs), norm="gn")
    parts, ok = [], []
    for ds in _sort({d for d, _ in gn}):
        accs = {b: a for (d, b), a in gn.items() if d == ds}
        if len(accs) >= 3:
            spread = max(accs.values()) - min(accs.values())
            ok.append(spread <= CLOSE)
            parts.append(f"{ds}: {min(accs.values()):.2f} to {max(accs.values()):.2f} over batch sizes "
                         f"{min(accs)}–{max(accs)}, a spread of {spread:.2f} points")  # fmt: skip
    if not ok:
        return Verdict(claim, "not enough data", "needs gn at 3 or more batch sizes")
    return Verdict(claim, "supported" if all(ok) else "not supported", f"{'; '.join(parts)} (stable: within {CLOSE:g})")


def _bn_threshold(runs: list[Run]) -> dict[str, tuple[int | None, dict[int, float]]]:
    """Per dataset: the smallest batch size from which BN stays within CLOSE points of GN,
    and BN - GN at every batch size."""
    main = _main_runs(runs)
    bn, gn = _means(main, norm="bn"), _means(main, norm="gn")
    out = {}
    for ds in _sort({d for d, _ in bn}):
        gaps = {b: bn[(d, b)] - gn[(d, b)] for (d, b) in bn if d == ds and (d, b) in gn}
        if len(gaps) < 2:
            continue
        sizes = sorted(gaps)
        good = [b for i, b in enumerate(sizes) if all(abs(gaps[c]) <= CLOSE for c in sizes[i:])]
        out[ds] = (good[0] if good else None, gaps)
    return out


def bn_needs_batch(runs: list[Run]) -> Verdict:
    claim = "BN needs a large enough batch size to perform well"
    found = _bn_threshold(runs)
    if not found:
        return Verdict(claim, "not enough data", "needs bn and gn at 2 or more common batch sizes")
    parts, holds = [], []
    for ds, (n, gaps) in found.items():
        listing = ", ".join(f"bs {b}: {g:+.2f}" for b, g in sorted(gaps.items()))
        where = f"from batch size {n}" if n is not None else "at no batch size"
        parts.append(f"{ds}: BN is within {CLOSE:g} points of GN {where} (BN − GN: {listing})")
        holds.append(n is not None and n > min(gaps))
    return Verdict(claim, "supported" if all(holds) else "not supported", "; ".join(parts))


def bn_close_to_gn(runs: list[Run]) -> Verdict:
    claim = f"Where BN performs well, it is within {CLOSE:g} points of GN"
    found = {ds: v for ds, v in _bn_threshold(runs).items() if v[0] is not None}
    if not found:
        return Verdict(claim, "not enough data", "BN performs well at no batch size with a GN counterpart")
    parts, holds = [], []
    for ds, (n, gaps) in found.items():
        big = {b: g for b, g in gaps.items() if b >= n}
        worst = max(big.values(), key=abs)
        holds.append(abs(worst) <= CLOSE)
        parts.append(f"{ds}: largest |BN − GN| at batch sizes ≥ {n} is {abs(worst):.2f} points")
    return Verdict(claim, "supported" if all(holds) else "not supported", "; ".join(parts))


def brn_small_hard(runs: list[Run]) -> Verdict:
    claim = "BRN beats BN only at small batch sizes on the hard task"
    main = _main_runs(runs)
    bn, brn = _means(main, norm="bn"), _means(main, norm="brn")
    diffs = {k: brn[k] - bn[k] for k in bn if k in brn}
    datasets = _sort({d for d, _ in diffs})
    if len(datasets) < 2 or len({b for _, b in diffs}) < 2:
        return Verdict(claim, "not enough data", "needs bn and brn on two datasets at two or more batch sizes")
    hard = min(datasets, key=lambda d: statistics.fmean(bn[(d, b)] for (e, b) in diffs if e == d))
    smallest = min(b for d, b in diffs if d == hard)
    beats = {k: v > BEATS for k, v in diffs.items()}
    holds = beats[(hard, smallest)] and not any(v for k, v in beats.items() if k != (hard, smallest))
    listing = "; ".join(f"{d} bs {b}: {diffs[(d, b)]:+.2f}" for d, b in sorted(diffs))
    return Verdict(
        claim,
        "supported" if holds else "not supported",
        f"hard task = {hard} (lowest BN accuracy); BRN − BN: {listing} (beats: > {BEATS:g} point)",
    )


def _first_at(xs: list[int], curve: list[float], target: float) -> int | None:
    return next((x for x, a in zip(xs, curve) if a >= target), None)


def bnrs_slower(runs: list[Run]) -> Verdict:
    claim = "BNRS converges slower than BN"
    main = [r for r in _main_runs(runs) if r.ok and r.points()[1]]
    parts, slower = [], []
    for ds, net, bs in _sort({(r.dataset, r.net, r.batch_size) for r in main if r.norm == "bnrs"}):
        cell = [r for r in main if (r.dataset, r.net, r.batch_size) == (ds, net, bs)]
        group = {n: [r.points() for r in cell if r.norm == n] for n in ("bn", "bnrs")}
        if not group["bn"] or not group["bnrs"]:
            continue
        unit, xs, _ = min((p for ps in group.values() for p in ps), key=lambda p: len(p[1]))
        length = len(xs)
        mean_curve = {n: [statistics.fmean(p[2][i] for p in ps) for i in range(length)] for n, ps in group.items()}
        target = 0.95 * max(mean_curve["bn"])
        e_bn, e_rs = _first_at(xs, mean_curve["bn"], target), _first_at(xs, mean_curve["bnrs"], target)
        is_slower = e_rs is None or e_rs > e_bn or (e_rs == e_bn and mean_curve["bnrs"][0] < mean_curve["bn"][0])
        slower.append(is_slower)
        parts.append(f"{ds} bs {bs}: {unit} {xs[0]} {mean_curve['bn'][0]:.2f} (bn) vs {mean_curve['bnrs'][0]:.2f} "
                     f"(bnrs); 95% of BN's best at {unit} {e_bn} vs "
                     f"{e_rs if e_rs else f'never in {xs[-1]}'}")  # fmt: skip
    if not slower:
        return Verdict(claim, "not enough data", "needs bn and bnrs curves at common batch sizes")
    verdict = "supported" if sum(slower) > len(slower) / 2 else "not supported"
    return Verdict(claim, verdict, f"slower in {sum(slower)} of {len(slower)}: " + "; ".join(parts))


def _slope(points: dict[int, float]) -> float:
    xs, ys = list(points), list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def depth_activation(runs: list[Run]) -> Verdict:
    claim = "Sigmoid networks lose accuracy as blocks are added, while ReLU networks gain"
    stats = aggregate(runs, ("dataset", "norm", "batch_size", "activation", "num_blocks"))
    parts, holds = [], []
    for ctx in _sort({k[:3] for k in stats}):
        curves = defaultdict(dict)
        for k, s in stats.items():
            if k[:3] == ctx and s.mean is not None:
                curves[k[3]][k[4]] = s.mean
        if len(curves.get("relu", {})) < 2 or len(curves.get("sigmoid", {})) < 2:
            continue
        slopes = {a: _slope(curves[a]) for a in ("relu", "sigmoid")}
        holds.append(slopes["sigmoid"] < 0 < slopes["relu"])
        parts.append(f"{ctx[0]} {ctx[1]} bs {ctx[2]}: accuracy per added block {slopes['relu']:+.2f} (relu), "
                     f"{slopes['sigmoid']:+.2f} (sigmoid)")  # fmt: skip
    if not holds:
        return Verdict(claim, "not enough data", "needs relu and sigmoid at two or more depths")
    return Verdict(claim, "supported" if all(holds) else "not supported", "; ".join(parts))


CLAIMS = (gn_stable, bn_needs_batch, bn_close_to_gn, brn_small_hard, bnrs_slower, depth_activation)


# --------------------------------------------------------------------------- plots


def _save(fig, ax, path: Path) -> str:
    """Legend, grid, layout, then the PNG; returns its file name."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plots(runs: list[Run], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    main = [r for r in runs if r.ok and not r.iterations]
    # Accuracy against epoch, per dataset and batch size: a line per norm, a band over seeds.
    for ctx in _sort({(r.dataset, r.net, r.activation, r.num_blocks, r.batch_size) for r in main}):
        group = [r for r in main if (r.dataset, r.net, r.activation, r.num_blocks, r.batch_size) == ctx and r.curve]
        if not group:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for norm in _sort({r.norm for r in group}):
            curves = [r.curve for r in group if r.norm == norm]
            length = min(map(len, curves))
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            std = [statistics.stdev([c[i] for c in curves]) if len(curves) > 1 else 0.0 for i in range(length)]
            epochs = list(range(1, length + 1))
            ax.plot(epochs, mean, marker="o", label=f"{norm} (n={len(curves)})")
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ds, net, act, blocks, bs = ctx
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{ds}, batch size {bs}")
        written.append(_save(fig, ax, out / f"acc_vs_epoch_{ds}_{net}_{act}_{blocks}blocks_bs{bs}.png"))
    # Best accuracy against batch size, per context, with error bars over seeds; not for runs
    # measured in iterations, whose lengths differ by batch size.
    stats = aggregate([r for r in runs if not r.iterations], (*CONTEXT, "norm", "batch_size"))
    for ctx in _sort({k[:4] for k in stats}):
        sub = {k[4:]: v for k, v in stats.items() if k[:4] == ctx and v.mean is not None}
        if len({b for _, b in sub}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for norm in _sort({n for n, _ in sub}):
            pts = sorted((b, s) for (n, b), s in sub.items() if n == norm)
            ax.errorbar([b for b, _ in pts], [s.mean for _, s in pts], yerr=[s.std or 0.0 for _, s in pts],
                        marker="o", capsize=3, label=norm)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel="best test accuracy (%)", title=f"{ctx[0]}: accuracy vs batch size")
        written.append(_save(fig, ax, out / f"acc_vs_batch_size_{ctx[0]}_{ctx[1]}_{ctx[2]}_{ctx[3]}blocks.png"))
    return written


# --------------------------------------------------------------------------- study 1: curves per iteration

# The study's colours (matplotlib's first three), so that our figure reads like its figure.
STUDY1_COLORS = {"bn": "C0", "bnrs": "C1", "brn": "C2"}
# The iterations at which the report names our test accuracy beside the study's.
COMPARE_AT = (500, 2000, 5000, 10000)


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Steps every curve has, and the mean and sample std over the curves there."""
    common = sorted(set.intersection(*({s for s, _ in c} for c in curves)))
    by_step = [dict(c) for c in curves]
    mean = [statistics.fmean(d[s] for d in by_step) for s in common]
    std = [statistics.stdev([d[s] for d in by_step]) if len(by_step) > 1 else 0.0 for s in common]
    return common, mean, std


def _study1_figure(group: list[Run], path: Path, title: str) -> str:
    """Study 1's figure for one (dataset, batch size): training loss (log scale) and test accuracy
    against iterations, a line per norm (the mean over seeds; a band of one std for accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for norm in _sort({r.norm for r in group}):
        runs = [r for r in group if r.norm == norm]
        color = STUDY1_COLORS.get(norm)
        n = len(runs)
        if all(r.losses for r in runs):
            steps, mean, _ = _mean_curve([r.losses for r in runs])
            ax_loss.plot(steps, mean, color=color, lw=0.8, label=f"{norm} (n={n})")
        if all(r.evals for r in runs):
            steps, mean, std = _mean_curve([r.evals for r in runs])
            ax_acc.plot(steps, mean, color=color, marker="o", ms=3, label=f"{norm} (n={n})")
            ax_acc.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                color=color, alpha=0.2)  # fmt: skip
    ax_loss.set_yscale("log")
    ax_loss.set(title="Training loss", xlabel="iteration", ylabel="loss of the batch (mean over seeds)")
    ax_acc.set(title="Test accuracy", xlabel="iteration", ylabel="test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _at(runs: list[Run], step: int) -> Stat:
    return Stat([dict(r.evals)[step] for r in runs if step in dict(r.evals)])


def study1_sections(runs: list[Run], out: Path, reference: str | None) -> list[str]:
    """Markdown for every (dataset, net, batch size) of iteration runs: our figure, the study's
    beside it when ``reference`` holds it, and test accuracy at ``COMPARE_AT`` side by side."""
    import shutil

    from normbench.reference import study1_reference

    lines: list[str] = []
    done = [r for r in runs if r.ok and r.iterations]
    for dataset, net, bs in _sort({(r.dataset, r.net, r.batch_size) for r in done}):
        group = [r for r in done if (r.dataset, r.net, r.batch_size) == (dataset, net, bs)]
        steps = max(r.max_steps for r in group)
        name = _study1_figure(group, out / f"study1_{dataset}_{net}_bs{bs}.png",
                              f"{dataset}, {net}, batch size {bs}: {steps:,} iterations")  # fmt: skip
        ref = study1_reference(reference, dataset, bs) if reference else None
        lines += ["", f"### {dataset}, batch size {bs} ({net}, {steps:,} iterations)", ""]
        if ref is not None:
            copy = out / f"reference_{ref[0].name}"
            shutil.copyfile(ref[0], copy)
            lines += ["| normbench | the study (published figure) |", "|---|---|",
                      f"| ![{name}]({name}) | ![{copy.name}]({copy.name}) |"]  # fmt: skip
        else:
            lines.append(f"![{name}]({name})")
        values = ref[1] if ref is not None else {}
        header = ["norm", *(f"{s:,}" for s in COMPARE_AT)]
        rows = []
        for norm in _sort({r.norm for r in group}):
            ours = [r for r in group if r.norm == norm]
            cells = []
            for step in COMPARE_AT:
                stat = _at(ours, step)
                text = stat.cell() if stat.values else "not run"
                theirs = values.get(norm, {}).get(step) if values else None
                if values and norm in values:
                    text += " / " + _reference_cell(theirs, stat.mean)
                cells.append(text)
            rows.append([norm, *cells])
        what = "ours (mean ± std, n) / the study's, read off its figure, and ours − theirs" if values else "ours"
        lines += ["", f"Test accuracy (%) at iteration: {what}.", "", markdown_table(header, rows)]
    return lines


def _reference_cell(theirs: tuple[float, bool] | None, ours: float | None) -> str:
    if theirs is None:
        return "not visible (below the panel or under later lines)"
    value, covered = theirs
    if math.isinf(value):
        return "below 75"
    text = f"{'≈' if covered else ''}{100 * value:.1f}"
    if ours is not None:
        text += f" ({ours - 100 * value:+.1f})"
    return text


# --------------------------------------------------------------------------- the report


def _scale(paths: list[str]) -> list[str]:
    """The sweeps behind the records: their commands and fixed settings, from sweep.json."""
    lines = []
    for p in map(Path, paths):
        for meta in sorted(p.rglob("sweep*.json")) if p.is_dir() else []:
            info = json.loads(meta.read_text())
            lines.append(f"- sweep `{info.get('name')}`: `{info.get('command', '')}`; base `{Path(info.get('base', '')).name}`"
                         f", for every run: `{json.dumps(info.get('overrides', {}))}`")  # fmt: skip
    return lines


def write_report(runs: list[Run], out: Path, inputs: list[str], command: str, reference: str | None = None) -> Path:
    """Write report.md, best_accuracy.csv and the plots into ``out``; return report.md's path.

    Args:
        runs: the run records.
        out: the output folder.
        inputs: the sweep or run directories the records came from.
        command: the command that made the report, as it is stated in it.
        reference: a folder of study 1's published figures to put beside ours.
    """
    out.mkdir(parents=True, exist_ok=True)
    status = defaultdict(int)
    for r in runs:
        status[r.status] += 1
    what = "test" if all(r.val_split == 0 for r in runs) else "validation"
    lines = [
        "# normbench report",
        "",
        (
            f"Made by `{command}` from {len(runs)} run records "
            f"({', '.join(f'{v} {k}' for k, v in sorted(status.items()))}); it reads records and never retrains."
        ),
        (
            f"Accuracy is the best {what} accuracy over the evaluations of a run (every epoch, or every "
            "val_check_interval iterations), in percent: mean ± sample "
            "standard deviation over seeds (n runs). Failed and diverged runs are counted, never averaged as 0%."
        ),
        (
            f"Runs made on: {', '.join(sorted({r.hardware for r in runs if r.hardware})) or 'not recorded'}; "
            f"total training wall time {sum(r.wall_time_s or 0 for r in runs) / 60:.1f} min."
        ),
        "",
        *_scale(inputs),
        "",
        "## Best accuracy by batch size and norm",
    ]
    with open(out / "best_accuracy.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CONTEXT, "batch_size", "norm", "n", "mean", "std", "failed", "diverged", "unfinished"])
        for key, s in sorted(aggregate(runs, (*CONTEXT, "batch_size", "norm")).items(), key=lambda kv: str(kv[0])):
            writer.writerow([*key, s.n, _fmt(s.mean), _fmt(s.std), s.failed, s.diverged, s.unfinished])
    for ctx, header, rows in batch_size_tables(runs):
        lines += ["", f"**{ctx[0]}**, {ctx[1]}, {ctx[2]}, {ctx[3]} blocks", "", markdown_table(header, rows)]
    for ctx, header, rows in depth_tables(runs):
        lines += ["", "## Depth and activation", "", f"**{ctx[0]}**, {ctx[1]}, {ctx[2]}, batch size {ctx[3]}", ""]
        lines.append(markdown_table(header, rows))
    lines += ["", "## The studies' claims, checked against these runs", ""]
    lines += [markdown_table(["claim", "verdict", "numbers"], [[v.claim, f"**{v.verdict}**", v.evidence] for v in
                                                                (c(runs) for c in CLAIMS)])]  # fmt: skip
    study1 = study1_sections(runs, out, reference)
    if study1:
        lines += ["", "## Training loss and test accuracy per iteration (study 1's figures)"]
        if reference:
            note = (
                "The study's numbers are read off its published figures' pixels (`normbench.reference`: to 0.1 point, "
                "0.8 next to a segment that leaves the panel; ≈: under a line drawn later, within its width)."
            )
            lines += ["", note]
        lines += study1
    broken = [r for r in runs if not r.ok]
    if broken:
        lines += ["", "## Runs that did not finish", ""]
        lines += [f"- `{Path(r.path).parent.name}`: {r.status}" for r in broken]
    plots = _plots(runs, out)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    report_path = out / "report.md"
    report_path.write_text("\n".join(lines) + "\n")
    return report_path


def _fmt(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.4f}"


def report(args: list[str] | None = None) -> Path:
    """``normbench report <sweep or run dirs> [--out DIR]``.

    Args:
        args: command-line arguments after ``report``.
    """
    parser = ArgumentParser(prog="normbench report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", type=str, nargs="+", help="sweep directories, run directories or records")
    parser.add_argument("--out", type=str | None, default=None, help="output folder (default: <first path>/report)")
    parser.add_argument("--reference", type=str | None, default=None,
                        help="folder of study 1's published figures (bs-B-dataset-D.png) to show beside ours")  # fmt: skip
    cfg = parser.parse_args(args)
    runs = find_runs(cfg.paths)
    if not runs:
        raise SystemExit(f"no {RECORD} run records under {' '.join(cfg.paths)}; pass a sweep or run directory")
    out = Path(cfg.out) if cfg.out else Path(cfg.paths[0]) / "report"
    command = "normbench report " + " ".join(sys.argv[2:] if args is None else args)
    if cfg.reference and not Path(cfg.reference).is_dir():
        raise FileNotFoundError(f"--reference {cfg.reference} is not a folder; pass the folder of the study's PNGs")
    path = write_report(runs, out, cfg.paths, command, cfg.reference)
    print(f"wrote {path}")
    return path
