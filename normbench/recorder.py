"""The run record of a fit and its HParams: ``RunRecorder`` writes ``metrics.json`` (through
``normbench.results``, its one writer) and TensorBoard's HPARAMS tab."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from normbench.callbacks import NormDiagnostics
from normbench.diagnostics.figures import tensorboard_writer
from normbench.diagnostics.train_eval import PRECISE_BN_ACC
from normbench.errors import error_line
from normbench.hparams import experiment_hparams, run_seed, write_run_hparams
from normbench.layout import batch_layout
from normbench.results import (
    DIVERGED,
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    code_revision,
    hardware,
    read_record,
    summary,
    update_record,
)


class RunRecord:
    """One run's record as it grows, the part a lone run (``RunRecorder``) and each run of a pack
    (``normbench.pack``) share: its epoch rows, its validation rows (``evals``, each with its
    ``step``), the sampled training losses (``train_loss_steps``) and its wall time, written to
    ``metrics.json`` in its run directory through ``normbench.results.update_record``."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.losses: list[list[float]] = []
        self.start = 0.0
        self.elapsed = 0.0  # wall time of the attempts before a resume

    def begin(self) -> None:
        """Start the clock, after the attempts before it."""
        self.start = time.time() - self.elapsed

    def add_epoch(self, epoch: int, row: dict[str, float]) -> None:
        """One epoch's figures (once per epoch; nothing when ``row`` is empty)."""
        if row and not any(e["epoch"] == epoch for e in self.epochs):
            self.epochs.append({"epoch": epoch, **row})

    def add_eval(self, step: int, row: dict[str, float]) -> None:
        """One validation's figures at ``step`` optimizer steps; a resumed run may validate again
        at its checkpoint's step: one row per step."""
        self.evals = [e for e in self.evals if e["step"] != step] + [{"step": step, **row}]

    def figures(self, precise_bn: float | None = None) -> dict[str, float]:
        """The end-of-run figures: from every validation, else from the epochs."""
        return summary(self.evals or self.epochs, precise_bn)

    def write(self, run_dir: str | os.PathLike, global_step: int, lr: float | None, seed: int | None,
              **fields: Any) -> None:  # fmt: skip
        """The record so far, with the budget the run took (its optimizer steps and learning
        rate), its seed, its wall time and ``fields``, to ``run_dir``."""
        update_record(run_dir, epochs=self.epochs, evals=self.evals, train_loss_steps=self.losses,
                      global_step=global_step, lr=lr, seed=seed,
                      wall_time_s=round(time.time() - self.start, 3) if self.start else 0.0, **fields)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": copy.deepcopy(self.epochs), "evals": copy.deepcopy(self.evals),
                "train_loss_steps": copy.deepcopy(self.losses), "wall_time_s": time.time() - self.start}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = copy.deepcopy(state_dict["epochs"])
        self.evals = copy.deepcopy(state_dict.get("evals", []))
        self.losses = copy.deepcopy(state_dict.get("train_loss_steps", []))
        self.elapsed = float(state_dict["wall_time_s"])


def log_run_hparams(run_dir: str | os.PathLike, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """A finished run's settings and figures to TensorBoard's HPARAMS tab; a sweep's runs leave
    the experiment summary to the sweep (``normbench.hparams``)."""
    write_run_hparams(run_dir, hparams, metrics, in_sweep="sweep" in read_record(run_dir))


class RunRecorder(L.Callback):
    """Writes the run record, ``metrics.json`` in the run directory, and TensorBoard's HParams.

    The record holds per-epoch metrics, the final and best figures, the seed, the global step,
    the wall time and the status (``running``, ``finished``, ``diverged`` with the step of the
    first NaN or inf loss, ``interrupted`` by Ctrl-C, or ``failed``); it is rewritten atomically
    after every epoch, so an interrupted run keeps what it had. It lies in the run's own directory
    (``run_dir``) in every Lightning mode: under ``fast_dev_run`` Lightning drops the loggers, so
    ``NormBenchCLI`` hands this callback the run's logger and config. The epochs recorded so far
    and the wall time travel in checkpoints, so a resumed run goes on with exactly the record it
    had at its checkpoint. At the end of fit the run's hyperparameters go to the HParams tab with
    ``hparams/val_acc_final``, ``hparams/val_acc_best`` (test-split accuracies under the studies'
    ``val_split: 0``) and the train/eval diagnostics when present.

    For curves against iterations (study 1), the record also holds ``evals``, one row per
    validation with its ``step`` (optimizer steps done), and ``train_loss_steps``, the
    ``[step, loss]`` of the batch trained in every ``trainer.log_every_n_steps``-th step
    (steps 0, n, 2n, ...: that batch's loss before its update; on several devices the global
    batch's, the mean over the ranks), also logged to TensorBoard as ``train/loss_step``. The
    losses stay on the device until the record is written.
    """

    def __init__(self) -> None:
        self._record = RunRecord()
        self._pending_losses: list[tuple[int, Tensor]] = []
        self._restored = False
        self._pending: int | None = None  # an epoch whose training ended but is not collected yet
        self._trainer: L.Trainer | None = None
        # Set by NormBenchCLI: the logger whose log_dir is the run's own directory, also where the
        # Trainer does not hold it (fast_dev_run swaps loggers for a DummyLogger without a
        # directory; logger: false has none), and the run's config where no config.yaml is saved.
        self.logger: Logger | None = None
        self.config: dict[str, Any] | None = None

    def run_dir(self, trainer: L.Trainer) -> str | None:
        """The run's own directory, where the record goes: the run logger's ``log_dir``, else the
        Trainer's. A broadcast from rank zero: every rank must ask."""
        if self.logger is None:
            return trainer.log_dir
        return trainer.strategy.broadcast(self.logger.log_dir)

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints at the end of an epoch are taken after the module logged the epoch's
        # training metrics (monitoring callbacks run last), so that epoch is complete here.
        if self._pending is not None and self._trainer is not None:
            self._collect(self._trainer, self._pending)
        if self._trainer is not None:
            self._flush_losses(self._trainer)
        return self._record.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._record.load_state_dict(state_dict)
        self._restored = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # A killed run resumes from this checkpoint and hides what was logged after it
        # (purge_step), so everything logged before it must be on disk now: TensorBoard's writer
        # drains its queue on its own schedule, and SIGKILL loses what is still queued.
        for lg in trainer.loggers:
            flush = getattr(lg.experiment, "flush", None) if isinstance(lg, TensorBoardLogger) else lg.save
            if callable(flush):
                flush()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._restored:
            self._record = RunRecord()
        self._record.begin()
        self._trainer, self._pending = trainer, None
        self._pending_losses = []
        log_dir = self.run_dir(trainer)
        config_file = os.path.join(log_dir, "config.yaml") if log_dir else ""
        config = yaml.safe_load(Path(config_file).read_text()) if os.path.isfile(config_file) else self.config
        fields: dict[str, Any] = {"config": config, "revision": code_revision(), "hardware": hardware(pl_module.device),
                                  "layout": batch_layout(trainer, pl_module)}  # fmt: skip
        if trainer.ckpt_path:
            fields["resumed_from"] = str(trainer.ckpt_path)
        self._save(trainer, status=RUNNING, **fields)
        # hparams.yaml, written at the first checkpoint, holds what the HPARAMS tab will show.
        self._set_logged_hparams(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = trainer.current_epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        every = trainer.log_every_n_steps
        step = trainer.global_step - 1  # the optimizer step this batch was trained in
        if every and step % every == 0:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, Tensor):
                self._pending_losses.append((step, global_batch_loss(loss, trainer.world_size)))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        step = trainer.global_step
        row = {
            k: _float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("val/", "train_eval/")) and _float(v) is not None
        }
        self._record.add_eval(step, row)
        self._flush_losses(trainer)
        self._save(trainer, status=RUNNING)

    def _flush_losses(self, trainer: L.Trainer) -> None:
        """The losses kept on the device, to the record and TensorBoard: one host sync."""
        if not self._pending_losses:
            return
        steps = [s for s, _ in self._pending_losses]
        values = torch.stack([v.float() for _, v in self._pending_losses]).tolist()
        self._pending_losses = []
        writer = tensorboard_writer(trainer) if trainer.is_global_zero else None
        for step, value in zip(steps, values):
            self._record.losses.append([step, value])
            if writer is not None:
                writer.add_scalar("train/loss_step", value, step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has aggregated the previous epoch's train and val metrics by now.
        if self._pending is not None:
            self._collect(trainer, self._pending)
            self._save(trainer, status=RUNNING)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Ctrl-C leaves a run to resume (--ckpt_path last); an error is a failure, said in one line.
        self._flush_losses(trainer)
        if isinstance(exception, KeyboardInterrupt):
            self._save(trainer, status=INTERRUPTED)
            # Whether --ckpt_path last has a checkpoint to continue from: said after Ctrl-C.
            run_dir = self.run_dir(trainer)
            exception.resumable = bool(run_dir) and os.path.isfile(os.path.join(run_dir, "checkpoints", "last.ckpt"))
        else:
            self._save(trainer, status=FAILED, error=error_line(exception))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        diverged_at = getattr(pl_module, "diverged_at", None)
        # A run stopped mid-epoch (diverged) has no complete last epoch to collect.
        if self._pending is not None and diverged_at is None:
            self._collect(trainer, self._pending)
        self._flush_losses(trainer)
        # Every validation, also those between epoch ends (val_check_interval), else the epochs.
        metrics = self._record.figures(_float(trainer.callback_metrics.get(PRECISE_BN_ACC)))
        if diverged_at is not None:
            self._save(trainer, status=DIVERGED, diverged_at_step=diverged_at, **metrics)
            return
        self._save(trainer, status=FINISHED, **metrics)
        self._log_hparams(trainer, pl_module, metrics)

    def _collect(self, trainer: L.Trainer, epoch: int) -> None:
        self._pending = None
        row = {k: _float(v) for k, v in trainer.callback_metrics.items() if "/" in k and _float(v) is not None}
        self._record.add_epoch(epoch, row)

    def _save(self, trainer: L.Trainer, **fields: Any) -> None:
        # The run directory is a broadcast: every rank must ask for it, only rank zero writes.
        log_dir = self.run_dir(trainer)
        if log_dir is None or not trainer.is_global_zero:
            return
        diagnostics = [cb.record() for cb in trainer.callbacks if isinstance(cb, NormDiagnostics)]
        if diagnostics:
            fields.setdefault("diagnostics", diagnostics[0])
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        self._record.write(log_dir, trainer.global_step, lr, run_seed(), **fields)

    @rank_zero_only
    def _set_logged_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.hparams.update(experiment_hparams(trainer, pl_module))

    @rank_zero_only
    def _log_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                log_run_hparams(lg.log_dir, experiment_hparams(trainer, pl_module), metrics)


def global_batch_loss(loss: Tensor, world_size: int) -> Tensor:
    """The loss of the step's global batch, from this rank's ``loss`` (the mean over its share):
    on several processes the mean of the ranks' losses, every rank's share of a training batch
    being as large (``normbench.orders.EpochOrder``), so that ``train_loss_steps`` is the loss
    one device takes on the same batch, not rank zero's half. A collective (every rank calls it
    at the same steps), a plain all-reduce on the device: no barrier, no host read.

    Args:
        loss: this rank's training loss of the step.
        world_size: the processes that train.
    """
    loss = loss.detach()
    if world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return loss
    total = loss.clone()
    torch.distributed.all_reduce(total)
    return total / world_size


def _float(value: Any) -> float | None:
    if isinstance(value, Tensor):
        return float(value.detach().float().cpu()) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None
