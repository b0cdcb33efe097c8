"""``normbench report``: tables, plots and verdicts from run records, never retraining.

- ``records``: one ``Run`` per run record, its global batch and layout.
- ``tables``: statistics over runs (mean, std, n; failures counted apart) and the tables.
- ``inference``: the tests behind the verdicts (the interaction's Welch contrast, OLS slope, TOST, Holm).
- ``claims``: what a verdict is made of; ``verdicts``: studies 1 and 2's claims, and
  ``study3``: which batch BN depends on; each tested as it is stated.
- ``why``: what the end-of-run diagnostics say of each norm and batch size, and the gradient
  magnitude per block against depth.
- ``figures``: the plots, study 2's curve beside its table, and study 1's figures beside the
  published ones (``reference`` reads those off their pixels).
- ``command``: ``report.md``, ``best_accuracy.csv`` and the command line.
"""

from normbench.report.command import report, write_report
from normbench.report.records import BatchSize, Run, Unreadable, find_runs, load_run, read_runs
from normbench.report.verdicts import CLAIMS

__all__ = ["CLAIMS", "BatchSize", "Run", "Unreadable", "find_runs", "load_run", "read_runs", "report", "write_report"]
