"""What a sweep's run leaves beside its record: its output, in ``<sweep>/logs/<run>.log``, and
the line the sweep says of it as it ends."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from normbench.grid import Cell
from normbench.results import DIVERGED, FAILED, FINISHED, PENDING, RUNNING, read_record


def log_path(cell: Cell) -> Path:
    """Where a sweep's run writes what it prints: ``<sweep>/logs/<cell>.log``, every attempt's."""
    return Path(cell.run_dir).parents[2] / "logs" / f"{cell.name}.log"


def append_log(cell: Cell, text: str) -> None:
    """Append ``text`` (whole lines) to the cell's log, outside any ``output_to``."""
    path = log_path(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        log.write(text if text.endswith("\n") else f"{text}\n")


@contextmanager
def output_to(path: Path, header: str) -> Iterator[None]:
    """Append everything the body prints to ``path``, after a line ``header``: this process's
    stdout and stderr at their file descriptors (Python, Lightning's logging, torch's C++
    warnings) and those of the processes it starts (a run's own process group). The sweep's
    terminal keeps its progress and a line per run; two workers' runs never interleave there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _flush_std()
    saved = (os.dup(1), os.dup(2))
    try:
        with open(path, "a", buffering=1) as log:
            log.write(f"{header}\n")
            log.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                # Python's streams too, where a caller replaced them (pytest's capsys, a notebook).
                with redirect_stdout(log), redirect_stderr(log):
                    yield
            finally:
                _flush_std()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def attempt_header(cell: Cell, resume: bool, packed: list[Cell] | None = None) -> str:
    how = "resuming from its last checkpoint" if resume else "from the start"
    if packed:
        how += f", packed with {', '.join(c.name for c in packed if c is not cell)}"
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"== normbench sweep: {cell.name}, {how}, {when}, pid {os.getpid()} on {socket.gethostname()} =="


def outcome(name: str, record: dict[str, Any]) -> str:
    """One line on a run that failed or diverged: ``bn_bs4 failed: <its error>`` or ``bn_bs4
    diverged at step 12``."""
    if record.get("status") == DIVERGED:
        return f"{name} diverged at step {record.get('diverged_at_step', '?')}"
    return f"{name} failed: {record.get('error') or 'no error recorded'}"


def ended(cell: Cell) -> str:
    """The sweep's line on a run it has just run: how it ended, from its record, and for a run
    that failed where its output is."""
    record = read_record(cell.run_dir)
    status = record.get("status", PENDING)
    if status == FAILED:
        return f"{outcome(cell.name, record)} (its output: {log_path(cell)})"
    if status == DIVERGED:
        return outcome(cell.name, record)
    if status == FINISHED:

        def acc(key: str) -> str:
            return "n/a" if record.get(key) is None else f"{record[key]:.4f}"

        return (f"{cell.name} finished: val/acc {acc('val_acc_best')} best, {acc('val_acc_final')} last, "
                f"{record.get('global_step', '?')} steps, {record.get('wall_time_s') or 0:.0f} s")  # fmt: skip
    if status == RUNNING:
        return f"{cell.name} is run by another sweep process (its claim: {Path(cell.run_dir).parents[2] / 'claims'})"
    return f"{cell.name} {status}"
