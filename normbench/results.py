"""Run records: the small machine-readable ``metrics.json`` in each run directory.

Sweeps and reports read these records, never TensorBoard files. Writes are atomic (a
temporary file, then a rename), so an interrupted run never leaves a torn record.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

RECORD = "metrics.json"


def read_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of ``run_dir``, or an empty dict when there is none yet."""
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_record(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the record of ``run_dir`` and return the whole record.

    Args:
        run_dir: the run directory (the logger's ``log_dir``).
        **fields: JSON-serializable values to set.
    """
    record = {**read_record(run_dir), **fields}
    write_json_atomic(Path(run_dir) / RECORD, record)
    return record


def error_line(err: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message``, as run records store an error."""
    return f"{type(err).__name__}: {err}".splitlines()[0][:limit]


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
