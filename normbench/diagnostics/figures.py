"""Per-step figures of the norm layers in TensorBoard (``StepFigures``): running statistics,
how far each batch's statistics stray from them, BRN's limits and clipping, and the gradient
magnitude per block; their means over the last epoch go to the run record."""

from __future__ import annotations

import copy
import statistics
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from normbench.diagnostics.timing import Timed
from normbench.norms import BatchRenorm, tracks_running_stats


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


class StepFigures(Timed, L.Callback):
    """Every ``every_n_steps`` training steps, on the batch just trained on (captured by forward
    pre-hooks that return at once on other steps), rank zero writes:

    - ``running_stats/<layer>/mean``, ``/var``: mean over channels of running_mean and
      running_var (as study 2 prints them), and their histograms.
    - ``batch_vs_running/<layer>/mean_gap``, ``/std_ratio``: mean over channels of
      |mu_B - mu_run| / sigma_run and sigma_B / sigma_run, what BRN clips.
    - ``brn/<layer>/r_max``, ``/d_max``, ``/r_clip_fraction``, ``/d_clip_fraction``.
    - ``grad/block_<i>``: mean |gradient| of each block's conv weight, and
      ``grad/last_over_first``: study 2's gradient magnitude reduction with depth.

    ``end_of_run()`` gives their means over the last epoch, for the run record.

    Args:
        every_n_steps: log the figures every this many optimizer steps.
        histograms: also log histograms of the running statistics.
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = True) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self._armed = False
        self._hooks: list = []
        self._captured: dict[str, dict[str, Tensor]] = {}
        self._grads: list[Tensor] = []
        self._layers: dict[str, nn.Module] = {}
        self._kept: dict[str, list[float]] = {}  # this epoch's per-step figures, for end_of_run
        self._kept_epoch: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = 0.0
        self._remove_hooks()
        # Found once, after LightningModule.setup has converted norms for several devices.
        self._layers = stat_layers(pl_module)
        for name, layer in self._layers.items():
            self._hooks.append(layer.register_forward_pre_hook(self._capture_hook(name)))

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
