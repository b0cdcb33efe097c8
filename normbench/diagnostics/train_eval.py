"""Accuracy with the norms' batch statistics (``BatchStatsAccuracy``) and after PreciseBN
recomputed their running statistics (``PreciseBNAccuracy``), beside ``val/acc`` with the running
statistics training left. Both are measured by rank zero alone, on a copy of the network whose
norms reduce nothing across processes, over the images one device would use (the data module's
``unsharded_dataloader``), so they are the figures of one device on any number of devices; the
trained model itself is never touched."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from normbench.diagnostics.figures import stat_layers, tensorboard_writer
from normbench.diagnostics.timing import Timed
from normbench.norms import local_norms, tracks_running_stats, update_bn_stats

BATCH_STATS_ACC = "train_eval/val_acc_batch_stats"
PRECISE_BN_ACC = "train_eval/val_acc_precise_bn"
SUBSETS = ("one device's images on any number of devices, measured on rank 0: the first validation images in "
           "evaluation batches, and the first training images of epoch 0's order in batches of the images the norms' "
           "statistics covered in training; per-step figures from rank 0's own batch")  # fmt: skip


class OneDeviceEval(Timed):
    """What both accuracies share: one device's validation and training batches, a local copy
    of the network, and accuracy on the first ``eval_images`` validation images (None: all),
    in whole evaluation batches; ``measured`` says how many images each pass used."""

    def __init__(self, eval_images: int | None = 500) -> None:
        super().__init__()
        self.eval_images = eval_images
        self.measured: dict[str, int] = {}
        self._layers: dict[str, nn.Module] = {}
        self._val_source = None  # one device's validation batches, found at the first use in a fit

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds, self.measured, self._val_source = 0.0, {}, None
        # Found once, after LightningModule.setup has converted norms for several devices.
        self._layers = stat_layers(pl_module)

    @staticmethod
    def _stat_layers(net: nn.Module) -> list[nn.Module]:
        return [m for m in net.modules() if tracks_running_stats(m)]

    @staticmethod
    def _local_copy(pl_module: L.LightningModule) -> nn.Module:
        """A copy of the network whose norms reduce nothing across processes: rank zero runs it
        alone. The trained network itself is never touched."""
        return local_norms(copy.deepcopy(getattr(pl_module, "net", pl_module)))

    def _eval_batches(self, trainer: L.Trainer):
        """The validation batches as one device sees them: the data module's unsharded loader,
        the user's own loader (Lightning shards only its private copy), or, on one device,
        the validation loop's. None under several processes when there is no such loader."""
        dm = trainer.datamodule
        if self._val_source is None:
            if hasattr(dm, "unsharded_dataloader"):
                self._val_source = dm.unsharded_dataloader("val")
            elif dm is not None:
                self._val_source = dm.val_dataloader()
            elif trainer.world_size == 1:
                loaders = trainer.val_dataloaders
                self._val_source = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        return self._val_source

    def _train_batches(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """(training batches of one device's order, in batches of the images the norms' batch
        statistics covered in training; that batch size)."""
        dm = trainer.datamodule
        batch_size = norm_batch(trainer, pl_module)
        if hasattr(dm, "unsharded_dataloader"):
            return dm.unsharded_dataloader("train", batch_size), batch_size
        return dm.train_dataloader(), batch_size

    @staticmethod
    def _net_input(x: Tensor, pl_module: L.LightningModule) -> Tensor:
        """``x`` as the module's forward hands it to its network: on its device, in the run's
        precision (64-true, bf16-true: the weights' dtype, as Lightning's loops convert
        batches), in its memory format."""
        x = pl_module.trainer.precision_plugin.convert_input(x.to(pl_module.device))
        fmt = getattr(pl_module, "memory_format", torch.contiguous_format)
        return x.contiguous(memory_format=fmt) if x.dim() == 4 else x

    def _accuracy(self, net: nn.Module, pl_module: L.LightningModule, batches, after_batch=None) -> tuple[Tensor, int]:
        """(accuracy of ``net`` on the first ``eval_images`` images of ``batches``, in whole
        batches; how many images that was)."""
        device = pl_module.device
        correct = torch.zeros((), device=device)
        seen = 0
        # In the run's precision, as its validation steps run (bf16-mixed: under autocast).
        with torch.no_grad(), pl_module.trainer.precision_plugin.forward_context():
            for x, y in batches:
                if self.eval_images is not None and seen >= self.eval_images:
                    break
                pred = net(self._net_input(x, pl_module)).argmax(1)
                correct = correct + (pred == y.to(device)).sum()
                seen += len(y)
                if after_batch is not None:
                    after_batch()
        return correct / max(seen, 1), seen


class BatchStatsAccuracy(OneDeviceEval, L.Callback):
    """At each validation (or every ``every``-th; the first always),
    ``train_eval/val_acc_batch_stats``: the accuracy with the norm layers in training mode
    (batch statistics of each evaluation batch; running statistics restored after every batch,
    parameters untouched).

    Args:
        eval_images: validation images it is measured on (the first ones, in whole evaluation
            batches); None: the whole validation set.
        every: measure it at every this-many-th validation of the fit.
    """

    def __init__(self, eval_images: int | None = 500, every: int = 1) -> None:
        super().__init__(eval_images)
        self.every = every
        self._validations = 0  # validations of this fit, sanity check excluded
        self._now = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._validations = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._now = False
            return
        self._now = self._validations % self.every == 0
        self._validations += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._now or not self._layers or not trainer.is_global_zero:
            return
        self._now = False
        with self._timed():
            batches = self._eval_batches(trainer)
            if batches is None:
                return
            net = self._local_copy(pl_module)
            saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in self._stat_layers(net)]
            for m, _ in saved:
                m.train()

            def restore() -> None:  # every batch sees the running statistics training left
                for m, buffers in saved:
                    for k, b in m.named_buffers(recurse=False):
                        b.copy_(buffers[k])

            acc, seen = self._accuracy(net, pl_module, batches, after_batch=restore)
            # The whole validation set's size beside it: a report tells a part from all of it.
            self.measured.update(batch_stats_images=seen, val_images=_images(batches) or None)
        # Rank zero alone measures it, on one device's images: the figure of every rank, with
        # nothing to reduce. rank_zero_only makes Lightning's reduction a no-op (no collective that
        # the other ranks would have to join); sync_dist=True only tells it the figure is whole, so
        # that it does not advise, as the epoch ends, to reduce it over the processes.
        pl_module.log(BATCH_STATS_ACC, acc, rank_zero_only=True, sync_dist=True)


class PreciseBNAccuracy(OneDeviceEval, L.Callback):
    """At the end of fit, ``train_eval/val_acc_precise_bn``: the accuracy after PreciseBN
    recalibrates a copy of the model on ``images`` training images; given several counts, one
    fresh copy per count, each logged as ``train_eval/val_acc_precise_bn_<count>`` and kept in
    ``by_images``, and the largest count's accuracy is ``train_eval/val_acc_precise_bn``
    (Wu & Johnson 2021 vary it, Fig. 4).

    Args:
        images: training images per count, in training batches (rounded up to whole batches).
        eval_images: validation images it is measured on; None: the whole validation set.
    """

    def __init__(self, images: list[int], eval_images: int | None = 500) -> None:
        super().__init__(eval_images)
        self.counts = sorted(set(images))
        self.by_images: dict[int, float] = {}  # PreciseBN's accuracy per image count

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.by_images = {}
        if not self.counts or not self._layers or trainer.datamodule is None:
            return
        if trainer.is_global_zero:
            with self._timed():
                writer = tensorboard_writer(trainer)
                for count in self.counts:
                    acc = self._precise_bn_accuracy(trainer, pl_module, count)
                    if acc is None:
                        return
                    self.by_images[count] = float(acc)
                    keys = [f"{PRECISE_BN_ACC}_{count}"] if len(self.counts) > 1 else []
                    if count == self.counts[-1]:
                        keys.append(PRECISE_BN_ACC)
                    for key in keys:
                        trainer.callback_metrics[key] = acc
                        if writer is not None:
                            writer.add_scalar(key, acc, trainer.global_step)

    @torch.no_grad()
    def _precise_bn_accuracy(self, trainer: L.Trainer, pl_module: L.LightningModule, images: int) -> Tensor | None:
        """Accuracy on the first ``eval_images`` validation images of a copy of the network whose
        running statistics PreciseBN recomputed from the first ``images`` training
        images of epoch 0's order, as one device sees them, in batches of the images the norms'
        batch statistics covered in training (``norm_batch``); the trained model itself is left
        as it is. Runs on rank zero alone, so the copy's norms reduce nothing across processes."""
        val = self._eval_batches(trainer)
        if val is None:
            return None
        net = self._local_copy(pl_module)
        loader, batch_size = self._train_batches(trainer, pl_module)
        batches = -(-images // max(1, batch_size))

        def forward(m: nn.Module, b) -> Tensor:
            return m(self._net_input(b[0], pl_module))

        with trainer.precision_plugin.forward_context():  # the norms' inputs as training saw them
            used = update_bn_stats(net, loader, batches, forward=forward)
        net.eval()
        acc, seen = self._accuracy(net, pl_module, val)
        self.measured.update(precise_bn_train_images=min(used * batch_size, _images(loader)),
                             precise_bn_batch_size=batch_size, precise_bn_val_images=seen,
                             val_images=_images(val) or None)  # fmt: skip
        return acc


def _images(loader) -> int:
    """Images a loader yields in one epoch (its dataset's size, or its targets')."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        return len(dataset)
    targets = getattr(loader, "targets", None)
    return len(targets) if targets is not None else 0


def norm_batch(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any = None) -> int:
    """Images one batch statistic of the norms covered in training: the module's norm batch
    when it sets one, else the per-device batch, or the global batch when the norms reduce their
    statistics over all devices (sync_norms). ``datamodule``: the run's, where the Trainer has
    none (a packed run's)."""
    if getattr(pl_module, "norm_batch", None):
        return int(pl_module.norm_batch)
    per_device = int(getattr(datamodule or trainer.datamodule, "batch_size", 0) or 1)
    synced = bool(getattr(pl_module, "sync_norms", False)) and trainer.world_size > 1
    return per_device * trainer.world_size if synced else per_device
