"""The run record: ``metrics.json`` in each run directory, its schema, its statuses and its one
writer.

Sweeps and reports read these records, never TensorBoard files. Every write goes through
``update_record``, which refuses a field the schema does not name or a status it does not know,
and writes atomically (a temporary file, then a rename), so an interrupted run never leaves a
torn record. ``RunRecorder`` (a fit), ``normbench.pack`` (packed runs) and the sweep's attempts
all write through it.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normbench.errors import error_line

if TYPE_CHECKING:
    import torch

RECORD = "metrics.json"

# Statuses: a run is pending until it starts, running until it ends, and ends finished, diverged
# (its loss became NaN or inf), failed (an error) or interrupted (Ctrl-C, to be resumed).
PENDING, RUNNING, FINISHED, DIVERGED, FAILED, INTERRUPTED = (
    "pending", "running", "finished", "diverged", "failed", "interrupted",
)  # fmt: skip
STATUSES = (PENDING, RUNNING, FINISHED, DIVERGED, FAILED, INTERRUPTED)
DONE = (FINISHED, DIVERGED)  # results: a sweep never runs them again
UNFINISHED = (RUNNING, INTERRUPTED, PENDING)  # neither a result nor a failure yet

SCHEMA: dict[str, str] = {
    "status": "one of STATUSES",
    "config": "the run's config as LightningCLI saved it (config.yaml)",
    "revision": "the code's git commit (+dirty), or the package version",
    "hardware": "the device, e.g. 'CPU AMD EPYC (x86_64), 2 threads' or the GPU's name",
    "layout": "devices, num_nodes, world_size, per-device and global batch, images per norm statistic",
    "seed": "seed_everything",
    "global_step": "optimizer steps done",
    "lr": "the learning rate the optimizer used (its first parameter group's, at the end)",
    "wall_time_s": "wall time of the run, all attempts together",
    "epochs": "one row per training epoch: its train/ and val/ metrics",
    "evals": "one row per validation with its step",
    "train_loss_steps": "[step, loss] of every log_every_n_steps-th batch, before its update",
    "diagnostics": "NormDiagnostics: host seconds, the subsets asked for and measured",
    "val_acc_final": "the last validation's accuracy",
    "val_acc_best": "the best validation accuracy",
    "val_acc_batch_stats_final": "the last validation's accuracy with batch statistics",
    "val_acc_precise_bn": "the accuracy after PreciseBN",
    "diverged_at_step": "the step of the first NaN or inf loss",
    "error": "the line that said why a run failed",
    "traceback": "the end of a failed run's traceback",
    "resumed_from": "the checkpoint a resumed run started from",
    "attempts": "sweeps: one entry per start (pid, host, started, ended, resumed, visible_devices)",
    "sweep": "sweeps: the cell's name, index and values",
    "packed": "packs: the pack's runs and this run's index in it",
}


def read_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of ``run_dir``, or an empty dict when there is none yet."""
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def status_of(run_dir: str | os.PathLike) -> str:
    """The run's status, ``pending`` when it has no record."""
    return read_record(run_dir).get("status", PENDING)


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for every thread
    for a moment); 0o022 where /proc does not say."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's file is the owner's alone (0600); the record gets a new file's mode, as the
        # run's other files (0644 under the usual umask 022), so that others can read it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_record(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """The one writer: merge ``fields`` into the record of ``run_dir`` and return the whole record.

    Args:
        run_dir: the run directory (the logger's ``log_dir``).
        **fields: fields of ``SCHEMA``, JSON-serializable.
    """
    unknown = sorted(set(fields) - set(SCHEMA))
    if unknown:
        raise KeyError(f"run record fields {unknown} are not in normbench.results.SCHEMA")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"run record status {fields['status']!r} is not one of {', '.join(STATUSES)}")
    record = {**read_record(run_dir), **fields}
    write_json_atomic(Path(run_dir) / RECORD, record)
    return record


def summary(rows: list[dict[str, float]], precise_bn: float | None = None) -> dict[str, float]:
    """The end-of-run figures of a record from its evaluation rows (``evals``, or ``epochs``
    when a run validated at epoch ends only): the last and best validation accuracy, the last
    batch-statistics accuracy and PreciseBN's; figures a run did not measure are left out.

    Args:
        rows: the record's rows, in order.
        precise_bn: PreciseBN's accuracy, when measured.
    """
    final = rows[-1] if rows else {}
    figures = {
        "val_acc_final": final.get("val/acc"),
        "val_acc_best": max((e["val/acc"] for e in rows if "val/acc" in e), default=None),
        "val_acc_batch_stats_final": final.get("train_eval/val_acc_batch_stats"),
        "val_acc_precise_bn": precise_bn,
    }
    return {k: v for k, v in figures.items() if v is not None}


# -- sweeps' attempts ---------------------------------------------------------------------


def start_attempt(
    run_dir: str | os.PathLike, sweep: dict[str, Any], resume: bool, previous: list | None = None, **extra: Any
) -> None:
    """Append a start to the record's ``attempts`` and mark the run running.

    Args:
        run_dir: the run directory.
        sweep: the sweep cell's name, index and values.
        resume: whether the run resumes from its checkpoint.
        previous: the attempts before this one (None: the record's), for a run whose directory
            was cleared to start from nothing.
        **extra: more about the attempt (e.g. ``packed``: the size of its pack).
    """
    attempts = read_record(run_dir).get("attempts", []) if previous is None else list(previous)
    attempts.append(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "resumed": resume,
         "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), **extra}
    )  # fmt: skip
    update_record(run_dir, status=RUNNING, attempts=attempts, sweep=sweep)


def end_attempt(run_dir: str | os.PathLike) -> None:
    """Note in the record's last attempt when it ended."""
    attempts = read_record(run_dir).get("attempts", [])
    if attempts:
        attempts[-1]["ended"] = time.time()
        update_record(run_dir, attempts=attempts)


def record_failure(run_dir: str | os.PathLike, err: BaseException, start: float, traceback: str) -> None:
    """Mark the run failed, with the line that said why and the end of its traceback."""
    update_record(run_dir, status=FAILED, error=error_line(err), traceback=traceback[-4000:],
                  wall_time_s=round(time.time() - start, 3))  # fmt: skip


# -- where a run ran ----------------------------------------------------------------------


def hardware(device: torch.device) -> str:
    """The device a run trains on, e.g. ``NVIDIA H100 80GB HBM3`` or ``CPU AMD EPYC (x86_64),
    2 threads`` (the CPU model, its architecture and torch's threads)."""
    import torch  # here: the report reads records without loading torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{device.type.upper()} {cpu_model()} ({platform.machine()}), {threads} thread{'s' * (threads != 1)}"


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC``, ``Intel(R) Xeon(R) Platinum 8480+``), from
    /proc/cpuinfo where there is one, else what Python's platform module knows, else "unknown"."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, which taskset and cgroups narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def code_revision() -> str:
    """The git commit of the normbench checkout (``+dirty`` with uncommitted changes), or the
    package version when it is not a git checkout."""
    from normbench import __version__

    repo = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return f"normbench {__version__}"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
