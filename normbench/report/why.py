"""The "why" of a report: per norm and batch size, what the run records' end-of-run diagnostics
say about where an accuracy was lost, and study 2's gradient magnitude per block against depth.

Accuracy with running statistics (the run's last evaluation), with the norms' batch statistics
(train mode, nothing updated) and after PreciseBN recomputed the running statistics; the last
norm layer's batch-vs-running mean gap and std ratio over the last epoch. A norm that loses to
another and gets it back after PreciseBN lost it to stale running statistics; one that does not
get it back trained a worse network (the batch statistics in training were the problem).
"""

from __future__ import annotations

from normbench.report.records import Run
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
        subset = sorted({r.diagnostics_images for r in group if r.precise_bn is not None} - {None})
        lines += ["", f"**{ctx[0]}**, {ctx[1]}, {ctx[2]}, {ctx[3]} blocks", "", markdown_table(header, rows)]
        if subset:
            counts = " or ".join(f"{n:,}" for n in subset)
            note = (f"(The batch-statistics and PreciseBN accuracies are on the first {counts} validation images, "
                    "the running-statistics one on all of them: compare them with care.)")  # fmt: skip
            lines += ["", note]
        sentences = [_sentence(b, stats) for b in sorted_values({b for b, _ in keys})]
        lines += [""] + [f"- {s}" for s in sentences if s]
    return lines


def _sentence(bs, stats: dict[str, dict[tuple, Stat]]) -> str | None:
    """What BN's figures at batch size ``bs`` say: against GN's accuracy, and against its own
    accuracy with batch statistics and after PreciseBN."""
    final = stats["final"]
    if (bs, "bn") not in final:
        return None
    bn = final[(bs, "bn")]
    precise, batch = stats["precise_bn"].get((bs, "bn")), stats["batch_stats"].get((bs, "bn"))
    gap, ratio = stats["mean_gap"].get((bs, "bn")), stats["std_ratio"].get((bs, "bn"))
    parts = []
    gn = final.get((bs, "gn"))
    if gn is not None:
        against = Comparison(bn, gn)
        word = "behind" if against.difference < 0 else "ahead of"
        parts.append(f"at batch size {bs}, BN is {word} GN by {abs(against.difference):.2f} points "
                     f"(BN − GN {against.text()})")  # fmt: skip
    else:
        parts.append(f"at batch size {bs}")
    if precise is None or not precise.values:
        return ", ".join(parts) + "; its runs have no PreciseBN figures."
    recovered = precise.mean - bn.mean
    # The same runs' two accuracies: a paired comparison (bn's runs all measured PreciseBN).
    fix = PairedComparison(precise, bn) if precise.n == bn.n else Comparison(precise, bn)
    lost = -against.difference if gn is not None else 0.0
    if lost > 0 and recovered >= lost / 2:
        why = (f"PreciseBN recovers {recovered:+.2f} points of them: stale running statistics, not the noisy "
               "batch statistics in training, cost that much")  # fmt: skip
    elif lost > 0:
        why = (f"PreciseBN recovers only {recovered:+.2f}: the running statistics are not what BN lost; the network "
               "it trained on noisy batch statistics is worse")  # fmt: skip
    elif recovered > 1.0 and fix.significant():
        why = (f"PreciseBN adds {recovered:+.2f} points to BN's own ({fix.text()}): its running statistics lag the "
               "network they describe, and evaluation pays for it")  # fmt: skip
    elif recovered > 1.0:
        why = (f"PreciseBN adds {fix.text()} to BN's own, not significant at this n: its running statistics may "
               "lag the network")  # fmt: skip
    else:
        why = f"PreciseBN changes BN's accuracy by {fix.text()}: its running statistics fit the network"
    parts.append(why)
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
