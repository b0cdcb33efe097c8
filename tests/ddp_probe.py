"""Callbacks for the multi-process tests: norm buffers per rank after fit, test metrics."""

from __future__ import annotations

import json
import os

import lightning as L
import torch


class SaveNormBuffers(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        buffers = {k: v.detach().cpu().clone() for k, v in pl_module.named_buffers() if "running" in k}
        torch.save(buffers, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


class SaveTestMetrics(L.Callback):
    """Rank zero writes the test metrics, as every rank holds them after their reduction, to
    ``<out_dir>/test_metrics_<world size>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            path = os.path.join(self.out_dir, f"test_metrics_{trainer.world_size}.json")
            with open(path, "w") as f:
                json.dump(metrics, f)
