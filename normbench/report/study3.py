"""Study 3's claims: which batch BatchNorm depends on, at a fixed SGD batch (Wu & Johnson 2021,
"Rethinking 'Batch' in BatchNorm"), and how it should be evaluated.

The runs are bn at several normalization batches (``model.norm_batch``) inside one SGD batch,
and batch-free controls at the same SGD batch. Each claim is tested as it is stated:

- "BN's accuracy depends on its normalization batch": the OLS slope of best accuracy on
  log2(normalization batch) over bn's runs, two-sided.
- "At small normalization batches, batch statistics at evaluation beat the running statistics":
  per normalization batch, the paired t-test of each run's last accuracy with batch statistics
  against the same run's with its running (EMA) statistics; the claim's test is the one at the
  smallest normalization batch of each (dataset, SGD batch), in every one (intersection-union).

Only plain bn (no weight standardization) on the studies' networks counts as BN here, and a
cell whose runs did not learn (below 3x chance) feeds no verdict.
- "A batch-free layer matches BN at its best": TOST of each control against BN's best cell
  within CLOSE points; in each (dataset, SGD batch) some control must be equivalent (the
  smallest p, times the controls tested: Bonferroni over the "any"), in every one
  (intersection-union: the largest of those).
"""

from __future__ import annotations

import math
from collections import defaultdict

from normbench.report.claims import CLOSE, STUDY_NETS, Verdict, budget_note, tested
from normbench.report.inference import equivalence, p_text, slope
from normbench.report.plotting import pyplot, save_figure
from normbench.report.records import Run, paired_on_all_images, part_measured, tasks_apart
from normbench.report.tables import LEARNED, PairedComparison, Stat, aggregate, sorted_values


def batch_dependent() -> tuple[str, ...]:
    """The layers whose training output depends on the batch: no control for this study."""
    from normbench.norms import BATCH_NORMS  # torch: loaded only where study 3's runs are

    return (*BATCH_NORMS, "ghost_bn", "evonorm_b0")


def _learned(runs: list[Run]) -> bool:
    """Whether a cell's runs learned (``Stat.learned``: mean best accuracy at least LEARNED x
    chance; True where chance is unknown)."""
    (stat,) = aggregate(runs, ()).values()
    return stat.learned is not False


def _bn_cells(runs: list[Run]) -> dict[tuple, dict[int, list[Run]]]:
    """(dataset, SGD batch) -> normalization batch -> plain bn's finished fp32 runs on a study
    network, every cell kept."""
    groups: dict[tuple, dict[int, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        plain = r.norm in ("bn", f"bn nb{r.norm_batch}")  # not bn+ws, bn+sws or another precision
        if r.ok and plain and r.norm_batch is not None and (r.net, r.activation, r.num_blocks) in STUDY_NETS:
            groups[(r.dataset, r.batch_size)][r.norm_batch].append(r)
    return {k: dict(v) for k, v in groups.items()}


def _bn_by_norm_batch(runs: list[Run]) -> dict[tuple, dict[int, list[Run]]]:
    """(dataset, SGD batch) -> normalization batch -> bn's runs, at the normalization batches
    whose runs learned, where two or more did."""
    learned = {k: {nb: rs for nb, rs in v.items() if _learned(rs)} for k, v in _bn_cells(runs).items()}
    return {k: v for k, v in learned.items() if len(v) >= 2}


def _not_learned(runs: list[Run]) -> str:
    """``; left out, did not learn ...`` naming bn's cells below LEARNED x chance, or ""."""
    lost = [f"{ds} SGD batch {bs} normalization batch {nb} ({Stat([r.best for r in rs]).mean:.2f}%)"
            for (ds, bs), v in sorted(_bn_cells(runs).items(), key=lambda kv: str(kv[0]))
            for nb, rs in sorted(v.items()) if not _learned(rs)]  # fmt: skip
    return f"; left out, did not learn (below {LEARNED:g}x chance): {', '.join(lost)}" if lost else ""


def _listing(cells: dict[int, list[Run]], value=lambda r: r.best) -> str:
    return ", ".join(f"{nb}: {Stat([value(r) for r in rs]).cell()}" for nb, rs in sorted(cells.items()))


def bn_depends_on_norm_batch(runs: list[Run]) -> Verdict:
    claim = "At a fixed SGD batch, BN's accuracy depends on its normalization batch"
    found, left_out = _bn_by_norm_batch(runs), _not_learned(runs)
    if not found:
        if left_out:
            return Verdict(claim, "inconclusive", left_out.removeprefix("; "))
        return Verdict(claim, "not enough data", "needs bn at 2 or more normalization batches of one SGD batch")
    parts, ps, used = [], [], []
    for (ds, bs), cells in sorted(found.items(), key=lambda kv: str(kv[0])):
        fit = slope({math.log2(nb): [r.best for r in rs] for nb, rs in cells.items()},
                    "OLS slope on log2(normalization batch)")  # fmt: skip
        if fit is None:
            return Verdict(claim, "not enough data", f"{ds} bs {bs}: too few runs for a slope")
        ps.append(fit.p)
        used += [r for rs in cells.values() for r in rs]
        parts.append(f"{ds}, SGD batch {bs}: accuracy per doubling of the normalization batch {fit.text('points')} "
                     f"(best accuracy by normalization batch: {_listing(cells)})")  # fmt: skip
    # In every context: an intersection-union test, its p the largest.
    return tested(claim, "; ".join(parts) + left_out + budget_note(used), max(ps), True)


def batch_stats_beat_ema(runs: list[Run]) -> Verdict:
    claim = "At small normalization batches, evaluating with batch statistics beats the running statistics"
    found = _bn_by_norm_batch(runs)
    parts, keys = [], []
    for (ds, bs), cells in sorted(found.items(), key=lambda kv: str(kv[0])):
        rows, key = [], None
        for nb, rs in sorted(cells.items()):
            pairs = paired_on_all_images(rs, lambda r: r.batch_stats)
            if len(pairs) < 2:
                continue
            comparison = PairedComparison(Stat([r.batch_stats for r in pairs]), Stat([r.final for r in pairs]))
            rows.append(f"normalization batch {nb}: {comparison.text()}")
            key = key or (nb, comparison)  # the smallest normalization batch of this context
        if rows:
            parts.append(f"{ds}, SGD batch {bs}, batch statistics − running statistics at the last evaluation: "
                         + "; ".join(rows))  # fmt: skip
            keys.append((ds, bs, *key))
    if not keys or any(c.p is None for *_, c in keys):
        return Verdict(claim, "not enough data", "needs bn runs with NormDiagnostics' batch-statistics accuracy, "
                       "measured on the whole validation set (eval_images: null), at 2 or more normalization "
                       "batches" + _part_measured([r for cells in found.values() for rs in cells.values() for r in rs]))  # fmt: skip
    p = max(c.p for *_, c in keys)
    tests = ", ".join(f"{ds} SGD batch {bs} normalization batch {nb}" for ds, bs, nb, _ in keys)
    evidence = (
        "; ".join(parts)
        + _not_learned(runs)
        + _part_measured([r for cells in found.values() for rs in cells.values() for r in rs])
        + f"; the claim's tests (the smallest normalization batch of each): {tests}, p = {p_text(p)}"
    )
    return tested(claim, evidence, p, all(c.difference > 0 for *_, c in keys))


def batch_free_matches_bn(runs: list[Run]) -> Verdict:
    claim = f"A batch-free layer matches BN at its best (within {CLOSE:g} points)"
    found = _bn_by_norm_batch(runs)
    parts, lost, contexts = [], [], []
    study = [r for r in runs if (r.net, r.activation, r.num_blocks) in STUDY_NETS]
    for (ds, bs), cells in sorted(found.items(), key=lambda kv: str(kv[0])):
        ps = []
        best_nb = max(cells, key=lambda nb: Stat([r.best for r in cells[nb]]).mean)
        bn = [r.best for r in cells[best_nb]]
        for name, control in _control_runs(study, ds, bs).items():
            if not _learned(control):
                lost.append(f"{ds} bs {bs} {name} ({Stat([r.best for r in control]).mean:.2f}%)")
                continue
            eq = equivalence([r.best for r in control], bn, CLOSE)
            if eq is not None:
                ps.append(eq.p)
                parts.append(f"{ds} bs {bs}, {name} − bn at normalization batch {best_nb} (BN's best): {eq.text()}")
        if ps:
            # Some control matches BN here: the smallest p, times the controls tested (Bonferroni).
            contexts.append((f"{ds} bs {bs}", min(1.0, min(ps) * len(ps)), len(ps)))
    if not contexts:
        return Verdict(claim, "not enough data", "needs bn at 2 or more normalization batches and a batch-free control")
    # ... in every context: an intersection-union test, its p the largest.
    p = max(c[1] for c in contexts)
    if len(contexts) == 1:
        tests, every = f"any of {contexts[0][2]}: Bonferroni p = {p_text(p)}", ""
    else:
        tests = ", ".join(f"{where}, any of {k}: Bonferroni p = {p_text(cp)}" for where, cp, k in contexts)
        every = f"; in every context (intersection-union over {len(contexts)}): p = {p_text(p)}"
    left_out = _not_learned(runs) + (f"; controls left out, did not learn: {', '.join(lost)}" if lost else "")
    return tested(claim, "; ".join(parts) + left_out + f"; {tests}{every}", p, True)


CLAIMS = (bn_depends_on_norm_batch, batch_stats_beat_ema, batch_free_matches_bn)


# -- the report's study 3 section ---------------------------------------------------------

SECTION_INTRO = (
    "BN at several normalization batches inside one SGD batch (`model.norm_batch`), beside layers that compute "
    "nothing over the batch, all at the same SGD batch and budget. The evaluation table gives each BN cell's last "
    "accuracy with its running statistics (EMA), with batch statistics at the evaluation batch, and after PreciseBN "
    "recomputed the running statistics from that many training images; each figure minus EMA is a paired t-test "
    "over the same runs."
)


def _control_runs(runs: list[Run], ds: str, bs: int) -> dict[str, list[Run]]:
    """The finished runs of the batch-free layers at SGD batch ``bs`` on ``ds``, by label in
    order. Asked only where bn ran at several normalization batches (study 3's runs), so a
    report without them loads no torch (``batch_dependent``)."""
    dependent = batch_dependent()
    found: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        if r.ok and (r.dataset, r.batch_size) == (ds, bs) and r.norm_name not in dependent:
            found[r.norm].append(r)
    return {name: found[name] for name in sorted_values(set(found))}


def _controls(runs: list[Run], ds: str, bs: int) -> dict[str, Stat]:
    """The batch-free layers' best accuracy at SGD batch ``bs`` on ``ds``, by label."""
    return {name: Stat([r.best for r in rs]) for name, rs in _control_runs(runs, ds, bs).items()}


def _part_measured(runs: list[Run]) -> str:
    """``; left out of the paired tests: ...`` naming runs whose diagnostics saw part of the
    validation set, or ""."""
    part = [r for r in runs if r.batch_stats is not None and r.diagnostics_images]
    if not part:
        return ""
    n, images = len(part), part_measured(part)
    return (f"; left out of the paired tests: {n} runs whose batch-statistics accuracy is on the first {images} "
            "validation images, their running-statistics accuracy on all (NormDiagnostics eval_images: null "
            "measures on all)")  # fmt: skip


def _paired(runs: list[Run], figure) -> str:
    """``figure`` of each run minus its EMA accuracy (``final``): mean ± std and the paired test,
    the test only where the two were measured on the same images (the whole validation set)."""
    shown = [r for r in runs if figure(r) is not None and r.final is not None]
    if not shown:
        return "–"
    pairs = paired_on_all_images(runs, figure)
    if len(pairs) < len(shown):
        return f"{Stat([figure(r) for r in shown]).cell()}; on the first {part_measured(shown)} images, not paired with EMA"
    stat = Stat([figure(r) for r in pairs])
    if len(pairs) < 2:
        return stat.cell()
    diff = PairedComparison(stat, Stat([r.final for r in pairs]))
    p = "" if diff.p is None else f", p = {p_text(diff.p)}"
    return f"{stat.cell()}; {diff.difference:+.2f}{p}"


def evaluation_table(cells: dict[int, list[Run]]) -> tuple[list[str], list[list[str]]]:
    """Per normalization batch: EMA, batch statistics and PreciseBN at each image count measured."""
    counts = sorted({c for rs in cells.values() for r in rs for c in r.precise_bn_by_images})
    header = ["normalization batch", "best (%)", "EMA, last (%)", "batch statistics (%); − EMA"]
    header += [f"PreciseBN {c:,} images (%); − EMA" for c in counts] or ["PreciseBN (%); − EMA"]
    rows = []
    for nb, rs in sorted(cells.items()):
        row = [str(nb), Stat([r.best for r in rs]).cell(), Stat([r.final for r in rs if r.final is not None]).cell(),
               _paired(rs, lambda r: r.batch_stats)]  # fmt: skip
        if counts:
            row += [_paired(rs, lambda r, c=c: r.precise_bn_by_images.get(c)) for c in counts]
        else:
            row.append(_paired(rs, lambda r: r.precise_bn))
        rows.append(row)
    return header, rows


def norm_batch_figure(cells: dict[int, list[Run]], controls: dict[str, Stat], path) -> str:
    """Best accuracy against the normalization batch (bn, error bars over seeds) with each
    batch-free control as a flat line and its ± std band; returns the file name."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    nbs = sorted(cells)
    stats = [Stat([r.best for r in cells[nb]]) for nb in nbs]
    ax.errorbar(nbs, [s.mean for s in stats], yerr=[s.std or 0.0 for s in stats], marker="o", capsize=3,
                color="C0", label="bn at normalization batch")  # fmt: skip
    for i, (name, s) in enumerate(controls.items(), start=1):
        if s.mean is None:
            continue
        ax.axhline(s.mean, color=f"C{i}", linestyle="--", label=f"{name} (n={s.n})")
        if s.std:
            ax.axhspan(s.mean - s.std, s.mean + s.std, color=f"C{i}", alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(nbs, [str(nb) for nb in nbs])
    ax.set(xlabel="normalization batch (images)", ylabel="best test accuracy (%)")
    return save_figure(fig, ax, path, legend_size=7)


def study3_sections(runs: list[Run], out) -> list[str]:
    """Markdown per (dataset, SGD batch) where bn ran at two or more normalization batches: the
    figure against the normalization batch, the controls' accuracies and the evaluation table."""
    from normbench.report.tables import markdown_table

    lines: list[str] = []
    runs = tasks_apart(runs)  # as the verdicts: never two networks' runs in one cell
    for (ds, bs), cells in sorted(_bn_by_norm_batch(runs).items(), key=lambda kv: str(kv[0])):
        controls = _controls(runs, ds, bs)
        name = norm_batch_figure(cells, controls, out / f"acc_vs_norm_batch_{ds}_bs{bs}.png")
        lines += ["", f"**{ds}**, SGD batch {bs}", "", f"![{name}]({name})", ""]
        if controls:
            lines += [markdown_table(["batch-free control", "best (%)"], [[n, s.cell()] for n, s in controls.items()]),
                      ""]  # fmt: skip
        lines.append(markdown_table(*evaluation_table(cells)))
    return lines
