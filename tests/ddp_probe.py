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


class SaveStepLosses(L.Callback):
    """Each rank writes the loss of its share of every training step, ``[step, loss]``, to
    ``<out_dir>/losses_rank<rank>.json`` at the end of training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.losses: list[list[float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.losses.append([trainer.global_step - 1, float(outputs["loss"])])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with open(os.path.join(self.out_dir, f"losses_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.losses, f)


class NaNInSecondHalf(L.Callback):
    """Before optimizer step ``step``, the second half of the global batch becomes NaN: on one
    process the last half of its batch, on two processes rank one's whole share."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        x = batch[0]
        if trainer.world_size == 1:
            x[x.shape[0] // 2 :] = float("nan")
        elif trainer.global_rank == 1:
            x[:] = float("nan")
