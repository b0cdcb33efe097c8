"""The studies' claims, each tested as it is stated, with the statistics behind its verdict.

A verdict is ``supported``, ``not supported``, ``inconclusive`` (a condition it compares did not
learn: its runs' mean stayed below LEARNED x chance) or ``not enough data``. Each claim's test
(``normbench.report.inference``) is the one its words call for:

- "BN needs a large batch" is about BN relative to GN: the norm x log2(batch size) interaction,
  the slope of the cells' BN − GN gaps on log2(batch size) (the gap's change per doubling of
  the batch), by a Welch contrast: each cell's own variance, Welch–Satterthwaite df.
- "GN stays stable" and "within 3 points" are equivalence claims: two one-sided tests against
  the CLOSE margin (TOST), over every pair they cover (an intersection-union test: the claim's p
  is the largest). A difference that is merely not significant never supports them.
- "BRN beats BN only at small batch sizes on the hard task": one-sided Welch t-tests against the
  BEATS margin, BRN − BN > BEATS at the hard task's smallest batch and < BEATS at every other
  cell (an intersection-union test).
- "BNRS converges slower than BN": Welch's t-test of each run's mean accuracy over its accuracy
  curve (the area under it per iteration or epoch, over the steps every run of the cell has),
  BNRS − BN, in every cell.
- "sigmoid loses / ReLU gains with depth" is the OLS slope of accuracy on log2(blocks) for each
  activation.

``judge`` runs every claim and corrects their p-values together for multiplicity (Holm); a
claim is supported when its estimate points the way it says and its Holm-adjusted p < ALPHA.
Evidence gives n, the estimate, its interval and p, and says when the optimizer steps of the
cells compared differ by more than STEPS_APART-fold: then the budget moved with the batch.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import replace

from normbench.report.claims import ALPHA, BEATS, CLOSE, STUDY_NETS, Verdict, budget_note, tested
from normbench.report.inference import difference, equivalence, holm, interaction, p_text, slope
from normbench.report.records import Run, tasks_apart
from normbench.report.study3 import CLAIMS as STUDY3_CLAIMS
from normbench.report.tables import Comparison, Stat, aggregate, mean_curve, sorted_values


def judge(runs: list[Run]) -> list[Verdict]:
    """Every claim's verdict, the tested ones decided on their Holm-adjusted p-values; each
    compares within a dataset, and within a network where the runs trained several on it."""
    runs = tasks_apart(runs)
    found = [claim(runs) for claim in CLAIMS]
    tested = [i for i, v in enumerate(found) if v.p is not None]
    for i, adjusted in zip(tested, holm([found[i].p for i in tested]), strict=True):
        v = found[i]
        tests = "one test" if len(tested) == 1 else f"{len(tested)} tests"
        note = f"Holm-adjusted over the report's {tests}: p = {p_text(adjusted)}"
        found[i] = replace(v, verdict="supported" if v.holds and adjusted < ALPHA else "not supported",
                           evidence=f"{v.evidence}; {note}", p_holm=adjusted)  # fmt: skip
    return found


def _stats(runs: list[Run], **fixed) -> dict[tuple, Stat]:
    """(dataset, batch size) -> the best accuracies of the runs matching ``fixed``."""
    chosen = [r for r in runs if all(getattr(r, k) == v for k, v in fixed.items())]
    return {k: s for k, s in aggregate(chosen, ("dataset", "batch_size")).items() if s.mean is not None}


def _not_learned(*groups: dict[tuple, Stat]) -> list[str]:
    """The conditions among ``groups`` whose runs did not learn, as ``dataset bs B (mean%)``."""
    found = {k: s for g in groups for k, s in g.items() if s.learned is False}
    return [f"{d} bs {b} ({s.mean:.2f}%)" for (d, b), s in sorted(found.items(), key=lambda kv: str(kv[0]))]


def _learned(**groups: dict[tuple, Stat]) -> tuple[list[dict[tuple, Stat]], str]:
    """The cells (dataset, batch size) where every named group's runs learned, a cell that did
    not learn feeding no verdict, and the note naming the cells left out (empty when none is).

    Args:
        **groups: norm name -> (dataset, batch size) -> its runs' Stat.
    """
    lost = {k for g in groups.values() for k, s in g.items() if s.learned is False}
    kept = [{k: s for k, s in g.items() if k not in lost} for g in groups.values()]
    names = [f"{n} {d} bs {b} ({s.mean:.2f}%)" for n, g in groups.items()
             for (d, b), s in sorted(g.items(), key=lambda kv: str(kv[0])) if s.learned is False]  # fmt: skip
    return kept, (f"; left out, did not learn (below 3x chance): {', '.join(names)}" if names else "")


def _inconclusive(claim: str, names: list[str], norm: str = "") -> Verdict:
    who = f"{norm} runs" if norm else "runs"
    return Verdict(claim, "inconclusive", f"{who} at {', '.join(names)} did not learn (below 3x chance)")


def _main_runs(runs: list[Run]) -> list[Run]:
    """The runs of the studies' networks at their usual depth and activation."""
    return [r for r in runs if (r.net, r.activation, r.num_blocks) in STUDY_NETS]


def _cells(runs: list[Run], norm: str, dataset: str, stats: dict[tuple, Stat]) -> list[Run]:
    """The main runs of ``norm`` on ``dataset`` at the batch sizes of ``stats``."""
    sizes = {b for d, b in stats if d == dataset}
    return [r for r in _main_runs(runs) if r.norm == norm and r.dataset == dataset and r.batch_size in sizes]


def gn_stable(runs: list[Run]) -> Verdict:
    claim = f"GroupNorm stays stable across batch sizes (every two within {CLOSE:g} points)"
    everything = _stats(_main_runs(runs), norm="gn")
    (gn,), left_out = _learned(gn=everything)
    parts, ps, used = [], [], []
    for ds in sorted_values({d for d, _ in gn}):
        accs = {b: s for (d, b), s in gn.items() if d == ds}
        if len(accs) < 3:
            continue
        sizes = sorted(accs)
        tests = {(a, b): equivalence(accs[b].values, accs[a].values, CLOSE) for i, a in enumerate(sizes)
                 for b in sizes[i + 1:]}  # fmt: skip
        if any(t is None for t in tests.values()):
            return Verdict(claim, "not enough data", f"{ds}: needs 2 or more gn runs with a spread at every batch size")
        (a, b), worst = max(tests.items(), key=lambda kv: kv[1].p)
        lo, hi = min(accs, key=lambda k: accs[k].mean), max(accs, key=lambda k: accs[k].mean)
        ps.append(worst.p)
        used += _cells(runs, "gn", ds, gn)
        parts.append(f"{ds}: {accs[lo].mean:.2f} (bs {lo}) to {accs[hi].mean:.2f} (bs {hi}) over batch sizes "
                     f"{sizes[0]}–{sizes[-1]}; the least equivalent pair, bs {b} − bs {a}: {worst.text()}; "
                     f"intersection-union test over the {len(tests)} pairs: p = {p_text(worst.p)}")  # fmt: skip
    if not ps:
        if left_out:
            return _inconclusive(claim, _not_learned(everything), "gn")
        return Verdict(claim, "not enough data", "needs gn at 3 or more batch sizes")
    return tested(claim, "; ".join(parts) + left_out + budget_note(used), max(ps), True)


def _bn_gn(runs: list[Run]) -> tuple[dict[tuple, Stat], dict[tuple, Stat]]:
    """BN's and GN's stats at the (dataset, batch size) cells both have."""
    main = _main_runs(runs)
    bn, gn = _stats(main, norm="bn"), _stats(main, norm="gn")
    common = {k for k in bn if k in gn}
    return {k: bn[k] for k in common}, {k: gn[k] for k in common}


def _gaps(bn: dict[tuple, Stat], gn: dict[tuple, Stat], ds: str) -> str:
    return ", ".join(f"bs {b}: {bn[(d, b)].mean - gn[(d, b)].mean:+.2f}" for d, b in sorted(bn) if d == ds)


def bn_needs_batch(runs: list[Run]) -> Verdict:
    claim = "BN needs a large enough batch size to perform well (BN − GN grows with the batch size)"
    all_bn, all_gn = _bn_gn(runs)
    (bn, gn), left_out = _learned(bn=all_bn, gn=all_gn)
    # One fit per dataset and layout (processes): a batch of 8 on 4 devices x 2 is not one
    # device's 8, and the two must not share a point of the fit.
    contexts = [(d, w) for d, w in sorted_values({(d, b.world_size) for d, b in bn})
                if len({b for e, b in bn if (e, b.world_size) == (d, w)}) >= 2]  # fmt: skip
    if not contexts:
        if left_out:
            return _inconclusive(claim, _not_learned(all_bn, all_gn))
        return Verdict(claim, "not enough data", "needs bn and gn at 2 or more common batch sizes")
    parts, ps, holds, used = [], [], [], []
    for ds, world in contexts:

        def log2(stats, ds=ds, world=world):
            return {math.log2(b): stats[(d, b)].values for d, b in stats if d == ds and b.world_size == world}

        name = ds if world == 1 else f"{ds} on {world} processes"
        fit = interaction(log2(bn), log2(gn))
        if fit is None:
            return Verdict(claim, "not enough data", f"{name}: too few bn and gn runs for the interaction's fit")
        ps.append(fit.p)
        holds.append(fit.estimate > 0)
        at = {k for k in bn if k[0] == ds and k[1].world_size == world}
        used += [r for r in _cells(runs, "bn", ds, bn) + _cells(runs, "gn", ds, gn) if (ds, r.batch_size) in at]
        gaps = _gaps({k: bn[k] for k in at}, {k: gn[k] for k in at}, ds)
        parts.append(f"{name}: BN − GN per doubling of the batch size {fit.text('points')} (BN − GN: {gaps})")
    return tested(claim, "; ".join(parts) + left_out + budget_note(used), max(ps), all(holds))


def bn_close_to_gn(runs: list[Run]) -> Verdict:
    claim = f"Where BN performs well (within {CLOSE:g} points of its best), it is within {CLOSE:g} points of GN"
    all_bn, all_gn = _bn_gn(runs)
    (bn, gn), left_out = _learned(bn=all_bn, gn=all_gn)
    datasets = sorted_values({d for d, _ in bn})
    if not datasets:
        if left_out:
            return _inconclusive(claim, _not_learned(all_bn, all_gn))
        return Verdict(claim, "not enough data", "needs bn and gn at a common batch size")
    parts, ps, used = [], [], []
    for ds in datasets:
        best = max(s.mean for (d, _), s in bn.items() if d == ds)
        good = sorted(b for (d, b), s in bn.items() if d == ds and s.mean >= best - CLOSE)
        tests = {b: equivalence(bn[(ds, b)].values, gn[(ds, b)].values, CLOSE) for b in good}
        if any(t is None for t in tests.values()):
            return Verdict(claim, "not enough data", f"{ds}: needs 2 or more runs with a spread in each cell")
        b, worst = max(tests.items(), key=lambda kv: kv[1].p)
        ps.append(worst.p)
        used += [r for r in _cells(runs, "bn", ds, bn) + _cells(runs, "gn", ds, gn) if r.batch_size in good]
        parts.append(f"{ds}: BN within {CLOSE:g} of its best at batch sizes {', '.join(map(str, good))}; the least "
                     f"equivalent, bs {b}, BN − GN: {worst.text()}; intersection-union test over {len(tests)}: "
                     f"p = {p_text(worst.p)}")  # fmt: skip
    return tested(claim, "; ".join(parts) + left_out + budget_note(used), max(ps), True)


def brn_small_hard(runs: list[Run]) -> Verdict:
    claim = "BRN beats BN only at small batch sizes on the hard task"
    main = _main_runs(runs)
    bn, brn = _stats(main, norm="bn"), _stats(main, norm="brn")
    cells = sorted(k for k in bn if k in brn)
    datasets = sorted_values({d for d, _ in cells})
    if len(datasets) < 2 or len({b for _, b in cells}) < 2:
        return Verdict(claim, "not enough data", "needs bn and brn on two datasets at two or more batch sizes")
    missed = _not_learned({k: bn[k] for k in cells}, {k: brn[k] for k in cells})
    if missed:
        return _inconclusive(claim, missed)
    hard = min(datasets, key=lambda d: statistics.fmean(bn[(e, b)].mean for (e, b) in cells if e == d))
    key = (hard, min(b for d, b in cells if d == hard))
    # "Beats" (by more than BEATS points) where the claim says, and "only": BRN's gain shown to
    # be under BEATS at every other cell. Each a one-sided Welch t-test against the margin.
    tests = {k: difference(brn[k].values, bn[k].values, BEATS, "greater" if k == key else "less") for k in cells}
    short = [f"{d} bs {b}" for (d, b), t in tests.items() if t is None]
    if short:
        return Verdict(claim, "not enough data", f"{', '.join(short)}: needs 2 or more runs with a spread a side")
    listing = "; ".join(f"{d} bs {b}: {tests[(d, b)].text()}" for d, b in cells if (d, b) != key)
    evidence = (f"hard task = {hard} (lowest BN accuracy); BRN − BN at {hard} bs {key[1]}: {tests[key].text()}; "
                f"elsewhere: {listing}; intersection-union test over the {len(tests)} cells: "
                f"p = {p_text(max(t.p for t in tests.values()))}")  # fmt: skip
    holds = tests[key].difference > BEATS and all(t.difference < BEATS for k, t in tests.items() if k != key)
    used = [r for r in main if (r.dataset, r.batch_size) in tests and r.norm in ("bn", "brn")]
    return tested(claim, evidence + budget_note(used), max(t.p for t in tests.values()), holds)


def _first_reaching(xs: list[int], curve: list[float], target: float) -> int | None:
    """The first x at which the curve reaches ``target``, None if it never does."""
    return next((x for x, a in zip(xs, curve) if a >= target), None)


def _curve_mean(xs: list[int], curve: list[float], steps: list[int]) -> float:
    """A run's mean accuracy over its curve at ``steps``: the area under it (trapezoids) per
    unit of x, which is larger the sooner the run learns; the one value with one step."""
    at = dict(zip(xs, curve))
    ys = [at[x] for x in steps]
    if len(steps) == 1:
        return ys[0]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(steps, steps[1:], ys, ys[1:]))
    return area / (steps[-1] - steps[0])


def bnrs_slower(runs: list[Run]) -> Verdict:
    claim = "BNRS converges slower than BN"
    main = [r for r in _main_runs(runs) if r.ok and r.points()[1]]
    parts, ps, holds, used, lost = [], [], [], [], []
    for ds, net, bs in sorted_values({(r.dataset, r.net, r.batch_size) for r in main if r.norm == "bnrs"}):
        cell = [r for r in main if (r.dataset, r.net, r.batch_size) == (ds, net, bs) and r.norm in ("bn", "bnrs")]
        group = {n: [r for r in cell if r.norm == n] for n in ("bn", "bnrs")}
        if not group["bn"] or not group["bnrs"]:
            continue
        stats = aggregate(cell, ("norm",))
        if any(stats[(n,)].learned is False for n in group):
            lost += [f"{n} {ds} bs {bs} ({stats[(n,)].mean:.2f}%)" for n in group if stats[(n,)].learned is False]
            continue
        unit = group["bn"][0].points()[0]
        # Curves averaged step by step, over the steps every run of the cell has.
        curves = {n: mean_curve([list(zip(*r.points()[1:])) for r in rs]) for n, rs in group.items()}
        steps = sorted(set(curves["bn"][0]) & set(curves["bnrs"][0]))
        if not steps:
            continue
        mean = {n: dict(zip(c[0], c[1])) for n, c in curves.items()}
        target = 0.95 * max(mean["bn"][x] for x in steps)
        reach = {n: _first_reaching(steps, [mean[n][x] for x in steps], target) for n in group}
        areas = {n: [_curve_mean(*r.points()[1:], steps) for r in rs] for n, rs in group.items()}
        test = difference(areas["bnrs"], areas["bn"])
        if test is None:
            return Verdict(claim, "not enough data", f"{ds} bs {bs}: needs 2 or more runs with a spread a side")
        ps.append(test.p)
        holds.append(test.difference < 0)
        used += cell
        never = f"never by {unit} {steps[-1]}"
        over = (
            f"mean accuracy over {unit}s {steps[0]}–{steps[-1]}" if len(steps) > 1 else f"accuracy at {unit} {steps[0]}"
        )
        parts.append(f"{ds} bs {bs}: {over}, bnrs − bn {test.text()}; "
                     f"95% of BN's best at {unit} {reach['bn']} (bn) vs "
                     f"{reach['bnrs'] if reach['bnrs'] is not None else never} (bnrs)")  # fmt: skip
    left_out = f"; left out, did not learn (below 3x chance): {', '.join(lost)}" if lost else ""
    if not ps:
        if lost:
            return _inconclusive(claim, lost)
        return Verdict(claim, "not enough data", "needs bn and bnrs curves at common batch sizes")
    evidence = "; ".join(parts) + left_out + budget_note(used)
    return tested(claim, evidence + f"; in every cell: intersection-union test over {len(ps)}", max(ps), all(holds))


def depth_activation(runs: list[Run]) -> Verdict:
    # Deep sigmoid networks that stop learning are what this claim is about: sigmoid cells below
    # 3x chance that are deeper than every sigmoid cell that learned feed it, and the evidence
    # says which they are. Any other cell that did not learn (a ReLU one, or a shallow sigmoid
    # one: a network that never learned has nothing for depth to take away) makes its context
    # inconclusive.
    claim = "Sigmoid networks lose accuracy as blocks are added, while ReLU networks gain"
    stats = aggregate(runs, ("dataset", "norm", "batch_size", "activation", "num_blocks"))
    parts, ps, holds, unclear, used = [], [], [], [], []
    for ctx in sorted_values({k[:3] for k in stats}):
        cells: dict[str, dict[int, Stat]] = defaultdict(dict)
        for k, s in stats.items():
            if k[:3] == ctx and s.mean is not None:
                cells[k[3]][k[4]] = s
        if len(cells.get("relu", {})) < 2 or len(cells.get("sigmoid", {})) < 2:
            continue
        where = f"{ctx[0]} {ctx[1]} bs {ctx[2]}"
        learned = [d for d, s in cells["sigmoid"].items() if s.learned is not False]
        deep_lost = [d for d, s in sorted(cells["sigmoid"].items()) if s.learned is False and learned
                     and d > max(learned)]  # fmt: skip
        other_lost = [f"{a} {d} blocks ({s.mean:.2f}%)" for a in ("relu", "sigmoid")
                      for d, s in sorted(cells[a].items())
                      if s.learned is False and not (a == "sigmoid" and d in deep_lost)]  # fmt: skip
        if other_lost:
            unclear.append(f"{where}: {', '.join(other_lost)} did not learn (below 3x chance), so depth had nothing "
                           "to take away there")  # fmt: skip
            continue
        fits = {a: slope({math.log2(d): s.values for d, s in cells[a].items()}, "OLS slope on log2(blocks)")
                for a in ("relu", "sigmoid")}  # fmt: skip
        if any(f is None for f in fits.values()):
            unclear.append(f"{where}: too few runs for a slope")
            continue
        holds.append(fits["sigmoid"].estimate < 0 < fits["relu"].estimate)
        ps.append(max(f.p for f in fits.values()))
        used += [r for r in runs if (r.dataset, r.norm, r.batch_size) == ctx and r.activation in fits]
        text = [(f"{where}: accuracy per doubling of the blocks, relu {fits['relu'].text('points')}; sigmoid "
                 f"{fits['sigmoid'].text('points')}")]  # fmt: skip
        for act in ("relu", "sigmoid"):
            shallow, deep = min(cells[act]), max(cells[act])
            text.append(f"{act} {deep} − {shallow} blocks: {Comparison(cells[act][deep], cells[act][shallow]).text()}")
        if deep_lost:
            lost = ", ".join(f"sigmoid {d} blocks ({cells['sigmoid'][d].mean:.2f}%)" for d in deep_lost)
            text.append(f"did not learn (below 3x chance, what the claim predicts of deep sigmoid networks): {lost}")
        parts.append("; ".join(text))
    if not holds:
        if unclear:
            return Verdict(claim, "inconclusive", "; ".join(unclear))
        return Verdict(claim, "not enough data", "needs relu and sigmoid at two or more depths")
    evidence = "; ".join(parts + unclear) + budget_note(used)
    return tested(claim, evidence + "; both slopes tested: p is the larger", max(ps), all(holds))


CLAIMS = (gn_stable, bn_needs_batch, bn_close_to_gn, brn_small_hard, bnrs_slower, depth_activation, *STUDY3_CLAIMS)
