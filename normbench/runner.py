"""Running one cell of a sweep, or one pack: the cell's claim, its run through the CLI in this
process or as its own process group, and its record and log when it ends. Where cells run
(here, worker processes, Ray) is ``normbench.backends``."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from normbench.cli import run_cli
from normbench.grid import Cell
from normbench.pack import fit_pack
from normbench.results import (
    DONE,
    INTERRUPTED,
    RUNNING,
    end_attempt,
    read_record,
    record_failure,
    start_attempt,
    update_record,
)
from normbench.run_defaults import lightning_internal_warnings_ignored
from normbench.run_output import append_log, attempt_header, log_path, output_to


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
    process, the launcher would re-launch the sweep command itself as the other ranks. What the
    run prints is appended to ``<sweep>/logs/<cell>.log`` (``output_to``).

    A cell another process has claimed is left to it (``claimed``). An interrupted run resumes
    from its last checkpoint in its own run directory (``--ckpt_path last``); a failed one starts
    again from scratch. Each start is appended to the record's ``attempts``, with the devices
    it could see (``CUDA_VISIBLE_DEVICES``) and when it ended.
    """
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
            with output_to(log_path(cell), attempt_header(cell, resume)):
                if cell.world_size > 1:
                    _run_process_group(cell)
                else:
                    run_cli([*cell.args, "--ckpt_path", "last"])
            if cell.status() == RUNNING:
                raise RunExitError("the run ended without writing how it ended to its record")
        except KeyboardInterrupt:
            _interrupted([cell])
            raise
        except (Exception, SystemExit) as err:  # noqa: BLE001 - one run's failure is recorded; the sweep goes on
            if cell.status() == INTERRUPTED:
                # Ctrl-C stops the sweep, not just this run (Lightning turned it into an exit and
                # ignores SIGINT from then on); the run resumes when the sweep runs again.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt from None
            trace = traceback.format_exc()
            record_failure(cell.run_dir, err, start, trace)
            append_log(cell, f"== {cell.name} failed ==\n{trace}")
        finally:
            end_attempt(cell.run_dir)
        return cell.status()


def _interrupted(cells: list[Cell]) -> None:
    """Ctrl-C before Lightning's fit loop could record it (as the run was set up): the record
    says ``interrupted``, not ``running``."""
    for cell in cells:
        if cell.status() == RUNNING:
            update_record(cell.run_dir, status=INTERRUPTED)


class RunExitError(RuntimeError):
    """A run ended without a result: its own process group exited with a non-zero status, or
    it returned with its record still saying ``running``."""


def _run_process_group(cell: Cell) -> None:
    """``normbench fit`` of ``cell`` in a subprocess, which Lightning launches as its own
    process group on every device this process sees; it prints where this process does."""
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
        raise RunExitError(
            f"the run's process group exited with status {code}; its output in {log_path(cell)} says why"
        )


def _start_attempt(cell: Cell, resume: bool, **extra: Any) -> None:
    """Record this start of ``cell`` (``normbench.results.start_attempt``); without a checkpoint
    to resume from, the run directory is cleared first (the record's attempts are kept)."""
    run_dir = Path(cell.run_dir)
    previous = read_record(run_dir).get("attempts", [])
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    sweep = {"cell": cell.name, "index": cell.index, "values": cell.values}
    start_attempt(run_dir, sweep, resume, previous, **extra)


def run_group(cells: list[Cell | dict]) -> list[str]:
    """Run one pack (``normbench.packed_fit``) or, for a single cell, ``run_cell``; failures are
    recorded per run, as in ``run_cell``. Packs have no checkpoints: an interrupted pack starts again."""
    cells = [Cell(**c) if isinstance(c, dict) else c for c in cells]
    if len(cells) == 1:
        return [run_cell(cells[0])]
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
                # The pack's one output, in its first run's log; the others' logs say where it is.
                for cell in todo[1:]:
                    append_log(cell, f"{attempt_header(cell, False, todo)}\n(its output: {log_path(todo[0])})")
                with (
                    output_to(log_path(todo[0]), attempt_header(todo[0], False, todo)),
                    lightning_internal_warnings_ignored(),
                ):
                    fit_pack(todo)
        except KeyboardInterrupt:
            _interrupted(todo)
            raise
        except (Exception, SystemExit) as err:  # noqa: BLE001 - recorded for every run of the pack
            trace = traceback.format_exc()
            for cell in todo:
                record_failure(cell.run_dir, err, start, trace)
            append_log(todo[0], f"== the pack failed ==\n{trace}")
        finally:
            for cell in todo:
                end_attempt(cell.run_dir)
    return [c.status() for c in cells]
