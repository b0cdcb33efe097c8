"""The LightningModule: one image classifier, parameterized by its norm layer."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from normbench.nets import NETS, ActivationName, NetName
from normbench.norms import NormName, convert_sync_norms, create_norm


class NormBenchModule(L.LightningModule):
    """Cross-entropy classifier whose every norm layer is ``norm``.

    Logs, every epoch, ``{train,val,test}/loss`` and ``/acc`` (plain top-1, torchmetrics'
    micro accuracy) and ``val/acc_best``, the best validation accuracy so far. With the data
    module's ``val_split: 0`` the validation set is the official test split, as in the studies.

    Args:
        norm: registry name of the norm layer (see ``normbench.norms.NORMS``).
        norm_kwargs: the norm's options, e.g. ``{num_groups: 4}`` for gn.
        net: ``seed_cnn`` (study 2's network) or ``resnet`` (CIFAR ResNet).
        width: channels of seed_cnn's blocks, or of the resnet's first stage.
        num_blocks: seed_cnn's blocks, or the resnet's blocks per stage (3: ResNet-20).
        activation: activation after each norm.
        weight_standardization: weight-standardized convolutions (e.g. GN+WS).
        num_classes: classes; linked from the data module.
        in_channels: image channels; linked from the data module.
        optimizer: optimizer factory; Adam with lr 1e-3 as in study 2.
        lr_scheduler: optional scheduler factory, stepped every epoch.
        sync_norms: on several devices, compute norm batch statistics over all of them
            (``normbench.norms.convert_sync_norms``). Use it instead of ``trainer.sync_batchnorm``,
            which knows only torch's BatchNorm.
        channels_last: keep weights and activations in channels-last memory order, which
            oneDNN and cuDNN convolutions run faster (1.1-1.8x measured on CPU); same math.
    """

    def __init__(
        self,
        norm: NormName = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        net: NetName = "seed_cnn",
        width: int = 64,
        num_blocks: int = 4,
        activation: ActivationName = "relu",
        weight_standardization: bool = False,
        num_classes: int = 10,
        in_channels: int = 3,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        sync_norms: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.norm_name = norm
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        factory = partial(create_norm, norm, **(norm_kwargs or {}))
        self.net = NETS[net](
            factory,
            in_channels=in_channels,
            num_classes=num_classes,
            width=width,
            num_blocks=num_blocks,
            activation=activation,
            weight_standardization=weight_standardization,
        )
        self.sync_norms = sync_norms
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=self.memory_format)
        # No input checks: theirs call .any() on the device, a host sync every step.
        acc = partial(MulticlassAccuracy, num_classes=num_classes, average="micro", validate_args=False)
        mean = partial(MeanMetric, nan_strategy="disable")
        self.train_acc, self.val_acc, self.test_acc = acc(), acc(), acc()
        self.train_loss, self.val_loss, self.test_loss = mean(), mean(), mean()
        self.val_acc_best = MaxMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x)

    def setup(self, stage: str) -> None:
        # Runs after the process group exists and before DDP wraps the model and the optimizer
        # is built; the conversion keeps every parameter object.
        if self.sync_norms and self.trainer.world_size > 1:
            self.net = convert_sync_norms(self.net, device=self.trainer.strategy.root_device)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # In-memory batches are born on the device: skip Lightning's generic walk of the batch.
        if isinstance(batch, (tuple, list)) and all(isinstance(t, Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_start(self) -> None:
        # The sanity check's batches must not count towards the first epoch or the best.
        for metric in (self.val_loss, self.val_acc, self.val_acc_best):
            metric.reset()

    def _step(self, batch, loss_metric, acc_metric) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Metrics accumulate on the device; they are read once per epoch, not per step.
        loss_metric.update(loss.detach(), weight=y.numel())
        acc_metric.update(logits.detach(), y)
        return loss

    # The metric objects are logged once, at the end of each epoch: Lightning computes them there
    # (torchmetrics reduces across processes) and resets them. A self.log call per step costs
    # Lightning about 0.8 ms of Python work, a sixth of a whole batch-2 step on a CPU.
    def training_step(self, batch, batch_idx: int) -> Tensor:
        return self._step(batch, self.train_loss, self.train_acc)

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss, prog_bar=True)
        self.log("train/acc", self.train_acc)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.val_loss, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss)
        self.log("val/acc", self.val_acc, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        self.val_acc_best.update(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.test_loss, self.test_acc)

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(1)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }
