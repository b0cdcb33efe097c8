"""``normbench bench``: normbench as users run it, against the study's own training loop.

Every figure is a whole process, start-up included, timed from its launch to its exit, as a
user waits for it. normbench runs the shipped config (``configs/cifar10_bn_bs<B>.yaml``, study
2's experiment) as it is, diagnostics, checkpointing and sanity check included, with MNIST in
place of CIFAR-10 when only MNIST is there. The study's loop is ``normbench.baseline`` (or a
copy given with ``--seed_loop``). Sections (``--sections``):

- ``runs``: one epoch on ``train_subset`` training images with evaluation on the first
  ``test_subset`` test images, at each batch size: the study's loop, normbench ``shipped`` and
  normbench ``bare`` (diagnostics, checkpointing, sanity check and progress bar off), and the
  ratios (the loop's seconds over normbench's: above 1, normbench is faster).
- ``bf16``: the shipped config with ``--trainer.precision bf16-mixed`` beside the same runs
  (with ``runs`` one table: each repeat times the loop, shipped fp32, bare and bf16-mixed in turn).
- ``overhead``: the shipped config over one full epoch and the full test split, and the time
  its diagnostics took (``diagnostics.seconds`` in its run record) as a share of the process.
- ``grid``: a 12-run study grid (bn and gn, batch sizes 2 and 16, 3 seeds) by ``normbench
  sweep`` with 1 worker of all cores' threads, with one worker per core of one thread each (each
  worker one process for the whole grid), and the same with a fresh process per run, against the
  study's loop over the same grid one run after another.
- ``compile``: the shipped config with ``--model.compile true`` against eager, from an empty
  compile cache and again from the cache that run left.
- ``pack``: K packed runs against the same K runs one after another (steps only), ``repeats``
  times.
- ``step``: one training step in steady state, normbench's module against the study's loop, on
  the bench's device, and on CUDA also with ``--model.compile reduce-overhead``
  (``normbench.bench_steps``).

Without ``--sections``, a machine with a GPU runs ``runs``, ``step`` and ``pack`` on it (the GPU
section); a CPU-only machine runs ``runs``, ``overhead`` and ``grid``.

It prints a Markdown table per section, with the machine, and returns the rows.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from normbench.bench_sections import bench_compile, bench_grid, bench_pack
from normbench.bench_steps import bench_step
from normbench.bench_tools import (
    BARE,
    BF16,
    bench_device,
    bench_record,
    machine,
    normbench_cmd,
    prepare_mnist,
    print_table,
    seed_loop_cmd,
    shipped_config,
    timed,
)
from normbench.options import plain_config

SECTIONS = ("runs", "overhead", "grid", "compile", "pack", "bf16", "step")
CPU_SECTIONS = ["runs", "overhead", "grid"]
GPU_SECTIONS = ["runs", "step", "pack"]
NEEDS_NO_MNIST = ("pack", "step")  # they train on random batches


RUN_KINDS = {"seed_loop": "study's loop", "shipped": "shipped", "bare": "bare", "bf16": "shipped bf16-mixed"}


def _spread(row: dict, kind: str) -> str:
    """``median (min–max)`` seconds of one kind of run."""
    low, high = row[f"{kind}_range_s"]
    return f"{row[f'{kind}_s']:.1f} ({low:.1f}–{high:.1f})"


def bench_runs(cfg, data_dir: Path, work: Path, script: Path | None, kinds: list[str]) -> list[dict]:
    """The study's loop and normbench's ``kinds`` of run (shipped, bare, bf16), alternating,
    ``repeats`` times each; medians, and each kind's ratio to the loop."""
    rows = []
    extras = {"shipped": [], "bare": BARE, "bf16": BF16}
    for bs in cfg.batch_sizes:
        config = shipped_config(work, "bn", bs)
        times: dict[str, list[float]] = {k: [] for k in ("seed_loop", *kinds)}
        diagnostics = []
        for i in range(cfg.repeats):
            times["seed_loop"].append(timed(seed_loop_cmd(script, data_dir, bs, cfg.train_subset, cfg.test_subset)))
            for kind in kinds:
                root = work / f"runs_bs{bs}_{kind}_{i}"
                cmd = normbench_cmd(config, data_dir, root, cfg.train_subset, cfg.test_subset, *extras[kind])
                times[kind].append(timed(cmd))
                if kind == "shipped":
                    diagnostics.append(bench_record(root).get("diagnostics", {}).get("seconds", float("nan")))
                shutil.rmtree(root, ignore_errors=True)
        # The ratios from the figures as printed, so that the table checks out by hand.
        med = {k: round(statistics.median(v), 1) for k, v in times.items()}
        row = {"batch_size": bs, "n": cfg.repeats, **{f"{k}_s": v for k, v in med.items()},
               **{f"{k}_range_s": [round(min(v), 1), round(max(v), 1)] for k, v in times.items()},
               **{f"ratio_{k}": round(med["seed_loop"] / med[k], 2) for k in kinds}}  # fmt: skip
        if diagnostics:
            row["diagnostics_s"] = round(statistics.median(diagnostics), 1)
        rows.append(row)
    header = ["batch size", *(f"{RUN_KINDS[k]} s" for k in ("seed_loop", *kinds))]
    header += ["diagnostics s"] if "shipped" in kinds else []
    header += [f"{RUN_KINDS[k]} ratio" for k in kinds]
    table = []
    for r in rows:
        cells = [str(r["batch_size"]), *(_spread(r, k) for k in ("seed_loop", *kinds))]
        cells += [f"{r['diagnostics_s']:.1f}"] if "shipped" in kinds else []
        table.append(cells + [f"{r['ratio_' + k]:.2f}x" for k in kinds])
    print_table(
        f"One epoch, {cfg.train_subset} training images, {cfg.test_subset} test images, whole process "
        f"(median of {cfg.repeats} alternating runs, min–max in brackets; ratio = the study's loop's seconds / "
        "normbench's; the study's loop is fp32)",
        header,
        table,
    )
    return rows


def bench_overhead(cfg, data_dir: Path, work: Path) -> list[dict]:
    """The shipped config over a full epoch: its diagnostics' share of the whole process."""
    rows = []
    for bs in cfg.overhead_batch_sizes:
        root = work / f"overhead_bs{bs}"
        seconds = timed(normbench_cmd(shipped_config(work, "bn", bs), data_dir, root, None, None))
        diagnostics = bench_record(root).get("diagnostics", {})
        rows.append({"batch_size": bs, "process_s": round(seconds, 1), "diagnostics_s": diagnostics.get("seconds"),
                     "share": round(diagnostics.get("seconds", float("nan")) / seconds, 4),
                     "eval_images": diagnostics.get("eval_images"),
                     "precise_bn_images": diagnostics.get("precise_bn_images")})  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
    print_table(
        "Diagnostics on a full epoch (all training images, the whole test split), shipped config, whole process",
        ["batch size", "process s", "diagnostics s", "share", "subset: eval / PreciseBN images"],
        [[str(r["batch_size"]), f"{r['process_s']:.1f}", f"{r['diagnostics_s']:.1f}", f"{100 * r['share']:.1f}%",
          f"{r['eval_images']} / {r['precise_bn_images']}"] for r in rows],
    )  # fmt: skip
    return rows


# The grid's norms: the study's loop's --norm and the sweep variant of each.


def bench(args: list[str] | None = None) -> dict[str, list[dict]]:
    """``normbench bench``: print the tables, return their rows by section.

    Args:
        args: command-line arguments after ``bench``.
    """
    p = ArgumentParser(
        prog="normbench bench", description=__doc__.split("\n\n")[0].replace("``", ""), exit_on_error=False
    )
    p.add_argument("--data_dir", type=str, default="data", help="folder with (or for) MNIST")
    p.add_argument(
        "--mnist_raw",
        type=str | None,
        default=None,
        help="a folder of MNIST's .gz files to copy into --data_dir (default: none; without MNIST files there, "
        "they are downloaded)",
    )
    p.add_argument(
        "--seed_loop",
        type=str | None,
        default=None,
        help="a copy of the study's loop to run as the baseline (default: normbench.baseline, shipped)",
    )
    p.add_argument("--sections", type=list[str] | None, default=None,
                   help=f"of {', '.join(SECTIONS)} (default: {', '.join(GPU_SECTIONS)} with a GPU, "
                   f"{', '.join(CPU_SECTIONS)} without)")  # fmt: skip
    p.add_argument("--batch_sizes", type=list[PositiveInt], default=[2, 16, 128])
    p.add_argument("--train_subset", type=PositiveInt, default=10000, help="training images per run (runs, compile)")
    p.add_argument("--test_subset", type=PositiveInt, default=2000, help="test images per evaluation (runs, compile)")
    p.add_argument("--repeats", type=PositiveInt, default=3, help="alternating runs of each; the median counts")
    p.add_argument("--overhead_batch_sizes", type=list[PositiveInt], default=[2, 16])
    p.add_argument("--grid_batch_sizes", type=list[PositiveInt], default=[2, 16])
    p.add_argument("--grid_seeds", type=PositiveInt, default=3)
    p.add_argument("--grid_train_subset", type=PositiveInt, default=2000)
    p.add_argument("--grid_test_subset", type=PositiveInt, default=400)
    p.add_argument("--pack", type=PositiveInt, default=5, help="runs per pack")
    p.add_argument("--pack_steps", type=PositiveInt, default=200, help="steps per run for the packed comparison")
    p.add_argument("--pack_batch_size", type=PositiveInt, default=2)
    p.add_argument("--step_steps", type=PositiveInt, default=50, help="steps per timed block (step)")
    p.add_argument("--output", type=str | None, default=None, help="also write the rows to this JSON file")
    cfg = plain_config(p.parse_args(args))
    if cfg.sections is None:
        cfg.sections = GPU_SECTIONS if bench_device().type == "cuda" else CPU_SECTIONS
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    script = Path(cfg.seed_loop) if cfg.seed_loop else None
    if script is not None and not script.is_file():
        raise FileNotFoundError(f"--seed_loop {script} not found; leave it out to use normbench.baseline")
    data_dir = Path(cfg.data_dir).resolve()
    real = prepare_mnist(data_dir, Path(cfg.mnist_raw) if cfg.mnist_raw else None)
    print(f"machine: {machine()}; data: {'MNIST' if real else 'no MNIST files'} in {data_dir}")
    out: dict[str, list[dict]] = {"machine": [{"machine": machine()}]}
    with tempfile.TemporaryDirectory(prefix="normbench-bench-") as tmp:
        work = Path(tmp)
        for section in cfg.sections:
            if section not in NEEDS_NO_MNIST and not real:
                print(f"\n{section}: skipped, it needs the MNIST files (--data_dir, --mnist_raw)")
                continue
            if section == "runs":
                kinds = ["shipped", "bare", *(["bf16"] if "bf16" in cfg.sections else [])]
                out[section] = bench_runs(cfg, data_dir, work, script, kinds)
            elif section == "bf16":
                if "runs" not in cfg.sections:  # else the runs section timed it beside the others
                    out[section] = bench_runs(cfg, data_dir, work, script, ["shipped", "bf16"])
            elif section == "overhead":
                out[section] = bench_overhead(cfg, data_dir, work)
            elif section == "grid":
                out[section] = bench_grid(cfg, data_dir, work, script)
            elif section == "compile":
                out[section] = bench_compile(cfg, data_dir, work)
            elif section == "step":
                out[section] = bench_step(cfg, work)
            else:
                out[section] = bench_pack(cfg, data_dir, real)
            sys.stdout.flush()
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(out, indent=1))
    return out
