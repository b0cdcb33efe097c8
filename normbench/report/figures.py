"""The report's figures: accuracy per epoch and against batch size, and study 1's figure per
(dataset, batch size) with its table beside the published one."""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

from normbench.report.plotting import pyplot, save_figure
from normbench.report.records import CONTEXT, Run
from normbench.report.reference import study1_reference
from normbench.report.tables import Stat, aggregate, markdown_table, mean_curve, sorted_values


def plots(runs: list[Run], out: Path) -> list[str]:
    """Accuracy per epoch (a line per norm, a band over seeds) and best accuracy against batch
    size (error bars), as PNGs in ``out``; returns their file names."""
    plt = pyplot()
    written = []
    main = [r for r in runs if r.ok and not r.iterations]
    # Accuracy against epoch, per dataset and batch size: a line per norm, a band over seeds.
    for ctx in sorted_values({(r.dataset, r.net, r.activation, r.num_blocks, r.batch_size) for r in main}):
        group = [r for r in main if (r.dataset, r.net, r.activation, r.num_blocks, r.batch_size) == ctx and r.curve]
        if not group:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for norm in sorted_values({r.norm for r in group}):
            curves = [r.curve for r in group if r.norm == norm]
            length = min(map(len, curves))
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            std = [statistics.stdev([c[i] for c in curves]) if len(curves) > 1 else 0.0 for i in range(length)]
            epochs = list(range(1, length + 1))
            ax.plot(epochs, mean, marker="o", label=f"{norm} (n={len(curves)})")
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ds, net, act, blocks, bs = ctx
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{ds}, batch size {bs}")
        written.append(save_figure(fig, ax, out / f"acc_vs_epoch_{ds}_{net}_{act}_{blocks}blocks_bs{bs}.png"))
    # Best accuracy against batch size, per context, with error bars over seeds; not for study 1's
    # runs in iterations, whose lengths differ by batch size (runs held to the same steps are in).
    stats = aggregate([r for r in runs if r.across_batches], (*CONTEXT, "norm", "batch_size"))
    for ctx in sorted_values({k[:4] for k in stats}):
        sub = {k[4:]: v for k, v in stats.items() if k[:4] == ctx and v.mean is not None}
        if len({b for _, b in sub}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for norm in sorted_values({n for n, _ in sub}):
            pts = sorted((b, s) for (n, b), s in sub.items() if n == norm)
            ax.errorbar([b for b, _ in pts], [s.mean for _, s in pts], yerr=[s.std or 0.0 for _, s in pts],
                        marker="o", capsize=3, label=norm)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel="best test accuracy (%)", title=f"{ctx[0]}: accuracy vs batch size")
        written.append(save_figure(fig, ax, out / f"acc_vs_batch_size_{ctx[0]}_{ctx[1]}_{ctx[2]}_{ctx[3]}blocks.png"))
    return written


# The study's colours (matplotlib's first three), so that our figure reads like its figure.
STUDY1_COLORS = {"bn": "C0", "bnrs": "C1", "brn": "C2"}
# The iterations at which the report names our test accuracy beside the study's.
COMPARE_AT = (500, 2000, 5000, 10000)


def _study1_figure(group: list[Run], path: Path, title: str) -> str:
    """Study 1's figure for one (dataset, batch size): training loss (log scale) and test accuracy
    against iterations, a line per norm (the mean over seeds; a band of one std for accuracy)."""
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for norm in sorted_values({r.norm for r in group}):
        runs = [r for r in group if r.norm == norm]
        color = STUDY1_COLORS.get(norm)
        n = len(runs)
        if all(r.losses for r in runs):
            steps, mean, _ = mean_curve([r.losses for r in runs])
            ax_loss.plot(steps, mean, color=color, lw=0.8, label=f"{norm} (n={n})")
        if all(r.evals for r in runs):
            steps, mean, std = mean_curve([r.evals for r in runs])
            ax_acc.plot(steps, mean, color=color, marker="o", ms=3, label=f"{norm} (n={n})")
            ax_acc.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                color=color, alpha=0.2)  # fmt: skip
    ax_loss.set_yscale("log")
    ax_loss.set(title="Training loss", xlabel="iteration", ylabel="loss of the batch (mean over seeds)")
    ax_acc.set(title="Test accuracy", xlabel="iteration", ylabel="test accuracy (%)")
    fig.suptitle(title)
    # Runs without a curve draw no line, and their axis no legend.
    return save_figure(fig, (ax_loss, ax_acc), path, dpi=100)


def _accuracy_at_step(runs: list[Run], step: int) -> Stat:
    """The runs' test accuracy at iteration ``step``, where they evaluated there."""
    return Stat([dict(r.evals)[step] for r in runs if step in dict(r.evals)])


def study1_sections(runs: list[Run], out: Path, reference: str | None) -> list[str]:
    """Markdown for every (dataset, net, batch size) of iteration runs: our figure, the study's
    beside it when ``reference`` holds it, and test accuracy at ``COMPARE_AT`` side by side."""
    lines: list[str] = []
    done = [r for r in runs if r.ok and r.iterations]
    for dataset, net, bs in sorted_values({(r.dataset, r.net, r.batch_size) for r in done}):
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
        for norm in sorted_values({r.norm for r in group}):
            ours = [r for r in group if r.norm == norm]
            cells = []
            for step in COMPARE_AT:
                stat = _accuracy_at_step(ours, step)
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


# Study 2's table ("Normalization: Batch vs Group", CIFAR-10, 50,000 images, 10 epochs, 5 seeds):
# best test accuracy, mean and std, at the batch sizes its summary quotes.
# Study 2's CIFAR-10 table, all 7 batch sizes: best test accuracy %, (mean, std) over 5 runs
# (../shared/reference/study2/README.md).
STUDY2_CIFAR10 = {
    "bn": {2: (67.83, 2.21), 4: (75.92, 1.07), 8: (77.74, 0.76), 16: (77.79, 0.54), 32: (76.83, 1.01),
           64: (75.37, 1.23), 128: (72.96, 0.85)},
    "gn": {2: (71.97, 1.91), 4: (71.71, 1.15), 8: (71.91, 0.53), 16: (71.49, 0.54), 32: (70.43, 1.26),
           64: (69.71, 0.55), 128: (67.77, 0.87)},
}  # fmt: skip
STUDY2_NOTE = (
    "Left: our best test accuracy against batch size, mean ± std over seeds. Right, on an axis of its own: "
    "the study's whole CIFAR-10 table, mean ± std over 5 runs at each of its 7 batch sizes (BN 67.83 at 2, "
    "77.79 at 16, 72.96 at 128; GN 71.97 at 2 to 67.77 at 128), with Adam 1e-3 and 10 epochs at every batch "
    "size (the study's protocol): another dataset at another scale, so compare the shapes, not the levels."
)


def study2_figure(runs: list[Run], out: Path) -> str | None:
    """Our bn and gn best accuracy against batch size (study 2's network at its depth) beside the
    study's CIFAR-10 numbers on their own axis; None without bn and gn at 2 or more batch sizes."""
    main = [
        r for r in runs if r.ok and r.across_batches and (r.net, r.activation, r.num_blocks) == ("seed_cnn", "relu", 4)
    ]
    stats = aggregate([r for r in main if r.norm in ("bn", "gn")], ("dataset", "norm", "batch_size"))
    datasets = sorted_values({d for d, n, _ in stats if n == "bn"} & {d for d, n, _ in stats if n == "gn"})
    if not datasets or len({b for _, _, b in stats}) < 2:
        return None
    plt = pyplot()
    fig, (ours, theirs) = plt.subplots(1, 2, figsize=(10, 3.8))
    for norm, color in (("bn", "C0"), ("gn", "C1")):
        for ds in datasets:
            pts = sorted((b, s) for (d, n, b), s in stats.items() if (d, n) == (ds, norm) and s.mean is not None)
            ours.errorbar([b for b, _ in pts], [s.mean for _, s in pts], yerr=[s.std or 0.0 for _, s in pts],
                          marker="o", capsize=3, color=color, label=f"{norm}, {ds} (n={pts[0][1].n})")  # fmt: skip
        quoted = sorted(STUDY2_CIFAR10[norm].items())
        theirs.errorbar([b for b, _ in quoted], [m for _, (m, _) in quoted], yerr=[s for _, (_, s) in quoted],
                        marker="s", capsize=3, color=color, ls="--",
                        label=f"{norm}, CIFAR-10 (the study, n=5)")  # fmt: skip
    for ax, title in ((ours, f"ours: {', '.join(datasets)}"), (theirs, "the study: CIFAR-10, another scale")):
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel="best test accuracy (%)", title=title)
    return save_figure(fig, (ours, theirs), out / "study2_beside_the_study.png")
