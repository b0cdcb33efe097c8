"""The studies' claims, each checked against the runs with the statistics behind its verdict.

A verdict is ``supported``, ``not supported``, ``inconclusive`` (a condition it compares did not
learn: its runs' mean stayed below LEARNED x chance) or ``not enough data``. Its evidence names
n, the means, the test (Welch's t-test over seeds, ``scipy.stats``) with its p-value, and the
effect size (the difference in points and Hedges' g). Differences count when they are larger
than the claim's margin (CLOSE, BEATS) and significant at ALPHA.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from normbench.report.records import Run
from normbench.report.tables import Comparison, Stat, aggregate, sorted_values

# Points of accuracy within which two norms "perform alike": the studies' "within 3 points".
CLOSE = 3.0
# How much BRN must gain over BN, in points, to count as beating it.
BEATS = 1.0
# The level at which a difference between two conditions counts as real.
ALPHA = 0.05


@dataclass
class Verdict:
    claim: str
    verdict: str  # "supported", "not supported", "inconclusive" or "not enough data"
    evidence: str


def _stats(runs: list[Run], **fixed) -> dict[tuple, Stat]:
    """(dataset, batch size) -> the best accuracies of the runs matching ``fixed``."""
    chosen = [r for r in runs if all(getattr(r, k) == v for k, v in fixed.items())]
    return {k: s for k, s in aggregate(chosen, ("dataset", "batch_size")).items() if s.mean is not None}


def _not_learned(*groups: dict[tuple, Stat]) -> list[str]:
    """The conditions among ``groups`` whose runs did not learn, as ``dataset bs B (mean%)``."""
    found = {k: s for g in groups for k, s in g.items() if s.learned is False}
    return [f"{d} bs {b} ({s.mean:.2f}%)" for (d, b), s in sorted(found.items(), key=lambda kv: str(kv[0]))]


def _inconclusive(claim: str, names: list[str], norm: str = "") -> Verdict:
    who = f"{norm} runs" if norm else "runs"
    return Verdict(claim, "inconclusive", f"{who} at {', '.join(names)} did not learn (below 3x chance)")


# Each study's network as the study ran it: (net, activation, blocks).
STUDY_NETS = (("seed_cnn", "relu", 4), ("dilated_cnn", "gelu", 4))


def _main_runs(runs: list[Run]) -> list[Run]:
    """The runs of the studies' networks at their usual depth and activation."""
    return [r for r in runs if (r.net, r.activation, r.num_blocks) in STUDY_NETS]


def gn_stable(runs: list[Run]) -> Verdict:
    claim = "GroupNorm stays stable across batch sizes"
    gn = _stats(_main_runs(runs), norm="gn")
    if _not_learned(gn):
        return _inconclusive(claim, _not_learned(gn), "gn")
    parts, ok = [], []
    for ds in sorted_values({d for d, _ in gn}):
        accs = {b: s for (d, b), s in gn.items() if d == ds}
        if len(accs) >= 3:
            best, worst = max(accs, key=lambda b: accs[b].mean), min(accs, key=lambda b: accs[b].mean)
            spread = accs[best].mean - accs[worst].mean
            ok.append(spread <= CLOSE)
            parts.append(f"{ds}: {accs[worst].mean:.2f} to {accs[best].mean:.2f} over batch sizes "
                         f"{min(accs)}–{max(accs)}, a spread of {spread:.2f} points (bs {best} − bs {worst}: "
                         f"{Comparison(accs[best], accs[worst]).text()})")  # fmt: skip
    if not ok:
        return Verdict(claim, "not enough data", "needs gn at 3 or more batch sizes")
    return Verdict(claim, "supported" if all(ok) else "not supported", f"{'; '.join(parts)} (stable: within {CLOSE:g})")


def _bn_threshold(runs: list[Run]) -> dict[str, tuple[int | None, dict[int, Comparison]]]:
    """Per dataset: the smallest batch size from which BN stays within CLOSE points of GN,
    and BN against GN at every batch size."""
    main = _main_runs(runs)
    bn, gn = _stats(main, norm="bn"), _stats(main, norm="gn")
    out = {}
    for ds in sorted_values({d for d, _ in bn}):
        gaps = {b: Comparison(bn[(d, b)], gn[(d, b)]) for (d, b) in bn if d == ds and (d, b) in gn}
        if len(gaps) < 2:
            continue
        sizes = sorted(gaps)
        good = [b for i, b in enumerate(sizes) if all(abs(gaps[c].difference) <= CLOSE for c in sizes[i:])]
        out[ds] = (good[0] if good else None, gaps)
    return out


def _bn_gn_not_learned(runs: list[Run]) -> list[str]:
    main = _main_runs(runs)
    bn, gn = _stats(main, norm="bn"), _stats(main, norm="gn")
    common = {k for k in bn if k in gn}
    return _not_learned({k: bn[k] for k in common}, {k: gn[k] for k in common})


def bn_needs_batch(runs: list[Run]) -> Verdict:
    claim = "BN needs a large enough batch size to perform well"
    found = _bn_threshold(runs)
    if not found:
        return Verdict(claim, "not enough data", "needs bn and gn at 2 or more common batch sizes")
    if _bn_gn_not_learned(runs):
        return _inconclusive(claim, _bn_gn_not_learned(runs))
    parts, holds = [], []
    for ds, (n, gaps) in found.items():
        listing = ", ".join(f"bs {b}: {g.difference:+.2f}" for b, g in sorted(gaps.items()))
        where = f"from batch size {n}" if n is not None else "at no batch size"
        smallest = min(gaps)
        # Behind GN at the smallest batch by more than CLOSE, and significantly so.
        behind = gaps[smallest].difference < -CLOSE and gaps[smallest].significant(ALPHA)
        holds.append(n is not None and n > smallest and behind)
        parts.append(f"{ds}: BN is within {CLOSE:g} points of GN {where} (BN − GN: {listing}; at bs {smallest}: "
                     f"{gaps[smallest].text()})")  # fmt: skip
    return Verdict(claim, "supported" if all(holds) else "not supported", "; ".join(parts))


def bn_close_to_gn(runs: list[Run]) -> Verdict:
    claim = f"Where BN performs well, it is within {CLOSE:g} points of GN"
    found = {ds: v for ds, v in _bn_threshold(runs).items() if v[0] is not None}
    if not found:
        return Verdict(claim, "not enough data", "BN performs well at no batch size with a GN counterpart")
    if _bn_gn_not_learned(runs):
        return _inconclusive(claim, _bn_gn_not_learned(runs))
    parts, holds = [], []
    for ds, (n, gaps) in found.items():
        big = {b: g for b, g in gaps.items() if b >= n}
        widest = max(big, key=lambda b: abs(big[b].difference))
        holds.append(abs(big[widest].difference) <= CLOSE)
        parts.append(f"{ds}: largest |BN − GN| at batch sizes ≥ {n} is {abs(big[widest].difference):.2f} points "
                     f"(bs {widest}: {big[widest].text()})")  # fmt: skip
    return Verdict(claim, "supported" if all(holds) else "not supported", "; ".join(parts))


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
    beats = {k: c.difference > BEATS and c.significant(ALPHA) for k, c in diffs.items()}
    holds = beats[(hard, smallest)] and not any(v for k, v in beats.items() if k != (hard, smallest))
    listing = "; ".join(f"{d} bs {b}: {diffs[(d, b)].difference:+.2f}" for d, b in sorted(diffs))
    return Verdict(
        claim,
        "supported" if holds else "not supported",
        f"hard task = {hard} (lowest BN accuracy); BRN − BN: {listing} (beats: > {BEATS:g} point and p < {ALPHA:g}; "
        f"{hard} bs {smallest}: {diffs[(hard, smallest)].text()})",
    )


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


def _slope(points: dict[int, float]) -> float:
    xs, ys = list(points), list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def depth_activation(runs: list[Run]) -> Verdict:
    # Deep sigmoid networks that stop learning are what this claim is about: sigmoid cells below
    # 3x chance that are deeper than every sigmoid cell that learned feed it, and the evidence
    # says which they are. Any other cell that did not learn (a ReLU one, or a shallow sigmoid
    # one: a network that never learned has nothing for depth to take away) makes its context
    # inconclusive.
    claim = "Sigmoid networks lose accuracy as blocks are added, while ReLU networks gain"
    stats = aggregate(runs, ("dataset", "norm", "batch_size", "activation", "num_blocks"))
    parts, holds, unclear = [], [], []
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
        slopes = {a: _slope({d: s.mean for d, s in cells[a].items()}) for a in ("relu", "sigmoid")}
        holds.append(slopes["sigmoid"] < 0 < slopes["relu"])
        text = [f"{where}: accuracy per added block {slopes['relu']:+.2f} (relu), {slopes['sigmoid']:+.2f} (sigmoid)"]
        for act in ("relu", "sigmoid"):
            shallow, deep = min(cells[act]), max(cells[act])
            change = Comparison(cells[act][deep], cells[act][shallow])
            text.append(f"{act} {deep} − {shallow} blocks: {change.text()}")
        if deep_lost:
            lost = ", ".join(f"sigmoid {d} blocks ({cells['sigmoid'][d].mean:.2f}%)" for d in deep_lost)
            text.append(f"did not learn (below 3x chance, what the claim predicts of deep sigmoid networks): {lost}")
        parts.append("; ".join(text))
    if not holds:
        if unclear:
            return Verdict(claim, "inconclusive", "; ".join(unclear))
        return Verdict(claim, "not enough data", "needs relu and sigmoid at two or more depths")
    return Verdict(claim, "supported" if all(holds) else "not supported", "; ".join(parts + unclear))


CLAIMS = (gn_stable, bn_needs_batch, bn_close_to_gn, brn_small_hard, bnrs_slower, depth_activation)
