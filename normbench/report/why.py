"""The "why" of a report: per norm and batch size, what the run records' end-of-run diagnostics
say about where an accuracy was lost, and study 2's gradient magnitude per block against depth.

Accuracy with running statistics (the run's last evaluation), with the norms' batch statistics
(train mode, nothing updated) and after PreciseBN recomputed the running statistics; the last
norm layer's batch-vs-running mean gap and std ratio over the last epoch. A norm that loses to
another and gets a significant part of it back after PreciseBN lost it to stale running
statistics; one that still trails after PreciseBN trained a worse network (the batch statistics
in training were the problem); where neither test shows it, the sentence says so.
"""

from __future__ import annotations

from normbench.report.records import Run, paired_on_all_images, part_measured
from normbench.report.tables import Comparison, PairedComparison, Stat, aggregate, markdown_table, sorted_values

# Study 2's depth experiment as its summary quotes it (CIFAR-10, BN, 1 to 8 blocks).
STUDY2_DEPTH = {
    "accuracy": {"relu": (54.99, 80.07), "sigmoid": (44.59, 32.97)},
    "gradient": {"relu": (0.0124, 0.0039), "sigmoid": (0.0090, 0.0024)},
}
FIGURES = (("final", "running statistics"), ("batch_stats", "batch statistics"), ("precise_bn", "after PreciseBN"),
           ("mean_gap", "last layer's mean gap"), ("std_ratio", "last layer's std ratio"))  # fmt: skip


def _present(runs: list[Run], keys: tuple[str, ...], metric: str) -> dict[tuple, Stat]:
    """``aggregate`` over the finished runs that measured ``metric`` (gn has no running statistics,
    so no batch-statistics or PreciseBN figures)."""
    return aggregate([r for r in runs if r.ok and getattr(r, metric) is not None], keys, metric)


def why_sections(runs: list[Run]) -> list[str]:
    """Markdown: per context, a table of the end-of-run figures by batch size and norm, and a
    sentence per batch size where BN and GN both ran."""
    done = [r for r in runs if r.ok and r.across_batches]
    lines: list[str] = []
    # Contexts where some norm was diagnosed (PreciseBN ran: a norm with running statistics).
    for ctx in sorted_values({r.context() for r in done if r.precise_bn is not None}):
        group = [r for r in done if r.context() == ctx]
        stats = {name: _present(group, ("batch_size", "norm"), name) for name, _ in FIGURES}
        keys = sorted_values(set(stats["final"]))
        header = ["batch size", "norm", *(f"{label} (%)" if name in ("final", "batch_stats", "precise_bn") else label
                                          for name, label in FIGURES)]  # fmt: skip
        rows = [[str(b), n, *(stats[name].get((b, n), Stat([])).cell(3 if name in ("mean_gap", "std_ratio") else 2)
                              for name, _ in FIGURES)] for b, n in keys]  # fmt: skip
        counts = part_measured([r for r in group if r.precise_bn is not None])
        lines += ["", f"**{ctx[0]}**, {ctx[1]}, {ctx[2]}, {ctx[3]} blocks", "", markdown_table(header, rows)]
        if counts:
            note = (f"(The batch-statistics and PreciseBN accuracies are on the first {counts} validation images, "
                    "the running-statistics one on all of them: compare them with care.)")  # fmt: skip
            lines += ["", note]
        sentences = [_sentence(b, stats, group) for b in sorted_values({b for b, _ in keys})]
        lines += [""] + [f"- {s}" for s in sentences if s]
    return lines


def _sentence(bs, stats: dict[str, dict[tuple, Stat]], runs: list[Run]) -> str | None:
    """What BN's figures at batch size ``bs`` say: against GN's accuracy, and against its own
    accuracy with batch statistics and after PreciseBN. A cause is named only where a test shows
    it: stale running statistics where PreciseBN's gain is significant (paired, run by run), a
    worse trained network where BN still trails GN after PreciseBN (Welch)."""
    final = stats["final"]
    if (bs, "bn") not in final:
        return None
    bn = final[(bs, "bn")]
    batch = stats["batch_stats"].get((bs, "bn"))
    gap, ratio = stats["mean_gap"].get((bs, "bn")), stats["std_ratio"].get((bs, "bn"))
    parts = []
    gn = final.get((bs, "gn"))
    against = Comparison(bn, gn) if gn is not None else None
    if against is not None:
        word = "behind" if against.difference < 0 else "ahead of"
        parts.append(f"at batch size {bs}, BN is {word} GN by {abs(against.difference):.2f} points "
                     f"(BN − GN {against.text()})")  # fmt: skip
    else:
        parts.append(f"at batch size {bs}")
    measured = [r for r in runs if r.norm == "bn" and r.batch_size == bs and r.ok and r.precise_bn is not None]
    if not measured:
        return ", ".join(parts) + "; its runs have no PreciseBN figures."
    # PreciseBN against the same run's running-statistics accuracy, run by run, where both were
    # measured on the same images (the whole validation set).
    pairs = paired_on_all_images(measured, lambda r: r.precise_bn)
    if not pairs:
        parts.append("PreciseBN's accuracy is on part of the validation set and its running-statistics one on all, "
                     "so the two are not compared")  # fmt: skip
    else:
        precise = Stat([r.precise_bn for r in pairs])
        fix = PairedComparison(precise, Stat([r.final for r in pairs]))
        recovered = fix.difference
        if against is not None and against.difference < 0 and against.significant():
            after = Comparison(precise, gn)
            found = []
            if recovered > 0 and fix.significant():
                found.append(f"PreciseBN recovers {recovered:+.2f} points of them ({fix.text()}): stale running "
                             "statistics cost that much")  # fmt: skip
            if after.difference < 0 and after.significant():
                found.append(f"after PreciseBN BN still trails GN (BN − GN {after.text()}): the network it trained "
                             "on noisy batch statistics is worse")  # fmt: skip
            parts += found or [(f"PreciseBN changes BN's accuracy by {fix.text()} and leaves it at BN − GN "
                                f"{after.text()}: at this n, what cost BN its points cannot be told")]  # fmt: skip
        elif recovered > 1.0 and fix.significant():
            parts.append(f"PreciseBN adds {recovered:+.2f} points to BN's own ({fix.text()}): its running statistics "
                         "lag the network they describe, and evaluation pays for it")  # fmt: skip
        elif recovered > 1.0:
            parts.append(f"PreciseBN adds {fix.text()} to BN's own, not significant at this n: its running "
                         "statistics may lag the network")  # fmt: skip
        else:
            parts.append(f"PreciseBN changes BN's accuracy by {fix.text()}: no sign that its running statistics lag "
                         "the network")  # fmt: skip
    if batch is not None and batch.values and gap is not None and gap.values and ratio is not None:
        parts.append(f"with batch statistics at evaluation it scores {batch.mean:.2f}%, and in training its last "
                     f"layer's batch mean lay {gap.mean:.3f} running standard deviations from the running mean, "
                     f"with a std ratio of {ratio.mean:.3f}")  # fmt: skip
    return "; ".join(parts) + "."


def gradient_sections(runs: list[Run]) -> list[str]:
    """Markdown: where depth varies, accuracy and the gradient magnitude of the first and the
    last block, and their ratio, against depth per activation, beside the study's figures."""
    done = [r for r in runs if r.ok and r.grads]
    lines: list[str] = []
    contexts = sorted_values({(r.dataset, r.net, r.norm, r.batch_size) for r in done})
    for ctx in contexts:
        group = [r for r in done if (r.dataset, r.net, r.norm, r.batch_size) == ctx]
        if len({r.num_blocks for r in group}) < 2:
            continue
        cols = ("best", "grad_first", "grad_last", "grad_ratio")
        stats = {c: _present(group, ("activation", "num_blocks"), c) for c in cols}
        header = ["activation", "blocks", "best accuracy (%)", "gradient, first block", "gradient, last block",
                  "last / first"]  # fmt: skip

        def figures(key: tuple, stats: dict = stats) -> list[str]:
            return [stats[c].get(key, Stat([])).cell(digits) for c, digits in
                    (("grad_first", 5), ("grad_last", 5), ("grad_ratio", 3))]  # fmt: skip

        rows = [
            [a, str(d), stats["best"][(a, d)].cell(), *figures((a, d))] for a, d in sorted_values(set(stats["best"]))
        ]
        lines += ["", f"**{ctx[0]}**, {ctx[1]}, {ctx[2]}, batch size {ctx[3]}", "", markdown_table(header, rows)]
        acc, grad = STUDY2_DEPTH["accuracy"], STUDY2_DEPTH["gradient"]
        study = (
            "The study (CIFAR-10, as its summary quotes it, 1 block → 8 blocks): accuracy "
            f"{acc['relu'][0]}% → {acc['relu'][1]}% with ReLU, {acc['sigmoid'][0]}% → {acc['sigmoid'][1]}% "
            f"with sigmoid; gradient magnitude {grad['relu'][0]} → {grad['relu'][1]} (ReLU), "
            f"{grad['sigmoid'][0]} → {grad['sigmoid'][1]} (sigmoid)."
        )
        lines += ["", study]
    return lines
