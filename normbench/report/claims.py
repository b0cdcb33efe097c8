"""What every claim's verdict is made of: the margins and level the claims are tested at, the
``Verdict``, and the note that says when the budget moved with the batch."""

from __future__ import annotations

from dataclasses import dataclass

from normbench.report.records import Run

# Points of accuracy within which two conditions "perform alike": the studies' "within 3 points".
CLOSE = 3.0
# How much BRN must gain over BN, in points, to count as beating it.
BEATS = 1.0
# The level at which a test's (Holm-adjusted) p counts.
ALPHA = 0.05
# Cells whose optimizer steps differ by more than this factor compare budgets as well as norms.
STEPS_APART = 2.0
# Each study's network as the study ran it: (net, activation, blocks).
STUDY_NETS = (("seed_cnn", "relu", 4), ("dilated_cnn", "gelu", 4))


@dataclass
class Verdict:
    """A claim's verdict; ``p``: its test's p-value (None when no test decides it), ``holds``:
    whether the estimate points the way the claim says, ``p_holm``: ``p`` adjusted by ``judge``."""

    claim: str
    verdict: str  # "supported", "not supported", "inconclusive" or "not enough data"
    evidence: str
    p: float | None = None
    holds: bool | None = None
    p_holm: float | None = None


def tested(claim: str, evidence: str, p: float, holds: bool) -> Verdict:
    """A verdict decided by its own p alone; ``judge`` decides it again after Holm."""
    return Verdict(claim, "supported" if holds and p < ALPHA else "not supported", evidence, p, holds)


def budget_note(runs: list[Run]) -> str:
    """``; optimizer steps differ 64-fold ...`` when the finished runs' steps differ by more
    than STEPS_APART-fold, else an empty string."""
    steps = [r.steps for r in runs if r.ok and r.steps]
    if not steps or max(steps) <= STEPS_APART * min(steps):
        return ""
    return (f"; optimizer steps differ {max(steps) / min(steps):.0f}-fold across these cells ({min(steps)} to "
            f"{max(steps)}): the budget moved with the batch size, not only the norm's batch")  # fmt: skip
