"""``normbench report``: tables, plots and the studies' verdicts from run records.

It reads ``metrics.json`` run records only and never retrains. Every figure is a mean +- the
sample standard deviation over seeds, with n; failed and diverged runs are counted as such and
never enter a mean as 0%.

Exit status: 0 when a report was written, also when some record files could not be read (a
truncated ``metrics.json``): the report is made from the others and names those files, in
report.md and one line each on stderr; 2 when there is no readable run record under the paths.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ArgumentParser

from normbench.report.claims import Verdict
from normbench.report.figures import STUDY2_NOTE, plots, study1_sections, study2_figure
from normbench.report.records import CONTEXT, Run, Unreadable, read_runs
from normbench.report.study3 import SECTION_INTRO as STUDY3_INTRO
from normbench.report.study3 import study3_sections
from normbench.report.tables import (
    LEARNED,
    aggregate,
    batch_size_tables,
    budgets,
    depth_tables,
    markdown_table,
    precision_tables,
)
from normbench.report.verdicts import judge
from normbench.report.why import gradient_sections, why_sections
from normbench.results import RECORD

WHY_INTRO = (
    "Per norm and batch size, mean ± std over seeds (n): test accuracy at the last evaluation with the "
    "norms' running statistics, with their batch statistics (train mode, each evaluation batch normalized "
    "by itself, nothing updated) and after PreciseBN recomputed the running statistics from training "
    "images; and, over the last epoch's training steps, how far the last norm layer's batch mean lay from "
    "its running mean in running standard deviations (mean gap) and its batch over running standard "
    "deviation (std ratio). gn has no running statistics: its accuracy is what it is. Each p-value here is its "
    "own comparison's, not corrected for the section's many: they describe; the verdicts above decide."
)
PRECISION_INTRO = (
    "The same runs (the same seeds) in another `trainer.precision` than fp32 (`32-true`): best accuracy, mean ± "
    "std over seeds (n), and the difference of the means with Welch's t-test over seeds (unpaired: "
    "conservative where a seed's two runs are alike). In every other table "
    "and verdict a run in another precision is a condition of its own (`bn bf16-mixed`), never averaged with fp32."
)
VERDICT_INTRO = (
    "Each claim is tested as it is stated (normbench.report.verdicts): a claim about BN against GN across batch "
    "sizes by the norm x log2(batch size) interaction (the slope of the cells' BN − GN gaps, a Welch contrast: "
    'each cell with its own variance); "stays stable" and "within 3 points" '
    "by equivalence tests (TOST) against a 3-point margin, never by a difference that is not significant. The "
    "report's p-values are corrected together for multiplicity (Holm); a claim is supported when its estimate "
    "points its way and its adjusted p < 0.05. Where the optimizer steps of the cells compared differ by more "
    "than 2x, the numbers say so: there the budget moved with the batch size."
)
GRADIENT_INTRO = (
    "The mean absolute gradient of each block's conv weight over the last epoch's training steps "
    "(NormDiagnostics, every every_n_steps steps), mean ± std over seeds (n), against the network's depth."
)


def _figures(values: list) -> str:
    known = sorted({v for v in values if v is not None})
    if not known:
        return "not recorded"
    return f"{known[0]:g}" if len(known) == 1 else f"{known[0]:g} to {known[-1]:g}"


def budget_lines(runs: list[Run]) -> list[str]:
    """What budget the runs held (``normbench.budget``), with the steps and learning rates
    their records say they took."""
    protocols = sorted({r.protocol for r in runs})
    if len(protocols) > 1:
        raise ValueError(
            f"the records hold runs of several budgets ({', '.join(protocols)}); a report compares runs of one "
            "budget: report each sweep on its own"
        )
    done = [r for r in runs if r.ok]
    steps, lrs = _figures([r.steps for r in done]), _figures([r.lr for r in done])
    budget = runs[0].budget if runs else {}
    held = {
        "study": "the study's protocol, the config's epochs and learning rate at every batch size",
        "steps": f"the same optimizer steps at every batch size ({budget.get('steps')} steps, "
                 f"{budget.get('evaluations')} evaluations evenly spaced)",
        "scaled_lr": f"the config's epochs with the learning rate scaled by the {budget.get('rule')} rule from batch "
                     f"size {budget.get('reference_batch_size')} (lr {budget.get('reference_lr')} there)",
    }.get(protocols[0] if protocols else "study", protocols[0] if protocols else "study")  # fmt: skip
    return [
        (
            f"Budget held (`budget.protocol: {protocols[0] if protocols else 'study'}`): {held}; the finished runs "
            f"took {steps} optimizer steps at learning rate {lrs}. The tables give each cell's steps and lr."
        )
    ]


def _sweep_lines(paths: list[str]) -> list[str]:
    """The sweeps behind the records: their commands and fixed settings, from sweep.json."""
    lines = []
    for p in map(Path, paths):
        for meta in sorted(p.rglob("sweep*.json")) if p.is_dir() else []:
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError) as err:  # a torn sweep.json loses its line, not the report
                lines.append(f"- `{meta}` cannot be read ({err})")
                continue
            lines.append(f"- sweep `{info.get('name')}`: `{info.get('command', '')}`; "
                         f"base `{Path(info.get('base', '')).name}`"
                         f", for every run: `{json.dumps(info.get('overrides', {}))}`")  # fmt: skip
    return lines


def write_report(runs: list[Run], out: Path, inputs: list[str], command: str, reference: str | None = None,
                 unreadable: Sequence[Unreadable] = (), verdicts: list[Verdict] | None = None) -> Path:  # fmt: skip
    """Write report.md, best_accuracy.csv and the plots into ``out``; return report.md's path.
    The figures of an earlier report in ``out`` that this one does not draw are removed.

    Args:
        runs: the run records.
        out: the output folder.
        inputs: the sweep or run directories the records came from.
        command: the command that made the report, as it is stated in it.
        reference: a folder of study 1's published figures to put beside ours.
        unreadable: the record files under ``inputs`` that could not be read, listed in the report.
        verdicts: ``judge(runs)``, where the caller has it already.
    """
    out.mkdir(parents=True, exist_ok=True)
    drawn_before = _figures_of(out / "report.md")
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
            + (
                f" {len(unreadable)} record file{'s' * (len(unreadable) != 1)} could not be read and "
                f"{'are' if len(unreadable) != 1 else 'is'} left out (listed below)."
                if unreadable
                else ""
            )
        ),
        (
            f"Accuracy is the best {what} accuracy over the evaluations of a run (every epoch, or every "
            "val_check_interval iterations), in percent: mean ± sample "
            "standard deviation over seeds (n runs). Failed and diverged runs are counted, never averaged as 0%. "
            f"A condition whose runs averaged below {LEARNED:g}x chance is marked *not learned* and feeds no verdict "
            "that compares norms or batch sizes."
        ),
        (
            f"Runs made on: {', '.join(sorted({r.hardware for r in runs if r.hardware})) or 'not recorded'}; "
            f"total training wall time {sum(r.wall_time_s or 0 for r in runs) / 60:.1f} min."
        ),
        "",
        *budget_lines(runs),
        *_sweep_lines(inputs),
    ]
    with open(out / "best_accuracy.csv", "w", newline="") as f:
        writer = csv.writer(f)
        keys = (*CONTEXT, "batch_size", "norm")
        writer.writerow([*keys, "norm_batch", "n", "mean", "std", "failed", "diverged", "unfinished", "learned",
                         "steps", "lr"])  # fmt: skip
        budget = budgets(runs, keys)
        norm_batches = {tuple(getattr(r, k) for k in keys): r.norm_batch for r in runs}
        for key, s in sorted(aggregate(runs, keys).items(), key=lambda kv: str(kv[0])):
            learned = "" if s.learned is None else str(s.learned).lower()
            nb = "" if norm_batches.get(key) is None else norm_batches[key]
            writer.writerow([*key, nb, s.n, _fmt(s.mean), _fmt(s.std), s.failed, s.diverged, s.unfinished, learned,
                             *budget[key]])  # fmt: skip
    tables = batch_size_tables(runs)
    lines += ["", "## Best accuracy by batch size and norm"] if tables else []
    for ctx, header, rows in tables:
        lines += ["", f"**{ctx[0]}**, {ctx[1]}, {ctx[2]}, {ctx[3]} blocks", "", markdown_table(header, rows)]
    for ctx, header, rows in depth_tables(runs):
        lines += ["", "## Depth and activation", "", f"**{ctx[0]}**, {ctx[1]}, {ctx[2]}, batch size {ctx[3]}", ""]
        lines.append(markdown_table(header, rows))
    lines += ["", "## The studies' claims, checked against these runs", ""]
    lines += [VERDICT_INTRO, ""]
    lines += [markdown_table(["claim", "verdict", "numbers"], [[v.claim, f"**{v.verdict}**", v.evidence]
                                                                for v in verdicts or judge(runs)])]  # fmt: skip
    precision = precision_tables(runs)
    if precision:
        lines += ["", "## Precision: the same runs against fp32", "", PRECISION_INTRO]
        for ctx, header, rows in precision:
            lines += ["", f"**{ctx[0]}**, {ctx[1]}, {ctx[2]}, {ctx[3]} blocks", "", markdown_table(header, rows)]
    study3 = study3_sections(runs, out)
    if study3:
        lines += ["", "## Study 3: the normalization batch at a fixed SGD batch", "", STUDY3_INTRO, *study3]
    why = why_sections(runs)
    if why:
        lines += ["", "## Why: what the end-of-run diagnostics say", "", WHY_INTRO, *why]
    gradients = gradient_sections(runs)
    if gradients:
        lines += ["", "## Gradient magnitude per block against depth", "", GRADIENT_INTRO, *gradients]
    beside = study2_figure(runs, out)
    if beside:
        lines += ["", "## Ours beside the study's table", "", STUDY2_NOTE, "", f"![{beside}]({beside})"]
    study1 = study1_sections(runs, out, reference)
    if study1:
        lines += ["", "## Training loss and test accuracy per iteration (study 1's figures)"]
        if reference:
            note = (
                "The study's numbers are read off its published figures' pixels (`normbench.report.reference`: to 0.1 "
                "point, "
                "0.8 next to a segment that leaves the panel; ≈: under a line drawn later, within its width)."
            )
            lines += ["", note]
        lines += study1
    broken = [r for r in runs if not r.ok]
    if broken:
        lines += ["", "## Runs that did not finish", ""]
        lines += [f"- `{Path(r.path).parent.name}`: {r.status}" for r in broken]
    if unreadable:
        lines += ["", "## Record files that could not be read", ""]
        lines += [f"- `{u.path}`: {u.reason}" for u in unreadable]
    written = plots(runs, out)
    if written:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in written]
    report_path = out / "report.md"
    report_path.write_text("\n".join(lines) + "\n")
    # A figure of the report this one replaces that it does not draw (a batch size no longer in
    # the runs) would lie beside it as if it were this report's: it goes. Nothing else in ``out``.
    for name in drawn_before - _figures_of(report_path):
        (out / name).unlink(missing_ok=True)
    return report_path


def _figures_of(report: Path) -> set[str]:
    """The figures a report.md shows from its own folder (``![name](name)``)."""
    text = report.read_text() if report.is_file() else ""
    return set(re.findall(r"!\[[^\]]*\]\(([^)/\\]+\.png)\)", text))


def _fmt(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.4f}"


def report(args: list[str] | None = None) -> Path:
    """``normbench report <sweep or run dirs> [--out DIR]``: the report of the readable records,
    naming the unreadable ones (exit status 0).

    Args:
        args: command-line arguments after ``report``.

    Raises:
        FileNotFoundError: no run record under the paths (a user error: exit status 2).
        ValueError: run records there, none of them readable (exit status 2).
    """
    parser = ArgumentParser(
        prog="normbench report", description=__doc__.split("\n\n")[0].replace("``", ""), exit_on_error=False
    )
    parser.add_argument("paths", type=str, nargs="+", help="sweep directories, run directories or records")
    parser.add_argument("--out", type=str | None, default=None, help="output folder (default: <first path>/report)")
    parser.add_argument("--reference", type=str | None, default=None,
                        help="folder of study 1's published figures (bs-B-dataset-D.png) "
                        "to show beside ours")  # fmt: skip
    cfg = parser.parse_args(args)
    runs, unreadable = read_runs(cfg.paths)
    for u in unreadable:
        print(f"report: {u.path} cannot be read, left out: {u.reason}", file=sys.stderr)
    where = " ".join(cfg.paths)
    if not runs and unreadable:
        raise ValueError(f"no readable run record under {where}: its {len(unreadable)} {RECORD} files cannot be "
                         "read (listed above); rerun their runs or pass other directories")  # fmt: skip
    if not runs:
        raise FileNotFoundError(f"no run records ({RECORD}) under {where}; pass a sweep directory, a run directory "
                                f"or a {RECORD}")  # fmt: skip
    out = Path(cfg.out) if cfg.out else Path(cfg.paths[0]) / "report"
    command = "normbench report " + " ".join(sys.argv[2:] if args is None else args)
    if cfg.reference and not Path(cfg.reference).is_dir():
        raise FileNotFoundError(f"--reference {cfg.reference} is not a folder; pass the folder of the study's PNGs")
    with warnings.catch_warnings():
        # scipy's t-tests of runs that agree to within rounding (every run at chance, say) warn of
        # "precision loss" in their moments: the test's p is still what it says, and the report
        # gives each test's values beside it.
        warnings.filterwarnings(
            "ignore", message="Precision loss occurred in moment calculation", category=RuntimeWarning
        )
        verdicts = judge(runs)
        path = write_report(runs, out, cfg.paths, command, cfg.reference, unreadable, verdicts)
    # The verdicts where the command was typed; those with data first, the evidence in the report.
    print(f"wrote {path}; the studies' claims against these {len(runs)} runs:")
    width = max(len(v.verdict) for v in verdicts)
    for v in sorted(verdicts, key=lambda v: v.verdict == "not enough data"):
        print(f"  {v.verdict:{width}s}  {v.claim}")
    return path
