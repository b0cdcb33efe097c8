"""The studies' claims, each tested as it is stated, with the statistics behind its verdict.

A verdict is ``supported``, ``not supported``, ``inconclusive`` (a condition it compares did not
learn: its runs' mean stayed below LEARNED x chance) or ``not enough data``. Each claim's test
(``normbench.report.inference``) is the one its words call for:

- "BN needs a large batch" is about BN relative to GN: the norm x log2(batch size) interaction
  of an OLS fit over every bn and gn run (the BN − GN gap per doubling of the batch).
- "GN stays stable" and "within 3 points" are equivalence claims: two one-sided tests against
  the CLOSE margin (TOST), over every pair they cover (an intersection-union test: the claim's p
  is the largest). A difference that is merely not significant never supports them.
- "BRN beats BN" is a Welch t-test; "sigmoid loses / ReLU gains with depth" is the OLS slope of
  accuracy on log2(blocks) for each activation.

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

from normbench.report.claims import ALPHA, BEATS, CLOSE, Verdict, budget_note, tested
from normbench.report.inference import equivalence, holm, interaction, p_text, slope
from normbench.report.records import Run
from normbench.report.study3 import CLAIMS as STUDY3_CLAIMS
from normbench.report.tables import Comparison, Stat, aggregate, sorted_values


def judge(runs: list[Run]) -> list[Verdict]:
    """Every claim's verdict, the tested ones decided on their Holm-adjusted p-values."""
    found = [claim(runs) for claim in CLAIMS]
    tested = [i for i, v in enumerate(found) if v.p is not None]
    for i, adjusted in zip(tested, holm([found[i].p for i in tested]), strict=True):
        v = found[i]
        note = f"Holm-adjusted over the report's {len(tested)} tests: p = {p_text(adjusted)}"
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


# Each study's network as the study ran it: (net, activation, blocks).
STUDY_NETS = (("seed_cnn", "relu", 4), ("dilated_cnn", "gelu", 4))


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
    datasets = [d for d in sorted_values({d for d, _ in bn}) if len({b for e, b in bn if e == d}) >= 2]
    if not datasets:
        if left_out:
            return _inconclusive(claim, _not_learned(all_bn, all_gn))
        return Verdict(claim, "not enough data", "needs bn and gn at 2 or more common batch sizes")
    parts, ps, holds, used = [], [], [], []
    for ds in datasets:
        log2 = lambda stats, ds=ds: {math.log2(b): stats[(d, b)].values for d, b in stats if d == ds}
        fit = interaction(log2(bn), log2(gn))
        if fit is None:
            return Verdict(claim, "not enough data", f"{ds}: too few bn and gn runs for the interaction's fit")
        ps.append(fit.p)
        holds.append(fit.estimate > 0)
        used += _cells(runs, "bn", ds, bn) + _cells(runs, "gn", ds, gn)
        parts.append(f"{ds}: BN − GN per doubling of the batch size {fit.text('points')} (BN − GN: {_gaps(bn, gn, ds)})")
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
    diffs = {k: Comparison(brn[k], bn[k]) for k in bn if k in brn}
    datasets = sorted_values({d for d, _ in diffs})
    if len(datasets) < 2 or len({b for _, b in diffs}) < 2:
        return Verdict(claim, "not enough data", "needs bn and brn on two datasets at two or more batch sizes")
    missed = _not_learned({k: bn[k] for k in diffs}, {k: brn[k] for k in diffs})
    if missed:
        return _inconclusive(claim, missed)
    hard = min(datasets, key=lambda d: statistics.fmean(bn[(d, b)].mean for (e, b) in diffs if e == d))
    smallest = min(b for d, b in diffs if d == hard)
    key = diffs[(hard, smallest)]
    if key.p is None:
        return Verdict(claim, "not enough data", f"{hard} bs {smallest}: {key.text()}")
    # "Only": nowhere else does BRN gain more than BEATS at p < ALPHA (unadjusted: the stricter side).
    elsewhere = [k for k, c in diffs.items() if k != (hard, smallest) and c.difference > BEATS and c.significant(ALPHA)]
    listing = "; ".join(f"{d} bs {b}: {diffs[(d, b)].difference:+.2f}" for d, b in sorted(diffs))
    also = f"; BRN also beats BN at {', '.join(f'{d} bs {b}' for d, b in elsewhere)}" if elsewhere else ""
    evidence = (f"hard task = {hard} (lowest BN accuracy); BRN − BN: {listing} (beats: > {BEATS:g} point and "
                f"p < {ALPHA:g}; {hard} bs {smallest}: {key.text()}){also}")  # fmt: skip
    cells = [r for r in main if (r.dataset, r.batch_size) in diffs and r.norm in ("bn", "brn")]
    return tested(claim, evidence + budget_note(cells), key.p, key.difference > BEATS and not elsewhere)


def _first_reaching(xs: list[int], curve: list[float], target: float) -> int | None:
    """The first x at which the curve reaches ``target``, None if it never does."""
    return next((x for x, a in zip(xs, curve) if a >= target), None)


def bnrs_slower(runs: list[Run]) -> Verdict:
    claim = "BNRS converges slower than BN"
    main = [r for r in _main_runs(runs) if r.ok and r.points()[1]]
    parts, slower = [], []
    for ds, net, bs in sorted_values({(r.dataset, r.net, r.batch_size) for r in main if r.norm == "bnrs"}):
        cell = [r for r in main if (r.dataset, r.net, r.batch_size) == (ds, net, bs)]
        group = {n: [r.points() for r in cell if r.norm == n] for n in ("bn", "bnrs")}
        if not group["bn"] or not group["bnrs"]:
            continue
        unit, xs, _ = min((p for ps in group.values() for p in ps), key=lambda p: len(p[1]))
        length = len(xs)
        mean_curve = {n: [statistics.fmean(p[2][i] for p in ps) for i in range(length)] for n, ps in group.items()}
        target = 0.95 * max(mean_curve["bn"])
        e_bn, e_rs = _first_reaching(xs, mean_curve["bn"], target), _first_reaching(xs, mean_curve["bnrs"], target)
        is_slower = e_rs is None or e_rs > e_bn or (e_rs == e_bn and mean_curve["bnrs"][0] < mean_curve["bn"][0])
        slower.append(is_slower)
        first = Comparison(Stat([p[2][0] for p in group["bnrs"]]), Stat([p[2][0] for p in group["bn"]]))
        parts.append(f"{ds} bs {bs}: {unit} {xs[0]} {mean_curve['bn'][0]:.2f} (bn) vs {mean_curve['bnrs'][0]:.2f} "
                     f"(bnrs; bnrs − bn {first.text()}); 95% of BN's best at {unit} {e_bn} vs "
                     f"{e_rs if e_rs else f'never in {xs[-1]}'}")  # fmt: skip
    if not slower:
        return Verdict(claim, "not enough data", "needs bn and bnrs curves at common batch sizes")
    verdict = "supported" if sum(slower) > len(slower) / 2 else "not supported"
    return Verdict(claim, verdict, f"slower in {sum(slower)} of {len(slower)}: " + "; ".join(parts))


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
