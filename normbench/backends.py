"""Where a sweep's runs execute: here one after another, in worker processes that each own a
slot of the machine (``run_local``), or as trials of Ray Tune (``run_ray``). Each run (or pack)
is ``normbench.runner.run_group`` wherever it executes."""

from __future__ import annotations

import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

from normbench.grid import Cell, packs
from normbench.results import DONE, end_attempt, record_failure
from normbench.run_output import ended
from normbench.runner import run_cell, run_group
from normbench.workers import Slot, auto_workers, cpu_slots, enter_slot, gpu_slots, layout, worker_threads


def _ray_trainable(config: dict) -> None:
    from ray import tune

    tune.report({"status": run_cell(config["cell"])})


def run_ray(cells: list[Cell], sweep_dir: Path, cpus_per_run: float, gpus_per_run: float, address: str | None) -> None:
    """Run the cells as trials of Ray Tune (``pip install normbench[ray]``), on a local Ray
    instance or the cluster at ``address``."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise SystemExit("the ray backend needs Ray Tune: pip install 'normbench[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    trainable = tune.with_resources(_ray_trainable, {"cpu": cpus_per_run, "gpu": gpus_per_run})
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([asdict(c) for c in cells])},
        run_config=tune.RunConfig(name="ray", storage_path=str(sweep_dir), verbose=0),
    )
    tuner.fit()


def _start_worker(slot: Slot) -> None:
    """A worker process's first act: take its slot, then import what every run needs, once for
    all the runs it will train (torch, Lightning and normbench's CLI: about 4 s on 2 cores)."""
    enter_slot(slot)
    import normbench.cli  # noqa: F401 - the import is the point


def _run_group_in_slot(cells: list[dict], slot: Slot) -> list[str]:
    """``run_group`` in a worker process that owns ``slot``."""
    enter_slot(slot)
    return run_group(cells)


def _worker_died(group: list[dict], err: BaseException) -> None:
    """A worker process ended in the middle of ``group`` (killed, out of memory): its runs are
    recorded as failed, with why, and the sweep goes on; the next sweep of the same grid runs
    them again."""
    for c in group:
        cell = Cell(**c)
        if cell.status() not in DONE:
            record_failure(cell.run_dir, err, time.time(), f"the worker process running it ended: {err!r}")
            end_attempt(cell.run_dir)


def run_local(
    cells: list[Cell],
    workers: int | Literal["auto"],
    gpus: int,
    pack: bool = False,
    threads_per_run: int | None = None,
    runs_per_worker: int | None = None,
) -> None:
    """Run the cells here: in this process one after another, or ``workers`` processes at once
    (``auto``: as many as ``auto_workers`` gives for the one-device runs; the layout is printed),
    each the owner of one slot of the machine and given the next run (or pack) when its last one
    ends; with ``pack``, the runs that differ only in their seed train together as one pack.

    With GPUs each worker owns one (``CUDA_VISIBLE_DEVICES`` in its process; several workers
    share one when workers > gpus). On CPU ``workers`` processes share the machine instead of
    each starting one thread per core: each gets ``threads_per_run`` threads (default cores //
    workers, at least 1) and is pinned to cores of its own (``cpu_slots``). One process alone
    keeps torch's defaults unless ``threads_per_run`` is given; on GPUs only a given
    ``threads_per_run`` applies, unpinned.

    Each worker is one process for the whole sweep, so torch and Lightning are imported once per
    worker, not once per run; ``runs_per_worker`` replaces a worker by a fresh process after that
    many runs (1: a fresh process per run). A worker that dies takes only its current runs with it:
    they are recorded as failed and the next sweep runs them again.

    A run whose Trainer asks for several devices runs as its own process group on every device
    the sweep sees (``run_cell``): one after another, in grid order, after the one-device runs
    when there are several workers.
    """
    from tqdm import tqdm

    if not cells:
        return  # every run done: no layout, no bar
    groups = packs(cells, pack)
    if workers == "auto":
        workers = auto_workers(sum(g[0].world_size <= 1 for g in groups), gpus, threads_per_run)
    print(f"sweep: {layout(workers, gpus, threads_per_run)}", file=sys.stderr)
    bar = tqdm(total=len(cells), unit="run", desc="sweep", dynamic_ncols=True)

    def said(group: list[Cell]) -> None:
        for cell in group:
            bar.write(f"sweep: [{bar.n + 1}/{len(cells)}] {ended(cell)}", file=sys.stderr)
            bar.update(1)

    def run_here(group: list[Cell]) -> None:
        bar.set_postfix_str(group[0].name if len(group) == 1 else f"{group[0].name} +{len(group) - 1} packed")
        run_group(group)
        said(group)

    if workers <= 1:
        import torch

        before = torch.get_num_threads()
        if threads_per_run is not None:
            torch.set_num_threads(threads_per_run)  # inter-op threads are fixed in this process by now
        try:
            for group in groups:
                run_here(group)
        finally:
            torch.set_num_threads(before)
            bar.close()
        return
    # Packs hold runs of one process each: a pack never asks for several devices (check_packable).
    several = [g for g in groups if g[0].world_size > 1]
    groups = [g for g in groups if g[0].world_size <= 1]
    if gpus:
        slots = gpu_slots(workers, gpus)
        for slot in slots:
            slot.threads = threads_per_run
    else:
        threads = worker_threads(workers, gpus, threads_per_run)
        slots = [Slot(threads=threads, cores=cores) for cores in cpu_slots(workers, threads)]

    # One worker process per slot, started once: it imports torch and Lightning once and trains
    # run after run (``runs_per_worker`` of them, then a fresh process, if given). At most one
    # run (or pack) per worker at a time, each handed to a free worker.
    def worker(slot: Slot) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(slot,),
                                   max_tasks_per_child=runs_per_worker)  # fmt: skip

    todo = iter(groups)
    running: dict = {}
    pools = [worker(slot) for slot in slots]
    try:

        def submit(index: int) -> None:
            group = next(todo, None)
            if group is not None:
                group = [asdict(c) for c in group]
                running[pools[index].submit(_run_group_in_slot, group, slots[index])] = (index, group)

        for index in range(workers):
            submit(index)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index, group = running.pop(future)
                try:
                    future.result()
                except BrokenProcessPool as err:
                    _worker_died(group, err)
                    pools[index].shutdown(wait=False)
                    pools[index] = worker(slots[index])
                said([Cell(**c) for c in group])
                submit(index)
    except BaseException:
        bar.close()  # the bar's line ends before what the sweep says of the interruption
        raise
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
    try:
        for group in several:
            run_here(group)
    finally:
        bar.close()
