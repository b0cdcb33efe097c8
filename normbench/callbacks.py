"""Diagnostics that read the model and write TensorBoard (``NormDiagnostics``), and study 1's
validation before the first step (``ValidateAtStart``). They never change training: every
state they touch (mode, buffers, hooks) is put back in a ``finally``, and steps that do not log
cost no host sync."""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from normbench.norms import BatchRenorm, local_norms, tracks_running_stats, update_bn_stats

BATCH_STATS_ACC = "train_eval/val_acc_batch_stats"
PRECISE_BN_ACC = "train_eval/val_acc_precise_bn"
SUBSETS = ("one device's images on any number of devices, measured on rank 0: the first validation images in "
           "evaluation batches, and the first training images of epoch 0's order in batches of the images the norms' "
           "statistics covered in training; per-step figures from rank 0's own batch")  # fmt: skip


def stat_layers(pl_module: nn.Module) -> dict[str, nn.Module]:
    """Readable name -> layer, for every layer that tracks running statistics."""
    return {name.removeprefix("net."): m for name, m in pl_module.named_modules() if tracks_running_stats(m)}


def block_convs(pl_module: nn.Module) -> list[nn.Module]:
    """The first convolution of every block of the network, in depth order."""
    blocks = getattr(getattr(pl_module, "net", pl_module), "blocks", [])
    return [b.conv for b in blocks if isinstance(getattr(b, "conv", None), nn.Conv2d)]


@torch.no_grad()
def batch_running_gap(x: Tensor, layer: nn.Module) -> dict[str, Tensor]:
    """How far this batch's statistics stray from the layer's running ones, per channel then
    averaged: |mu_B - mu_run| / sigma_run and sigma_B / sigma_run, with sigma_B = sqrt(biased
    batch variance + eps) and sigma_run = sqrt(running_var + eps): BRN's d and r before clipping
    (Ioffe 2017, Algorithm 1). For brn also the current limits and the fraction of channels
    whose r or d is clipped. All values stay on the device."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
    std_run = torch.sqrt(layer.running_var.float() + layer.eps)
    d = (mean - layer.running_mean.float()) / std_run
    r = torch.sqrt(var + layer.eps) / std_run
    out = {"mean_gap": d.abs().mean(), "std_ratio": r.mean()}
    if isinstance(layer, BatchRenorm):
        r_max, d_max = layer.current_limits()
        out.update(
            r_max=r_max,
            d_max=d_max,
            r_clip_fraction=((r > r_max) | (r < 1 / r_max)).float().mean(),
            d_clip_fraction=(d.abs() > d_max).float().mean(),
        )
    return out


def tensorboard_writer(trainer: L.Trainer):
    """The SummaryWriter of the trainer's TensorBoard logger, None without one."""
    return next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class NormDiagnostics(L.Callback):
    """Why a norm wins or loses, in TensorBoard.

    Every ``every_n_steps`` training steps (on the batch just trained on, captured by forward
    pre-hooks that return at once on other steps):

    - ``running_stats/<layer>/mean``, ``/var``: mean over channels of running_mean and
      running_var (as study 2 prints them), and their histograms.
    - ``batch_vs_running/<layer>/mean_gap``, ``/std_ratio``: mean over channels of
      |mu_B - mu_run| / sigma_run and sigma_B / sigma_run, what BRN clips.
    - ``brn/<layer>/r_max``, ``/d_max``, ``/r_clip_fraction``, ``/d_clip_fraction``.
    - ``grad/block_<i>``: mean |gradient| of each block's conv weight, and
      ``grad/last_over_first``: study 2's gradient magnitude reduction with depth.

    At each validation (or every ``batch_stats_every``-th), ``train_eval/val_acc_batch_stats``:
    the accuracy with the norm layers in training mode (batch statistics of each evaluation
    batch; running statistics restored, parameters untouched), beside ``val/acc`` with running
    statistics. At the end of fit, ``train_eval/val_acc_precise_bn``: the accuracy after PreciseBN
    recalibrates a copy of the model on ``precise_bn_images`` training images; given several
    counts, one fresh copy per count, each logged as ``train_eval/val_acc_precise_bn_<count>``
    and kept in the run record's ``diagnostics.precise_bn_by_images``, and the largest count's
    accuracy is ``train_eval/val_acc_precise_bn`` (Wu & Johnson 2021 vary it, Fig. 4). Both accuracies
    are on a fixed subset: the first ``eval_images`` validation images, in whole evaluation
    batches (with ``val_split: 0``, the first images of the test split); the run record states
    the count as ``diagnostics.eval_images`` and what was measured under
    ``diagnostics.measured``. On several devices both accuracies are measured by rank zero
    alone, on a copy of the network whose norms reduce nothing across processes, over the
    images one device would use (the data module's ``unsharded_dataloader``), so they are the
    figures of one device; PreciseBN's training batches are as large as the batches the norms'
    statistics covered in training (the global batch with ``sync_norms``). The per-step figures
    are those of rank zero's own batch.

    The time the diagnostics take, all their work on the host, is recorded in the run record as
    ``diagnostics.seconds``; on a CPU that is what they cost, on an accelerator the device work
    they queue is not counted.

    Args:
        every_n_steps: log the per-step figures every this many optimizer steps.
        histograms: also log histograms of the running statistics.
        batch_stats_eval: measure accuracy with batch statistics.
        batch_stats_every: measure it at every this-many-th validation of the fit (the first
            validation always).
        eval_images: validation images both accuracies are measured on (the first ones, rounded
            up to whole evaluation batches); None: the whole validation set.
        precise_bn_images: training images, in training batches (rounded up to whole batches), for
            PreciseBN at the end of fit (0: skip); a list measures PreciseBN at each count. fvcore's default of 200 batches is 3,200
            images at batch size 16, and at batch size 128 would cost more forward passes than a
            10,000-image epoch; a fixed image count costs the same at every batch size.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        histograms: bool = True,
        batch_stats_eval: bool = True,
        batch_stats_every: int = 1,
        eval_images: int | None = 500,
        precise_bn_images: int | list[int] = 512,
    ) -> None:
        counts = [precise_bn_images] if isinstance(precise_bn_images, int) else list(precise_bn_images)
        checks = [("every_n_steps", every_n_steps, 1), ("batch_stats_every", batch_stats_every, 1),
                  ("eval_images", 1 if eval_images is None else eval_images, 1)]  # fmt: skip
        checks += [("precise_bn_images", c, 0 if isinstance(precise_bn_images, int) else 1) for c in counts]
        for name, value, least in checks:
            if value < least:
                raise ValueError(
                    f"NormDiagnostics {name}={value} must be >= {least}; "
                    f"set --trainer.callbacks.init_args.{name} to an integer >= {least}"
                )
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self.batch_stats_eval = batch_stats_eval
        self.batch_stats_every = batch_stats_every
        self.eval_images = eval_images
        self.precise_bn_images = precise_bn_images
        self._precise_counts = sorted({c for c in counts if c > 0})
        self.precise_bn_by_images: dict[int, float] = {}  # PreciseBN's accuracy per image count
        self.seconds = 0.0  # host time spent in the diagnostics during this fit
        self._validations = 0  # validations of this fit, sanity check excluded
        self._batch_stats_now = False
        self._armed = False
        self._hooks: list = []
        self._captured: dict[str, dict[str, Tensor]] = {}
        self._grads: list[Tensor] = []
        self._layers: dict[str, nn.Module] = {}
        self._val_source = None  # one device's validation batches, found at the first use in a fit
        self.measured: dict[str, int] = {}
        self._kept: dict[str, list[float]] = {}  # this epoch's per-step figures, for end_of_run
        self._kept_epoch: int | None = None

    # -- hooks on the model ----------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds, self._validations = 0.0, 0
        self._remove_hooks()
        # Found once, after LightningModule.setup has converted norms for several devices.
        self._layers = stat_layers(pl_module)
        for name, layer in self._layers.items():
            self._hooks.append(layer.register_forward_pre_hook(self._capture_hook(name)))
        self._val_source, self.measured = None, {}

    def _capture_hook(self, name: str):
        def hook(layer: nn.Module, args: tuple) -> None:
            if self._armed and layer.training:
                if torch.compiler.is_compiling():
                    # Traced into a compiled graph (--model.compile): no host timer there, and
                    # its cost is then counted in the step.
                    self._captured[name] = batch_running_gap(args[0], layer)
                    return
                with self._timed():
                    self._captured[name] = batch_running_gap(args[0], layer)

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._armed = False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    # -- training steps --------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Only rank zero writes; the other ranks never capture anything.
        self._armed = trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0
        self._step = trainer.global_step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._armed:
            with self._timed():
                self._grads = [
                    c.weight.grad.detach().abs().mean() for c in block_convs(pl_module) if c.weight.grad is not None
                ]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self._armed:
            return
        self._armed = False
        with self._timed():
            try:
                writer = tensorboard_writer(trainer)
                if writer is not None:
                    self._write(writer, pl_module, self._step)
                self._keep(trainer.current_epoch)
            finally:
                self._captured, self._grads = {}, []

    def _keep(self, epoch: int) -> None:
        """Add this step's figures to those of its epoch, as numbers on the host (a step that logs
        reads them anyway), for the run record's end-of-run figures."""
        if self._kept_epoch != epoch:
            self._kept, self._kept_epoch = {}, epoch
        values = {f"{name}/{key}": value for name, figures in self._captured.items() for key, value in figures.items()
                  if key in ("mean_gap", "std_ratio")}  # fmt: skip
        values.update({f"grad/block_{i}": g for i, g in enumerate(self._grads)})
        for key, value in values.items():
            self._kept.setdefault(key, []).append(float(value))

    def end_of_run(self) -> dict[str, Any]:
        """Means over the captures (every ``every_n_steps`` steps) of the last training epoch:
        per norm layer, in depth order, the batch-vs-running ``mean_gap`` and ``std_ratio``; per
        block, the mean |gradient| of its conv weight, and the last block's over the first's."""
        if not self._kept:
            return {}
        mean = {k: statistics.fmean(v) for k, v in self._kept.items()}
        gaps = {name: {key: mean[f"{name}/{key}"] for key in ("mean_gap", "std_ratio") if f"{name}/{key}" in mean}
                for name in self._layers if f"{name}/mean_gap" in mean}  # fmt: skip
        blocks = sorted((k for k in mean if k.startswith("grad/")), key=lambda k: int(k.rsplit("_", 1)[1]))
        grads = [mean[k] for k in blocks]
        out: dict[str, Any] = {"epoch": self._kept_epoch, "captures": max(len(v) for v in self._kept.values())}
        if gaps:
            out["batch_vs_running"] = gaps
        if grads:
            out["grad_per_block"] = grads
            if len(grads) > 1 and grads[0] > 0:
                out["grad_last_over_first"] = grads[-1] / grads[0]
        return out

    def state_dict(self) -> dict[str, Any]:
        # The end-of-run figures so far travel in checkpoints, so that a resumed run ends with
        # the figures of the run never interrupted.
        return {"kept": copy.deepcopy(self._kept), "kept_epoch": self._kept_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._kept = copy.deepcopy(state_dict.get("kept", {}))
        self._kept_epoch = state_dict.get("kept_epoch")

    def _write(self, writer, pl_module: L.LightningModule, step: int) -> None:
        for name, layer in self._layers.items():
            writer.add_scalar(f"running_stats/{name}/mean", layer.running_mean.mean(), step)
            writer.add_scalar(f"running_stats/{name}/var", layer.running_var.mean(), step)
            if self.histograms:
                writer.add_histogram(f"running_stats/{name}/running_mean", layer.running_mean, step)
                writer.add_histogram(f"running_stats/{name}/running_var", layer.running_var, step)
        for name, values in self._captured.items():
            for key, value in values.items():
                group = "brn" if key in ("r_max", "d_max", "r_clip_fraction", "d_clip_fraction") else "batch_vs_running"
                writer.add_scalar(f"{group}/{name}/{key}", value, step)
        for i, g in enumerate(self._grads):
            writer.add_scalar(f"grad/block_{i}", g, step)
        if len(self._grads) > 1:
            writer.add_scalar("grad/last_over_first", self._grads[-1] / self._grads[0], step)

    # -- validation: batch statistics against running statistics -----------------------------

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._batch_stats_now = False
            return
        self._batch_stats_now = self.batch_stats_eval and self._validations % self.batch_stats_every == 0
        self._validations += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._batch_stats_now or not self._layers or not trainer.is_global_zero:
            return
        self._batch_stats_now = False
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
            self.measured["batch_stats_images"] = seen
        # Rank zero alone measures it, on one device's images: the figure of every rank, with
        # nothing to reduce (Lightning's advice to reduce epoch-level figures does not apply).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(" + BATCH_STATS_ACC)
            pl_module.log(BATCH_STATS_ACC, acc, rank_zero_only=True)

    # -- end of fit: PreciseBN --------------------------------------------------------------

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.precise_bn_by_images = {}
        if not self._precise_counts or not self._layers or trainer.datamodule is None:
            return
        if trainer.is_global_zero:
            with self._timed():
                writer = tensorboard_writer(trainer)
                for count in self._precise_counts:
                    acc = self._precise_bn_accuracy(trainer, pl_module, count)
                    if acc is None:
                        return
                    self.precise_bn_by_images[count] = float(acc)
                    keys = [f"{PRECISE_BN_ACC}_{count}"] if len(self._precise_counts) > 1 else []
                    if count == self._precise_counts[-1]:
                        keys.append(PRECISE_BN_ACC)
                    for key in keys:
                        trainer.callback_metrics[key] = acc
                        if writer is not None:
                            writer.add_scalar(key, acc, trainer.global_step)

    # -- one device's subsets, on every number of devices ----------------------------------

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

    def _accuracy(self, net: nn.Module, pl_module: L.LightningModule, batches, after_batch=None) -> tuple[Tensor, int]:
        """(accuracy of ``net`` on the first ``eval_images`` images of ``batches``, in whole
        batches; how many images that was)."""
        device = pl_module.device
        fmt = getattr(pl_module, "memory_format", torch.contiguous_format)
        correct = torch.zeros((), device=device)
        seen = 0
        # In the run's precision, as its validation steps run (bf16-mixed: under autocast).
        with torch.no_grad(), pl_module.trainer.precision_plugin.forward_context():
            for x, y in batches:
                if self.eval_images is not None and seen >= self.eval_images:
                    break
                x = x.to(device)
                # As the module's forward hands inputs to its network.
                pred = net(x.contiguous(memory_format=fmt) if x.dim() == 4 else x).argmax(1)
                correct = correct + (pred == y.to(device)).sum()
                seen += len(y)
                if after_batch is not None:
                    after_batch()
        return correct / max(seen, 1), seen

    @contextmanager
    def _timed(self) -> Iterator[None]:
        """Adds the host time of the block to ``seconds``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def record(self) -> dict[str, Any]:
        """What the run record says of the diagnostics: their time, their subsets as asked and
        as measured (``measured``: images of the last batch-statistics pass, PreciseBN's
        training images and batch size and its validation images), where those come from, and
        the per-step figures of the last epoch (``end_of_run``)."""
        return {"seconds": round(self.seconds, 3), "eval_images": self.eval_images,
                "precise_bn_images": self.precise_bn_images, "measured": dict(self.measured),
                "precise_bn_by_images": {str(k): round(v, 6) for k, v in self.precise_bn_by_images.items()},
                "subsets": SUBSETS, "end_of_run": self.end_of_run()}  # fmt: skip

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
        device = pl_module.device
        fmt = getattr(pl_module, "memory_format", torch.contiguous_format)

        def forward(m: nn.Module, b) -> Tensor:  # as the module's forward hands inputs to its network
            x = b[0].to(device)
            return m(x.contiguous(memory_format=fmt) if x.dim() == 4 else x)

        with trainer.precision_plugin.forward_context():  # the norms' inputs as training saw them
            used = update_bn_stats(net, loader, batches, forward=forward)
        net.eval()
        acc, seen = self._accuracy(net, pl_module, val)
        self.measured.update(precise_bn_train_images=min(used * batch_size, _images(loader)),
                             precise_bn_batch_size=batch_size, precise_bn_val_images=seen)  # fmt: skip
        return acc


def _images(loader) -> int:
    """Images a loader yields in one epoch (its dataset's size, or its targets')."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        return len(dataset)
    targets = getattr(loader, "targets", None)
    return len(targets) if targets is not None else 0


def norm_batch(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """Images one batch statistic of the norms covered in training: the module's norm batch
    when it sets one, else the per-device batch, or the global batch when the norms reduce their
    statistics over all devices (sync_norms)."""
    if getattr(pl_module, "norm_batch", None):
        return int(pl_module.norm_batch)
    per_device = int(getattr(trainer.datamodule, "batch_size", 0) or 1)
    synced = bool(getattr(pl_module, "sync_norms", False)) and trainer.world_size > 1
    return per_device * trainer.world_size if synced else per_device


class ValidateAtStart(L.Callback):
    """Validates once before the first training step, logged at step 0, so that accuracy curves
    start from the untrained network as study 1's do. Lightning's sanity check runs a few
    batches and logs nothing; this is a whole, logged validation.

    A run resumed from a checkpoint taken at a step that is due a validation
    (``val_check_interval`` steps with ``check_val_every_n_epoch: null``) validates there too:
    step checkpoints are saved before that step's validation, and Lightning skips it on resume,
    which would leave a hole in the curve that the uninterrupted run does not have.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        every = trainer.val_check_batch
        due = (
            step > 0
            and trainer.ckpt_path is not None
            and trainer.check_val_every_n_epoch is None
            and isinstance(every, int)
            and step % every == 0
        )
        if (step > 0 and not due) or trainer.sanity_checking:
            return
        # As Lightning's training epoch loop runs it between steps. A whole validation, not the
        # rest of one: the checkpoint's validation progress is that of the previous validation.
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        val_loop.restarting = False
        trainer.validating = True
        try:
            val_loop.run()
        finally:
            trainer.training = True
