"""The run record in every Lightning mode a user may set: each run ends with its true status,
in its own directory, and writes nothing outside it. Run from the console script, as users run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from quick_configs import mnist_config

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BASE = mnist_config("bn", 16)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _normbench(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "normbench", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300, check=False)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_fast_dev_run_alone_records_its_run_in_its_own_directory(fake_data, tmp_path):
    work = tmp_path / "work"
    done = _normbench(work, "fit", "--config", BASE, "--data.data_dir", str(fake_data), "--data.download", "false",
                      "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.fast_dev_run", "true",
                      "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # The record and nothing else: no checkpoints/ in the working directory, none in the run's.
    assert _files(work) == ["lightning_logs/mnist_bn_bs16/version_0/metrics.json"]
    record = json.loads((work / "lightning_logs/mnist_bn_bs16/version_0/metrics.json").read_text())
    assert record["status"] == "finished" and record["global_step"] == 1
    assert record["config"]["model"]["norm"] == "bn" and record["config"]["trainer"]["fast_dev_run"] is True
