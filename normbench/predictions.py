"""``normbench predict``'s output: each image's predicted class beside its label, in
``predictions.csv`` in the command's run directory (LightningCLI keeps what ``predict`` returns
nowhere)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


def check_one_process(world_size: int) -> None:
    """Refuse a predict on several processes (``PredictionWriter`` writes from one), in one line."""
    if world_size > 1:
        raise ValueError(
            f"normbench predict writes its predictions from one process; this run has {world_size} "
            "(give --trainer.devices 1 --trainer.num_nodes 1)"
        )


class PredictionWriter(L.Callback):
    """Write ``index,prediction,label`` per image of the predict loader (the data module's test
    split), in its order, as each batch is predicted: ``index`` is the image's place in the
    split, ``label`` its class where the batch holds labels (else empty).

    One process writes: the images of several processes would be shards of the split in an order
    of the sampler's, padded to equal length; a predict on several devices is refused.

    Args:
        filename: the file, in the run directory (the logger's ``log_dir``, else
            ``default_root_dir``).
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        self.filename = filename
        self.path: Path | None = None
        self._file = None
        self._writer = None
        self._seen = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict":
            check_one_process(trainer.world_size)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = trainer.log_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        self.path = Path(folder) / self.filename
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 - closed at the end of predict
        self._writer = csv.writer(self._file)
        self._writer.writerow(["index", "prediction", "label"])
        self._seen = 0

    # A plain callback, not Lightning's BasePredictionWriter: that one makes the predict loop
    # infer each batch's sample indices, which it cannot for the in-memory loader (it warns).
    def on_predict_batch_end(self, trainer, pl_module, prediction: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:  # fmt: skip
        labels = batch[1].tolist() if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        for i, predicted in enumerate(prediction.tolist()):
            self._writer.writerow([self._seen + i, predicted, "" if labels is None else labels[i]])
        self._seen += len(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        rank_zero_info(f"normbench: {self._seen} predictions in {self.path}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
