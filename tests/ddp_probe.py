"""A callback for the multi-process test: each rank saves its norm buffers after fit."""

from __future__ import annotations

import os

import lightning as L
import torch


class SaveNormBuffers(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        buffers = {k: v.detach().cpu().clone() for k, v in pl_module.named_buffers() if "running" in k}
        torch.save(buffers, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
