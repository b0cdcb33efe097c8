"""``normbench sweep``: a grid of ``normbench fit`` runs over any config keys.

A sweep config names a base experiment, overrides for every run, and axes::

    name: study2
    base: configs/cifar10_bn_bs2.yaml
    overrides: {trainer.max_epochs: 10}
    grid:
      model.norm: [bn, gn]
      data.batch_size: [2, 4, 8, 16, 32, 64, 128]
      seed_everything: [0, 1, 2, 3, 4]

An axis is a list of values for one key, or a mapping of named variants, each setting several
keys at once (``gn: {model.norm: gn, model.norm_kwargs: {num_groups: 4}}``). Each cell runs
``main(["fit", "--config", base, --key value ...])`` in its own run directory,
``<output>/<name>/lightning_logs/<cell name>/version_0``, named from its axis values
(``bn_bs2_seed0``); what it prints goes to ``<output>/<name>/logs/<cell name>.log``, and the
terminal shows a line per run as it ends. Its run record (``metrics.json``) says whether it finished, failed or
diverged; running the sweep again skips finished and diverged cells, resumes interrupted runs
from their last checkpoints and reruns failed ones. A claim file per cell keeps two sweep
processes on one directory from running the same cell.

Exit status: 0 when no run of the sweep failed or diverged; 1 when one did, after one line per
such run on stderr (``sweep: <cell> failed: <error>``, ``sweep: <cell> diverged at step N``),
unless ``--allow_failures`` (exploratory sweeps: the lines, and 0); 130 after Ctrl-C, which the
next run of the same command resumes.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from jsonargparse.typing import NonNegativeInt, PositiveInt

from normbench.backends import run_local, run_ray
from normbench.grid import Cell, expand, own_args, run_dir_args, shared_args, validate
from normbench.options import plain_config
from normbench.results import (
    DIVERGED,
    DONE,
    FAILED,
    PENDING,
    read_record,
    write_json_atomic,
)
from normbench.run_output import outcome


def _find_base(base: str, sweep_file: Path | None) -> Path:
    """The base config: as given, else relative to the sweep file's folder or one above it
    (``configs/sweeps/x.yaml`` names ``configs/y.yaml`` from the repository root)."""
    candidates = [Path(base)]
    if sweep_file is not None and not Path(base).is_absolute():
        candidates += [parent / base for parent in sweep_file.resolve().parents]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"base config {base} not found; set base: to the path of an experiment config")


def _as_plain_data(value: Any) -> Any:
    """``value`` with jsonargparse's Namespaces (mappings inside lists) turned into dicts."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _as_plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_plain_data(v) for v in value]
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="normbench sweep", description=__doc__.split("\n\n")[0].replace("``", ""), exit_on_error=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="the sweep config (YAML)")
    parser.add_argument("--name", type=str | None, default=None, help="sweep name (default: the config file's stem)")
    parser.add_argument("--base", type=str, required=True, help="base experiment config every run starts from")
    parser.add_argument(
        "--grid",
        type=dict,  # not dict[str, Any]: that would expand class_path values with their defaults
        default={},
        help="config key -> list of values, or name -> {variant: {key: value}}",
    )
    parser.add_argument("--overrides", type=dict, default={}, help="config key -> value for every run")
    parser.add_argument("--output", type=str, default="sweeps", help="where sweep directories go")
    parser.add_argument("--backend", type=Literal["local", "ray"], default="local",
                        help="local: worker processes on this machine; ray: trials of Ray Tune, here or on "
                        "--ray_address (pip install 'normbench[ray]')")  # fmt: skip
    parser.add_argument(
        "--workers",
        type=PositiveInt | Literal["auto"],
        default="auto",
        help="runs at once (local backend). auto: one worker process per GPU, or on CPU one per core (per "
        "--threads_per_run cores), at most one per run; 1 runs them one after another in this process with "
        "all cores' threads (normbench bench's grid section compares the layouts)",
    )
    parser.add_argument(
        "--threads_per_run",
        type=PositiveInt | None,
        default=None,
        help="torch threads per run, each pinned to cores of its own on CPU (local backend; default: cores // "
        "workers, or torch's default with one worker)",
    )
    parser.add_argument(
        "--runs_per_worker",
        type=PositiveInt | None,
        default=None,
        help="with --workers > 1, runs a worker process trains before a fresh one replaces it (default: no limit, "
        "each worker imports torch and Lightning once; 1: a fresh process per run)",
    )
    parser.add_argument(
        "--gpus",
        type=NonNegativeInt | None,
        default=None,
        help="GPUs the workers own, one each in turn, as CUDA_VISIBLE_DEVICES of the worker's process (default: all)",
    )
    parser.add_argument("--ray_address", type=str | None, default=None, help="Ray cluster (default: local)")
    parser.add_argument("--cpus_per_run", type=float, default=1.0, help="Ray resources per run")
    parser.add_argument("--gpus_per_run", type=float, default=0.0, help="Ray resources per run")
    parser.add_argument(
        "--cell", type=NonNegativeInt | None, default=None, help="run only this cell (e.g. a SLURM array task)"
    )
    parser.add_argument(
        "--pack",
        type=bool,
        default=False,
        help="train runs that differ only in seed_everything as one pack (normbench.pack; local "
        "backend). Opt-in; docs/speed.md says where it pays",
    )
    parser.add_argument(
        "--allow_failures",
        type=bool,
        default=False,
        help="exit 0 even when runs failed or diverged (exploratory sweeps); by default the sweep then exits 1, "
        "after one line per such run",
    )
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="list the runs and their status, run none")
    return parser


def sweep(args: list[str] | None = None) -> list[Cell]:
    """``normbench sweep``: expand the grid and run what is not done yet.

    Args:
        args: command-line arguments after ``sweep``.

    Returns:
        The cells of the grid.

    Raises:
        SystemExit: 1 when a run of the sweep failed or diverged, unless ``--allow_failures``.
    """
    cfg = plain_config(build_parser().parse_args(args))
    config_files = cfg.get("config") or []
    name = cfg.name or (Path(str(config_files[-1])).stem if config_files else "sweep")
    sweep_dir = Path(cfg.output).resolve() / name
    base = _find_base(cfg.base, Path(str(config_files[-1])) if config_files else None)
    grid, overrides = _as_plain_data(cfg.grid), _as_plain_data(cfg.overrides)
    cells = expand(grid, str(base), overrides, sweep_dir)
    if cfg.cell is not None:
        if not 0 <= cfg.cell < len(cells):
            raise ValueError(f"--cell {cfg.cell} is not in the grid; use 0 to {len(cells) - 1}")
        cells_to_run = [cells[cfg.cell]]
    else:
        cells_to_run = cells
    todo = [c for c in cells_to_run if c.status() not in DONE]
    pack = cfg.pack and cfg.backend == "local" and cfg.cell is None
    validate(cells_to_run, pack=pack, prepare=not cfg.dry_run and bool(todo))
    if cfg.dry_run:
        print_dry_run(cells, len(todo), sweep_dir)
        return cells
    # One metadata file per sweep config, so that sweeps sharing a directory each state theirs;
    # written by a sweep that runs (a dry run leaves the directory as it was: the report states it).
    stem = Path(str(config_files[-1])).stem if config_files else "cli"
    write_json_atomic(
        sweep_dir / ("sweep.json" if stem == name else f"sweep.{stem}.json"),
        {"name": name, "command": "normbench sweep " + " ".join(sys.argv[2:] if args is None else args),
         "base": str(base.resolve()), "grid": grid, "overrides": overrides,
         "cells": [asdict(c) for c in cells]},
    )  # fmt: skip
    if cfg.cell is None:
        which = f"{len(cells)} run{'s' * (len(cells) != 1)}, {len(cells) - len(todo)} already done"
    else:  # one run of the grid (a job array's task): its own state, not the grid's
        which = f"run {cfg.cell} of its {len(cells)}, {cells[cfg.cell].name}{'' if todo else ', already done'}"
    print(f"sweep {name}: {which}, in {sweep_dir} (what each run prints: logs/<run>.log there)", file=sys.stderr)
    try:
        if cfg.backend == "ray":
            run_ray(todo, sweep_dir, cfg.cpus_per_run, cfg.gpus_per_run, cfg.ray_address)
        else:
            import torch

            gpus = torch.cuda.device_count() if cfg.gpus is None else cfg.gpus
            run_local(todo, cfg.workers, gpus, pack=pack, threads_per_run=cfg.threads_per_run,
                      runs_per_worker=cfg.runs_per_worker)  # fmt: skip
    finally:
        # The HPARAMS tab's columns: the sweep's axes first, over the runs that finished so far.
        from normbench.hparams import write_sweep_experiment

        write_sweep_experiment(sweep_dir / "lightning_logs", [c.run_dir for c in cells])
    records = [read_record(c.run_dir) for c in cells_to_run]
    statuses = [r.get("status", PENDING) for r in records]
    bad = [(c, r) for c, r in zip(cells_to_run, records) if r.get("status") in (FAILED, DIVERGED)]
    for cell, record in bad:
        print(f"sweep: {outcome(cell.name, record)}", file=sys.stderr)
    print(json.dumps({s: statuses.count(s) for s in sorted(set(statuses))}), file=sys.stderr)
    if bad and not cfg.allow_failures:
        raise SystemExit(1)
    return cells


def print_dry_run(cells: list[Cell], to_run: int, sweep_dir: Path) -> None:
    """What a dry run prints: the command every run shares, once, shell-quoted; a line per run
    (index, status, name, its own arguments); the count."""
    tail = shlex.join(run_dir_args(sweep_dir, "RUN")).replace("RUN", "<run>")
    print(f"every run: normbench {shlex.join(shared_args(cells[0]))} ... {tail}")
    width = max(len(c.name) for c in cells)
    for c in cells:
        print(f"{c.index:4d}  {c.status():9s}  {c.name:{width}s}  {shlex.join(own_args(c))}")
    runs = f"{len(cells)} run{'s' * (len(cells) != 1)}"
    print(f"{runs}, {len(cells) - to_run} done, {to_run} to run, in {sweep_dir}")
