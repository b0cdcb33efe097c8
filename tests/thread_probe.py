"""A callback for the sweep tests: each run writes the threads, cores and GPUs its process was given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch


class ThreadProbe(L.Callback):
    """Writes ``threads.json`` into the run directory at the start of fit."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        probe = {
            "intra_op": torch.get_num_threads(),
            "inter_op": torch.get_num_interop_threads(),
            "env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
            "cores": cores,
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        (Path(trainer.log_dir) / "threads.json").write_text(json.dumps(probe))
