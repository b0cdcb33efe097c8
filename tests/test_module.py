"""NormBenchModule: the logged epoch metrics against an independent evaluation."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from normbench.data import MNISTDataModule
from normbench.module import NormBenchModule


class _Witness(L.Callback):
    """Records, per epoch, the training losses as they happen and the validation metrics
    recomputed by hand from the model after validation."""

    def __init__(self) -> None:
        self.losses: list[list[tuple[float, int]]] = []
        self.logged: list[dict[str, float]] = []
        self.by_hand: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.losses.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[-1].append((float(outputs["loss"]), len(batch[1])))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        correct = total = 0
        loss_sum = 0.0
        with torch.no_grad():
            for x, y in trainer.datamodule.val_dataloader():
                logits = pl_module(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                total += len(y)
        self.by_hand.append({"val/acc": correct / total, "val/loss": loss_sum / total})

    def on_train_end(self, trainer, pl_module) -> None:
        self.final = {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_epoch_metrics_are_per_epoch_and_match_an_independent_evaluation(fake_data, tmp_path):
    L.seed_everything(0)
    witness = _Witness()
    history: list[dict[str, float]] = []

    class Epochs(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch:
                history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    data = MNISTDataModule(str(fake_data), download=False, batch_size=16, num_workers=0)
    model = NormBenchModule(norm="bn", in_channels=1, width=8, num_blocks=2)
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2, callbacks=[witness, Epochs()],
    )  # fmt: skip
    trainer.fit(model, data)
    history.append(witness.final)
    assert len(history) == len(witness.by_hand) == len(witness.losses) == 3
    for epoch, (logged, by_hand, losses) in enumerate(zip(history, witness.by_hand, witness.losses, strict=True)):
        # A mean over this epoch's steps only: a cumulative or unreset metric would differ.
        train_loss = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        assert abs(logged["train/loss"] - train_loss) < 1e-5, epoch
        assert abs(logged["val/acc"] - by_hand["val/acc"]) < 1e-6, epoch
        assert abs(logged["val/loss"] - by_hand["val/loss"]) < 1e-4, epoch
        assert logged["val/acc_best"] == max(h["val/acc"] for h in witness.by_hand[: epoch + 1])
