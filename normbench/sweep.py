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
(``bn_bs2_seed0``). Its run record (``metrics.json``) says whether it finished, failed or
diverged; running the sweep again skips finished and diverged cells, resumes interrupted runs
from their last checkpoints and reruns failed ones. A claim file per cell keeps two sweep
processes on one directory from running the same cell.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from normbench.data import DATAMODULES, dataset_name
from normbench.results import error_line, read_record, update_record, write_json_atomic

DONE = ("finished", "diverged")
# Short labels for common axes in run names; other keys use their last component.
LABELS = {
    "dataset": "",
    "data": "",
    "model.norm": "",
    "model.net": "",
    "model.activation": "",
    "data.batch_size": "bs",
    "seed_everything": "seed",
    "model.num_blocks": "blocks",
}


@dataclass
class Cell:
    """One run of the grid; ``world_size``: the processes its Trainer config asks for (devices
    times nodes), set when the sweep parses the cells."""

    index: int
    name: str
    values: dict[str, Any]
    args: list[str]
    run_dir: str
    world_size: int = 1

    def status(self) -> str:
        return read_record(self.run_dir).get("status", "pending")


def cli_value(value: Any) -> str:
    """A config value as one command-line token (YAML flow style for lists and dicts)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _key_args(key: str, value: Any) -> list[str]:
    if key == "dataset":
        if value not in DATAMODULES:
            raise ValueError(
                f"unknown dataset {value!r} in the sweep grid; valid datasets are: {', '.join(DATAMODULES)}"
            )
        return ["--data", f"normbench.data.{DATAMODULES[value].__name__}"]
    return [f"--{key}", cli_value(value)]


def _label(key: str, value: Any) -> str:
    prefix = LABELS.get(key, key.rsplit(".", 1)[-1])
    if key == "data":
        value = dataset_name(value)
    return prefix + re.sub(r"[^A-Za-z0-9_.+-]+", "-", cli_value(value)).strip("-")


def _axis(key: str, spec: list[Any] | dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(label, {config key: value}) for each point of one axis."""
    if isinstance(spec, dict):
        for label, keys in spec.items():
            if not isinstance(keys, dict) or not keys:
                raise ValueError(f"sweep axis {key}: variant {label!r} must map config keys to values")
        return [(str(label), dict(keys)) for label, keys in spec.items()]
    return [(_label(key, v), {key: v}) for v in spec]


def expand(grid: dict[str, Any], base: str, overrides: dict[str, Any], sweep_dir: str | Path) -> list[Cell]:
    """The cells of the grid, in a stable order (the axes' order, last axis fastest).

    Args:
        grid: config key -> the values it takes (``dataset`` takes registry names), or axis
            name -> {variant name: {config key: value}}.
        base: the base experiment config every run starts from.
        overrides: config key -> value, for every run.
        sweep_dir: the sweep's directory.
    """
    empty = [k for k, v in grid.items() if not isinstance(v, (list, dict)) or not v]
    if not grid or empty:
        where = f" at {', '.join(empty)}" if empty else ""
        raise ValueError(f"the sweep grid is empty{where}; give every axis a list of values")
    sweep_dir = Path(sweep_dir).resolve()
    fixed = [a for k, v in overrides.items() for a in _key_args(k, v)]
    cells = []
    for index, combo in enumerate(itertools.product(*(_axis(k, v) for k, v in grid.items()))):
        values = {k: v for _, keys in combo for k, v in keys.items()}
        name = "_".join(label for label, _ in combo if label)
        args = ["fit", "--config", str(Path(base).resolve()), *fixed]
        args += [a for k, v in values.items() for a in _key_args(k, v)]
        args += ["--trainer.default_root_dir", str(sweep_dir), "--name", name, "--version", "0"]
        cells.append(Cell(index, name, values, args, str(sweep_dir / "lightning_logs" / name / "version_0")))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError("two cells of the sweep get the same name; give the axes distinct values")
    return cells


def validate(cells: list[Cell], pack: bool = False) -> None:
    """Parse every cell's arguments before anything runs, so that a grid or override naming a
    key that does not exist, or a value of the wrong type, stops the sweep with one line; with
    ``pack``, also a setting that a pack would not apply (``normbench.packed_fit.check_packable``)."""
    from jsonargparse import ArgumentError

    from normbench.cli import NormBenchCLI, one_line, world_size

    parser = defaults = None
    packed = {id(c) for group in packs(cells, pack) if len(group) > 1 for c in group}
    for cell in cells:
        try:
            if parser is None:
                # The first cell is also instantiated, which checks values such as batch_size.
                parser = NormBenchCLI(args=cell.args[1:], run=False).parser
            config = parser.parse_args(cell.args[1:])
        except (ArgumentError, ValueError) as err:
            given = ", ".join(f"{k}={cli_value(v)}" for k, v in cell.values.items())
            raise ValueError(
                f"sweep run {cell.name} ({given}): {one_line(err)}; fix the sweep's grid or overrides"
            ) from None
        cell.world_size = world_size(config.trainer)
        if id(cell) in packed:
            from normbench.packed_fit import check_packable

            if defaults is None:
                defaults = parser.get_defaults()
            check_packable(config, defaults, cell.name)


@contextmanager
def claim(cell: Cell) -> Iterator[bool]:
    """Hold the cell's claim, ``<sweep>/claims/<cell>.lock``, while the body runs; yields False
    when another process holds it.

    The claim is a POSIX lock (``fcntl.lockf``, which NFS forwards to its lock manager) on a file
    that says who holds it. The kernel drops the lock when its process ends in any way, SIGKILL
    and power loss included, so a claim left by a crashed process is stale by construction: the
    file is still there, its lock is free, and the next sweep takes it over.
    """
    path = Path(cell.run_dir).parents[2] / "claims" / f"{cell.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous and cell.status() not in DONE:
            print(f"sweep: taking over the stale claim on {cell.name} ({previous})", file=sys.stderr)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        os.fsync(fd)
        yield True
    finally:
        os.close(fd)  # releases the lock; the file stays, to say who ran the cell last


def run_cell(cell: Cell | dict) -> str:
    """Run one cell and return its status; a failure is recorded, not raised.

    A cell of one process runs through ``main`` in this process. A cell whose Trainer asks for
    several devices (or nodes) runs as a process group of its own, ``python -m normbench fit
    ...`` in a subprocess that Lightning's DDP launcher then re-launches per rank: run in this
    process, the launcher would re-launch the sweep command itself as the other ranks.

    A cell another process has claimed is left to it (``claimed``). An interrupted run resumes
    from its last checkpoint in its own run directory (``--ckpt_path last``); a failed one starts
    again from scratch. Each start is appended to the record's ``attempts``, with the devices
    it could see (``CUDA_VISIBLE_DEVICES``) and when it ended.
    """
    from normbench.cli import main

    cell = Cell(**cell) if isinstance(cell, dict) else cell
    run_dir = Path(cell.run_dir)
    with claim(cell) as ours:
        if not ours:
            return "claimed"
        status = cell.status()
        if status in DONE:
            return status
        resume = status != "failed" and (run_dir / "checkpoints" / "last.ckpt").is_file()
        _start_attempt(cell, resume=resume)
        start = time.time()
        try:
            if cell.world_size > 1:
                _run_process_group(cell)
            else:
                main([*cell.args, "--ckpt_path", "last"])
        except (Exception, SystemExit) as err:  # noqa: BLE001 - one run's failure is recorded; the sweep goes on
            if cell.status() == "interrupted":
                # Ctrl-C stops the sweep, not just this run (Lightning turned it into an exit and
                # ignores SIGINT from then on); the run resumes when the sweep runs again.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt from None
            _record_failure(cell, err, start)
        finally:
            _end_attempt(cell)
        return cell.status()


class RunExitError(RuntimeError):
    """A run's own process group exited with a non-zero status."""


def _run_process_group(cell: Cell) -> None:
    """``normbench fit`` of ``cell`` in a subprocess, which Lightning launches as its own
    process group on every device this process sees; its output streams through."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "normbench", *cell.args, "--ckpt_path", "last"], env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the run's processes too: let them record the interruption and stop.
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code == -signal.SIGINT or code == 130:
        raise KeyboardInterrupt
    if code != 0 and cell.status() not in (*DONE, "failed"):
        raise RunExitError(f"the run's process group exited with status {code}; its output above says why")


def _start_attempt(cell: Cell, resume: bool, **extra: Any) -> None:
    """Append this start to the record's ``attempts`` and mark the run running; without a
    checkpoint to resume from, the run directory is cleared first (the attempts are kept)."""
    run_dir = Path(cell.run_dir)
    attempts = read_record(run_dir).get("attempts", [])
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    attempts.append(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "resumed": resume,
         "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), **extra}
    )  # fmt: skip
    update_record(
        run_dir,
        status="running",
        attempts=attempts,
        sweep={"cell": cell.name, "index": cell.index, "values": cell.values},
    )


def _end_attempt(cell: Cell) -> None:
    """Note in the record's last attempt when it ended."""
    attempts = read_record(cell.run_dir).get("attempts", [])
    if attempts:
        attempts[-1]["ended"] = time.time()
        update_record(cell.run_dir, attempts=attempts)


def _record_failure(cell: Cell, err: BaseException, start: float) -> None:
    update_record(
        cell.run_dir,
        status="failed",
        error=error_line(err),
        traceback=traceback.format_exc()[-4000:],
        wall_time_s=round(time.time() - start, 3),
    )


def packs(cells: list[Cell], enabled: bool) -> list[list[Cell]]:
    """The cells grouped into packs of runs that differ only in ``seed_everything`` (one cell
    per group when packing is off or the grid has no seed axis), in grid order."""
    if not enabled:
        return [[c] for c in cells]
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        key = tuple((k, cli_value(v)) for k, v in cell.values.items() if k != "seed_everything")
        groups.setdefault(key, []).append(cell)
    return list(groups.values())


def run_group(cells: list[Cell | dict]) -> list[str]:
    """Run one pack (``normbench.packed_fit``) or, for a single cell, ``run_cell``; failures are
    recorded per run, as in ``run_cell``. Packs have no checkpoints: an interrupted pack starts again."""
    cells = [Cell(**c) if isinstance(c, dict) else c for c in cells]
    if len(cells) == 1:
        return [run_cell(cells[0])]
    from normbench.packed_fit import fit_pack

    with ExitStack() as stack:
        todo = [c for c in cells if stack.enter_context(claim(c)) and c.status() not in DONE]
        if len(todo) == 1:
            stack.close()  # run_cell takes the claim itself
            return [*(c.status() for c in cells if c is not todo[0]), run_cell(todo[0])]
        for cell in todo:
            _start_attempt(cell, resume=False, packed=len(todo))
        start = time.time()
        try:
            if todo:
                fit_pack(todo)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - recorded for every run of the pack
            for cell in todo:
                _record_failure(cell, err, start)
        finally:
            for cell in todo:
                _end_attempt(cell)
    return [c.status() for c in cells]


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


def cpu_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, which taskset and cgroups narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def check_threads_per_run(threads_per_run: int | None, workers: int) -> None:
    """A bad ``--threads_per_run`` stops the sweep with one line, before anything runs."""
    if threads_per_run is not None and threads_per_run < 1:
        default = max(1, len(cpu_cores()) // max(1, workers))
        raise ValueError(
            f"--threads_per_run must be >= 1, got {threads_per_run}; give a positive number of threads per run, "
            f"or leave it out for cores // workers ({default} here)"
        )


def cpu_slots(workers: int, threads: int) -> list[list[int]]:
    """The cores each of ``workers`` concurrent runs is pinned to: consecutive blocks of
    ``threads`` cores, disjoint while ``workers * threads`` cores exist, wrapping around
    (shared) beyond that."""
    cores = cpu_cores()
    return [
        sorted({cores[(slot * threads + i) % len(cores)] for i in range(min(threads, len(cores)))})
        for slot in range(workers)
    ]


def limit_threads(threads: int, cores: list[int] | None = None) -> None:
    """Give this process ``threads`` intra-op and inter-op threads (and OMP_NUM_THREADS and
    MKL_NUM_THREADS for the processes it starts, such as data loader workers) and, where the OS
    allows, pin it to ``cores``.

    Torch accepts the inter-op count only before its first parallel work, so this runs first
    thing in a fresh worker process.
    """
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_interop_threads(threads)
    torch.set_num_threads(threads)


@dataclass
class Slot:
    """One worker's share of the machine: its GPU (``CUDA_VISIBLE_DEVICES``), or its threads
    and cores on CPU."""

    gpu: str | None = None
    threads: int | None = None
    cores: list[int] | None = None


def gpu_slots(workers: int, gpus: int) -> list[Slot]:
    """One GPU per worker, in turn (worker w on the w-th visible GPU modulo their count): of
    ``CUDA_VISIBLE_DEVICES`` when it is set, else of 0 .. gpus - 1."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible[:gpus] if len(visible) >= gpus else [str(i) for i in range(gpus)]
    return [Slot(gpu=ids[w % len(ids)]) for w in range(workers)]


def _run_group_in_slot(cells: list[dict], slot: Slot) -> list[str]:
    """``run_group`` in a fresh worker process, on its share of the machine. The GPU is set
    before anything touches CUDA in this process, so device 0 of every run here is that GPU
    and Lightning's default of one device takes it."""
    if slot.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu
    if slot.threads is not None:
        limit_threads(slot.threads, slot.cores)
    return run_group(cells)


def run_local(
    cells: list[Cell], workers: int, gpus: int, pack: bool = False, threads_per_run: int | None = None
) -> None:
    """Run the cells here: in this process one after another, or ``workers`` processes at once,
    each the owner of one slot of the machine and given the next run (or pack) when its last one
    ends; with ``pack``, the runs that differ only in their seed train together as one pack.

    With GPUs each worker owns one (``CUDA_VISIBLE_DEVICES`` in its process; several workers
    share one when workers > gpus). On CPU ``workers`` processes share the machine instead of
    each starting one thread per core: each gets ``threads_per_run`` threads (default cores //
    workers, at least 1) and is pinned to cores of its own (``cpu_slots``). One process alone
    keeps torch's defaults unless ``threads_per_run`` is given; on GPUs only a given
    ``threads_per_run`` applies, unpinned.

    A run whose Trainer asks for several devices runs as its own process group on every device
    the sweep sees (``run_cell``): one after another, in grid order, after the one-device runs
    when there are several workers.
    """
    from tqdm import tqdm

    groups = packs(cells, pack)
    bar = tqdm(total=len(cells), unit="run", desc="sweep", dynamic_ncols=True)

    def run_here(group: list[Cell]) -> None:
        bar.set_postfix_str(group[0].name if len(group) == 1 else f"{group[0].name} +{len(group) - 1} packed")
        run_group(group)
        bar.update(len(group))

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
        threads = threads_per_run or max(1, len(cpu_cores()) // workers)
        slots = [Slot(threads=threads, cores=cores) for cores in cpu_slots(workers, threads)]
    # A fresh process per run: nothing leaks from one run into the next. At most `workers` runs
    # are submitted at once, each to a free slot, taken back when it ends.
    todo = iter(groups)
    running: dict = {}
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:

            def submit(index: int) -> None:
                group = next(todo, None)
                if group is not None:
                    future = pool.submit(_run_group_in_slot, [asdict(c) for c in group], slots[index])
                    running[future] = (index, len(group))

            for index in range(workers):
                submit(index)
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index, n = running.pop(future)
                    future.result()
                    bar.update(n)
                    submit(index)
        for group in several:
            run_here(group)
    finally:
        bar.close()


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


def _plain(value: Any) -> Any:
    """``value`` with jsonargparse's Namespaces (mappings inside lists) turned into dicts."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="normbench sweep", description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--backend", type=Literal["local", "ray"], default="local")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs at once (local backend). 1 runs them one after another in this process with all cores' "
        "threads, measured faster on CPU than one single-thread process per core (normbench bench, grid)",
    )
    parser.add_argument(
        "--threads_per_run",
        type=int | None,
        default=None,
        help="torch threads per run, each pinned to cores of its own on CPU (local backend; default: cores // "
        "workers, or torch's default with one worker)",
    )
    parser.add_argument(
        "--gpus",
        type=int | None,
        default=None,
        help="GPUs the workers own, one each in turn, as CUDA_VISIBLE_DEVICES of the worker's process (default: all)",
    )
    parser.add_argument("--ray_address", type=str | None, default=None, help="Ray cluster (default: local)")
    parser.add_argument("--cpus_per_run", type=float, default=1.0, help="Ray resources per run")
    parser.add_argument("--gpus_per_run", type=float, default=0.0, help="Ray resources per run")
    parser.add_argument("--cell", type=int | None, default=None, help="run only this cell (e.g. a SLURM array task)")
    parser.add_argument(
        "--pack",
        type=bool,
        default=False,
        help="train runs that differ only in seed_everything as one pack (normbench.packed_fit; local "
        "backend). Opt-in: it gains nothing on CPU and has not been measured on a GPU yet",
    )
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="list the runs and their status, run none")
    return parser


def sweep(args: list[str] | None = None) -> list[Cell]:
    """``normbench sweep``: expand the grid and run what is not done yet.

    Args:
        args: command-line arguments after ``sweep``.

    Returns:
        The cells of the grid.
    """
    cfg = build_parser().parse_args(args)
    if cfg.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {cfg.workers}; use 1 to run one after another")
    check_threads_per_run(cfg.threads_per_run, cfg.workers)
    config_files = cfg.get("config") or []
    name = cfg.name or (Path(str(config_files[-1])).stem if config_files else "sweep")
    sweep_dir = Path(cfg.output).resolve() / name
    base = _find_base(cfg.base, Path(str(config_files[-1])) if config_files else None)
    grid, overrides = _plain(cfg.grid), _plain(cfg.overrides)
    cells = expand(grid, str(base), overrides, sweep_dir)
    # One metadata file per sweep config, so that sweeps sharing a directory each state theirs.
    stem = Path(str(config_files[-1])).stem if config_files else "cli"
    write_json_atomic(
        sweep_dir / ("sweep.json" if stem == name else f"sweep.{stem}.json"),
        {"name": name, "command": "normbench sweep " + " ".join(sys.argv[2:] if args is None else args),
         "base": str(base.resolve()), "grid": grid, "overrides": overrides,
         "cells": [asdict(c) for c in cells]},
    )  # fmt: skip
    if cfg.cell is not None:
        if not 0 <= cfg.cell < len(cells):
            raise ValueError(f"--cell {cfg.cell} is not in the grid; use 0 to {len(cells) - 1}")
        cells_to_run = [cells[cfg.cell]]
    else:
        cells_to_run = cells
    todo = [c for c in cells_to_run if c.status() not in DONE]
    pack = cfg.pack and cfg.backend == "local" and cfg.cell is None
    validate(cells_to_run, pack=pack)
    if cfg.dry_run:
        for c in cells:
            print(f"{c.index:4d}  {c.status():9s}  {c.name}  {' '.join(c.args[3:-6])}")
        print(f"{len(cells)} runs, {len(cells) - len(todo)} done, {len(todo)} to run, in {sweep_dir}")
        return cells
    print(
        f"sweep {name}: {len(cells)} runs, {len(cells_to_run) - len(todo)} already done, in {sweep_dir}",
        file=sys.stderr,
    )
    if cfg.backend == "ray":
        run_ray(todo, sweep_dir, cfg.cpus_per_run, cfg.gpus_per_run, cfg.ray_address)
    else:
        import torch

        gpus = torch.cuda.device_count() if cfg.gpus is None else cfg.gpus
        run_local(todo, cfg.workers, gpus, pack=pack, threads_per_run=cfg.threads_per_run)
    statuses = [c.status() for c in cells_to_run]
    print(json.dumps({s: statuses.count(s) for s in sorted(set(statuses))}), file=sys.stderr)
    return cells
