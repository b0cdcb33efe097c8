"""Diagnostics that read the model and write TensorBoard (``NormDiagnostics``, made of the
one-concern callbacks of ``normbench.diagnostics``), and study 1's validation before the first
step (``ValidateAtStart``). They never change training: every state they touch (mode, buffers,
hooks) is put back in a ``finally``, and steps that do not log cost no host sync."""

from __future__ import annotations

from typing import Any

import lightning as L
from jsonargparse.typing import NonNegativeInt, PositiveInt

from normbench.diagnostics.figures import StepFigures
from normbench.diagnostics.train_eval import SUBSETS, BatchStatsAccuracy, PreciseBNAccuracy
from normbench.options import check_restricted, plain

# The Lightning hooks NormDiagnostics hands to its parts, in the parts' order.
HOOKS = ("on_fit_start", "on_fit_end", "on_exception", "on_train_batch_start", "on_before_optimizer_step",
         "on_train_batch_end", "on_validation_epoch_start", "on_validation_epoch_end", "on_train_end")  # fmt: skip


class NormDiagnostics(L.Callback):
    """Why a norm wins or loses, in TensorBoard: ``StepFigures``, ``BatchStatsAccuracy`` and
    ``PreciseBNAccuracy`` (``normbench.diagnostics``) as one callback, each Lightning hook handed
    to them in that order; the run record's ``diagnostics`` joins what they say.

    Every ``every_n_steps`` training steps, the per-step figures of the norm layers and the
    gradient per block (``running_stats/``, ``batch_vs_running/``, ``brn/``, ``grad/``; the list
    is ``StepFigures``').

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
        every_n_steps: PositiveInt = 50,
        histograms: bool = True,
        batch_stats_eval: bool = True,
        batch_stats_every: PositiveInt = 1,
        eval_images: PositiveInt | None = 500,
        precise_bn_images: NonNegativeInt | list[PositiveInt] = 512,
    ) -> None:
        check_restricted(NormDiagnostics.__init__, locals(), "trainer.callbacks.init_args")
        every_n_steps, batch_stats_every, eval_images = plain(every_n_steps, batch_stats_every, eval_images)
        counts = [
            int(c) for c in ([precise_bn_images] if not isinstance(precise_bn_images, list) else precise_bn_images)
        ]
        precise_bn_images = counts[0] if not isinstance(precise_bn_images, list) else counts
        self.eval_images = eval_images
        self.precise_bn_images = precise_bn_images
        self.figures = StepFigures(every_n_steps, histograms)
        self.batch_stats = BatchStatsAccuracy(eval_images, batch_stats_every) if batch_stats_eval else None
        self.precise_bn = PreciseBNAccuracy([c for c in counts if c > 0], eval_images) if any(counts) else None
        self.parts: list[L.Callback] = [p for p in (self.figures, self.batch_stats, self.precise_bn) if p is not None]

    @property
    def seconds(self) -> float:
        """Host time the diagnostics spent during this fit."""
        return sum(part.seconds for part in self.parts)

    @property
    def precise_bn_by_images(self) -> dict[int, float]:
        """PreciseBN's accuracy per image count (empty when it did not run)."""
        return dict(self.precise_bn.by_images) if self.precise_bn is not None else {}

    def end_of_run(self) -> dict[str, Any]:
        return self.figures.end_of_run()

    def state_dict(self) -> dict[str, Any]:
        return self.figures.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.figures.load_state_dict(state_dict)

    def record(self) -> dict[str, Any]:
        """What the run record says of the diagnostics: their time, their subsets as asked and
        as measured (``measured``: images of the last batch-statistics pass, PreciseBN's
        training images and batch size and its validation images, and ``val_images``, the size of
        the validation set they are part of), where those come from,
        PreciseBN's accuracy per image count, and the per-step figures of the last epoch
        (``end_of_run``)."""
        measured = {k: v for part in self.parts for k, v in getattr(part, "measured", {}).items()}
        return {"seconds": round(self.seconds, 3), "eval_images": self.eval_images,
                "precise_bn_images": self.precise_bn_images, "measured": measured,
                "precise_bn_by_images": {str(k): round(v, 6) for k, v in self.precise_bn_by_images.items()},
                "subsets": SUBSETS, "end_of_run": self.end_of_run()}  # fmt: skip


def _handing(name: str):
    def hook(self: NormDiagnostics, *args: Any, **kwargs: Any) -> None:
        for part in self.parts:
            getattr(part, name)(*args, **kwargs)

    hook.__name__ = name
    hook.__doc__ = f"Lightning's ``{name}``, handed to each part."
    return hook


for _name in HOOKS:
    setattr(NormDiagnostics, _name, _handing(_name))


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
