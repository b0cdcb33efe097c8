"""The tests' quick base config: study 2's experiment (its network, Normalize(0.5), epochs) with
MNIST in place of CIFAR-10, as ``normbench.experiments`` defines it. The shipped MNIST configs
are study 1's iteration runs, far longer per step and per evaluation."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import yaml

from normbench.experiments import study2_config


@cache
def mnist_config(norm: str = "bn", batch_size: int = 16) -> str:
    """Path of ``study2_config("mnist", norm, batch_size)`` as YAML, written once per session."""
    path = Path(tempfile.mkdtemp(prefix="normbench_cfg_")) / f"mnist_{norm}_bs{batch_size}.yaml"
    path.write_text(yaml.safe_dump(study2_config("mnist", norm, batch_size), sort_keys=False))
    return str(path)
