"""The studies' claims, each checked against the runs with the figures behind its verdict."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from normbench.report.records import Run
from normbench.report.tables import aggregate, sorted_values

# Points of accuracy within which two norms "perform alike": the studies' "within 3 points".
CLOSE = 3.0
# How much BRN must gain over BN, in points, to count as beating it.
BEATS = 1.0


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
    for ds in sorted_values({d for d, _ in gn}):
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
    for ds in sorted_values({d for d, _ in bn}):
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
    datasets = sorted_values({d for d, _ in diffs})
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
    for ctx in sorted_values({k[:3] for k in stats}):
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
