"""The LightningModule: one image classifier, parameterized by its norm layer."""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import DoublePrecision
from torch import Tensor, nn
from torchmetrics import MaxMetric

# Every process that trains imports this module, so that Lightning's reset_seed in each of a
# DDP run's processes takes the run's 64-bit seed (normbench.seeding).
from normbench import seeding  # noqa: F401
from normbench.errors import CheckpointMismatchError
from normbench.nets import NETS, ActivationName, NetName, WSName
from normbench.norms import (
    NormName,
    adaptive_clip_grad,
    check_norm_batch,
    convert_sync_norms,
    create_norm,
    freeze_running_stats,
    norm_batch_factory,
)
from normbench.options import check_restricted, plain
from normbench.steps import (
    CompileMode,
    HeldGrads,
    NetCall,
    NonFiniteWatch,
    classification_metrics,
    summed_metric_states,
    zero_other_ranks,
)

# The module arguments that shape the network's tensors: a checkpoint fits only equal ones.
ARCHITECTURE = ("norm", "norm_kwargs", "net", "width", "num_blocks", "activation", "weight_standardization")


class NormBenchModule(HeldGrads, L.LightningModule):
    """Cross-entropy classifier whose every norm layer is ``norm``.

    Logs, every epoch, ``{train,val,test}/loss`` and ``/acc`` (plain top-1, torchmetrics'
    micro accuracy) and ``val/acc_best``, the best validation accuracy so far. With the data
    module's ``val_split: 0`` the validation set is the official test split, as in the studies.

    Args:
        norm: registry name of the norm layer (see ``normbench.norms.NORMS``).
        norm_kwargs: the norm's options, e.g. ``{num_groups: 4}`` for gn.
        net: ``seed_cnn`` (study 2's network), ``dilated_cnn`` (study 1's) or ``resnet`` (CIFAR's).
        width: channels of seed_cnn's or dilated_cnn's blocks, or of the resnet's first stage.
        num_blocks: seed_cnn's or dilated_cnn's blocks, or the resnet's per stage (3: ResNet-20).
        activation: activation after each norm.
        weight_standardization: weight-standardized convolutions (e.g. GN+WS).
        num_classes: classes; linked from the data module.
        in_channels: image channels; linked from the data module.
        optimizer: optimizer factory; Adam with lr 1e-3 as in study 2.
        lr_scheduler: optional scheduler factory, stepped every epoch.
        sync_norms: on several devices, norm batch statistics over all of them
            (``normbench.norms.convert_sync_norms``; not ``trainer.sync_batchnorm``: torch's BN only).
        channels_last: keep weights and activations in channels-last memory order, which
            oneDNN and cuDNN convolutions run faster; same math.
        compile: ``torch.compile`` the network (``normbench.steps.NetCall``): true or a mode
            (``reduce-overhead``: forward and backward as CUDA graphs on CUDA, eager elsewhere);
            loss, metrics and optimizer eager, checkpoints unchanged, hooks compiled in.
        check_finite_every_n_steps: how often the host reads the first step whose loss was NaN
            or inf (``normbench.steps.NonFiniteWatch``); the run stops and is recorded as
            ``diverged`` at that exact step. None: every step on CPU, every 20 on accelerators.
        norm_batch: images each norm layer normalizes over in training, apart from the SGD
            batch (``normbench.norms.norm_batch_factory``: bn, and bnrs and brn on one device;
            it must divide ``data.batch_size``). None: the whole per-device batch (or the
            global one with ``sync_norms`` on several devices).
        freeze_norms_after: FrozenBN (Wu & Johnson 2021, Sec. 4) from this fraction of the run's
            optimizer steps on: norms with running statistics normalize by them in training too
            and stop updating them (``normbench.norms.freeze_running_stats``). None: never.
        agc: adaptive gradient clipping's lambda (Brock et al. 2021, Sec. 3): each unit's
            gradient is scaled to at most lambda times its weight's norm (0.01 in the
            normalizer-free recipe), the last linear layer left out as in the paper. None: off.
    """

    def __init__(
        self,
        norm: NormName = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        net: NetName = "seed_cnn",
        width: PositiveInt = 64,
        num_blocks: int = 4,
        activation: ActivationName = "relu",
        weight_standardization: WSName = False,
        num_classes: int = 10,
        in_channels: int = 3,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        sync_norms: bool = True,
        channels_last: bool = True,
        compile: bool | CompileMode = False,
        check_finite_every_n_steps: PositiveInt | None = None,
        norm_batch: int | None = None,
        freeze_norms_after: ClosedUnitInterval | None = None,
        agc: PositiveFloat | None = None,
    ) -> None:
        super().__init__()
        check_restricted(NormBenchModule.__init__, locals(), "model")
        width, check_finite_every_n_steps, freeze_norms_after, agc = plain(width, check_finite_every_n_steps,
                                                                          freeze_norms_after, agc)  # fmt: skip
        # In checkpoints; logged by RunRecorder with the experiment's variables first.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"], logger=False)
        self.norm_name = norm
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.norm_batch, self.freeze_norms_after = norm_batch, freeze_norms_after
        self.agc, self.sync_norms = agc, sync_norms
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        shape = {"in_channels": in_channels, "num_classes": num_classes, "width": width, "num_blocks": num_blocks,
                 "activation": activation, "weight_standardization": weight_standardization}  # fmt: skip
        self.net = build_net(net, norm, norm_kwargs or {}, norm_batch, **shape).to(memory_format=self.memory_format)
        # Not self.compile, which is nn.Module's method; the compiled call stays out of the module tree.
        self.compile_net = compile
        self.net_call = NetCall(compile)
        # In checkpoints, so that a run resumed in the middle of an epoch ends with the same
        # epoch means and best accuracy as one never interrupted.
        (self.train_acc, self.train_loss), (self.val_acc, self.val_loss), (self.test_acc, self.test_loss) = (
            classification_metrics(num_classes, persistent=True) for _ in range(3)
        )
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)
        self.nonfinite = NonFiniteWatch(check_finite_every_n_steps)
        self.diverged_at: int | None = None
        self._train_metrics_epoch: int | None = None  # the epoch the training metrics hold

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        # The network is an argument, so sync norms swapped in by setup() are compiled too.
        return self.net_call(self.net, x)

    def setup(self, stage: str) -> None:
        # The network's options against the data's image size, before any step.
        size = getattr(self.trainer.datamodule, "image_size", None)
        if isinstance(size, int) and hasattr(self.net, "check_input_size"):
            self.net.check_input_size(size, size)
        # Runs after the process group exists and before DDP wraps the model and the optimizer
        # is built; the conversion keeps every parameter object.
        if self.sync_norms and self.trainer.world_size > 1:
            self.net = convert_sync_norms(self.net, device=self.trainer.strategy.root_device)
        self.hold_grads(stage)  # under DDP, in their parameters' layout before DDP's buckets exist

    def on_train_epoch_start(self) -> None:
        # A run resumed in the middle of an epoch keeps the epoch's running means from its
        # checkpoint; any other epoch starts from zero.
        if self._train_metrics_epoch != self.current_epoch:
            self.train_loss.reset()
            self.train_acc.reset()
        self._train_metrics_epoch = self.current_epoch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # FrozenBN, held every step (Lightning puts the model back in train mode after each
        # validation): the stat-tracking norms in eval mode; a host comparison, no device read.
        frozen_from = self.freeze_norms_after
        if frozen_from is not None and self.global_step >= int(frozen_from * self.trainer.estimated_stepping_batches):
            freeze_running_stats(self.net)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val:  # the Trainer's own clipping, when set
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self.agc is not None:  # the last linear layer left out, as in the paper
            head = {id(p) for p in self.net.fc.parameters()} if hasattr(self.net, "fc") else set()
            adaptive_clip_grad([p for p in self.net.parameters() if id(p) not in head], self.agc)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["normbench"] = {"train_metrics_epoch": self._train_metrics_epoch}
        # The epoch's training metrics so far, of every process (rank zero's file holds them).
        if self._trainer is not None and self.trainer.world_size > 1:
            summed_metric_states(checkpoint, {"train_loss": self.train_loss, "train_acc": self.train_acc},
                                 lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before Lightning loads the weights: one line on what does not fit, not torch's list.
        check_state_fits(checkpoint, self.state_dict())
        # Lightning loads them before its precision plugin converts the module (strategy.setup):
        # a 64-true run's float64 weights would be rounded to float32 on the way in, and a
        # resumed run (or a test of its checkpoint) would not be the run that saved them.
        if self._trainer is not None and isinstance(self.trainer.precision_plugin, DoublePrecision):
            self.double()
        self._train_metrics_epoch = checkpoint.get("normbench", {}).get("train_metrics_epoch")
        zero_other_ranks(checkpoint, ("train_loss", "train_acc"), self.global_rank)

    def _step(self, batch, loss_metric, acc_metric) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Metrics accumulate on the device, read once per epoch; the loss metric takes every
        # image's loss, so that a last, smaller batch and uneven shards count for their images.
        loss_metric.update(F.cross_entropy(logits.detach(), y, reduction="none"))
        acc_metric.update(logits.detach(), y)
        return loss

    # The metric objects are logged once, at each epoch's end (torchmetrics reduces across
    # processes): a self.log call per step is a large part of a batch-2 step on a CPU.
    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self._step(batch, self.train_loss, self.train_acc)
        self.nonfinite.note(loss, self.global_step)  # on the device: no host sync here
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.nonfinite.check(self.trainer, self.global_step, self.device)
        if step is not None:
            self.diverged_at = step
            self.trainer.should_stop = True
            # One line from process 0, through the progress bar so that it does not break it.
            self.print(
                f"normbench: the training loss became NaN or inf at step {step}; the run stops here and is "
                "recorded as diverged (try a smaller learning rate or another norm)",
                file=sys.stderr,
            )

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
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def check_state_fits(checkpoint: dict[str, Any], ours: dict[str, Tensor]) -> None:
    """Raise a one-line ``CheckpointMismatchError`` when ``checkpoint``'s weights do not fit a
    model whose state_dict is ``ours``: how many tensors are missing, unexpected or differently
    shaped, one of them, and the architecture settings the checkpoint was saved with.

    Args:
        checkpoint: a Lightning checkpoint (``state_dict``, ``hyper_parameters``).
        ours: the state_dict of the model that would load it.
    """
    theirs = checkpoint.get("state_dict", {})
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    mismatched = [k for k in ours if k in theirs and tuple(theirs[k].shape) != tuple(ours[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    hp = checkpoint.get("hyper_parameters", {})
    # The architecture's main settings (norm, net, width, num_blocks) and the classes.
    named = (*ARCHITECTURE[:1], *ARCHITECTURE[2:5], "num_classes")
    saved = ", ".join(f"{k}={hp[k]}" for k in named if k in hp)
    example = (mismatched or missing or unexpected)[0]
    raise CheckpointMismatchError(
        f"the checkpoint does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} differently shaped tensors, e.g. {example}); "
        f"it was saved with {saved or 'other settings'}: "
        "pass those --model settings, or a checkpoint of this model"
    )


def build_net(net: str, norm: str, norm_kwargs: dict[str, Any], norm_batch: int | None, **shape: Any) -> nn.Module:
    """The network ``net`` (a ``NETS`` name) with ``norm`` in every norm slot, normalizing over
    ``norm_batch`` images in training when set; ``shape``: the network's own keywords (width,
    num_blocks, activation, ...)."""
    factory = partial(create_norm, norm, **norm_kwargs)
    if norm_batch is not None:
        check_norm_batch(norm, norm_batch, None)
        factory = norm_batch_factory(norm, norm_batch, norm_kwargs)
    return NETS[net](factory, **shape)
