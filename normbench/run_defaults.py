"""What a run gets that its config does not say: the default callbacks (checkpoints, the
progress bar), added to a config before its classes are built, each replaced by the user's own
callbacks or switches as Lightning's are; and the warnings of Lightning's that a run does not
print, as they say nothing a user can act on.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from jsonargparse import Namespace

from normbench.devices import world_size
from normbench.predictions import check_one_process

PROGRESS_BAR = "lightning.pytorch.callbacks.TQDMProgressBar"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
PREDICTION_WRITER = "normbench.predictions.PredictionWriter"
PROGRESS_REFRESH = 20  # steps between progress-bar redraws


def add_default_callbacks(config: Namespace, checkpoint_every_n_steps: int, subcommand: str | None = "fit") -> None:
    """Add the default callbacks to a command's config.

    last.ckpt at the end of every training epoch (after the epoch's metrics are logged, so that
    the run record in it is complete) and every ``checkpoint_every_n_steps`` steps and, where
    validation is a split of the training set, the best checkpoint by validation accuracy. With
    ``val_split: 0`` validation is the official test split (the studies' protocol), and nothing is
    selected on it. None in a ``fast_dev_run``, whose checkpointing Lightning means to suppress
    (``save_last`` would still write one at the end): a development run leaves nothing to resume
    from. A progress bar that redraws every ``PROGRESS_REFRESH`` steps. For ``predict``, a
    ``PredictionWriter`` (``predictions.csv`` in the run directory) unless the config names a
    prediction writer of its own.

    Args:
        config: the command's config (``trainer``, ``data``), changed in place.
        checkpoint_every_n_steps: steps between mid-epoch refreshes of last.ckpt (0: none).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
    """
    trainer = config.trainer
    if subcommand == "predict" and not any(callback_name(c).endswith("Writer") for c in trainer.callbacks or []):
        check_one_process(world_size(trainer))  # said before any process starts, as the writer would
        append_callback(config, PREDICTION_WRITER)
    dev_run = bool(trainer.fast_dev_run)
    if not dev_run:
        best = {"monitor": "val/acc", "mode": "max", "filename": "best-{epoch}"}
        if not selects_on_validation(config):
            best = {"save_top_k": 0}
        add_default(config, "enable_checkpointing", CHECKPOINT, **best, save_last=True,
                    save_on_train_epoch_end=True, enable_version_counter=False)  # fmt: skip
    if not dev_run and checkpoint_every_n_steps and not has_periodic_checkpoint(config):
        # last.ckpt in the middle of epochs too: at batch size 2 an epoch is 25,000 steps. Both
        # write last.ckpt; without the version counter they replace it, not add last-v1.ckpt.
        append_callback(config, CHECKPOINT, every_n_train_steps=int(checkpoint_every_n_steps),
                        save_top_k=0, save_last=True, enable_version_counter=False)  # fmt: skip
    # Lightning's bar redraws every step; at batch size 2 that is thousands a second.
    add_default(config, "enable_progress_bar", PROGRESS_BAR, refresh_rate=PROGRESS_REFRESH, leave=False)


def callback_name(callback: Any) -> str:
    """The class name of a configured callback (``ModelCheckpoint``), from a config entry
    (``{class_path: ..., init_args: ...}``), a class path or an instance."""
    if isinstance(callback, L.Callback):
        return type(callback).__name__
    return str(getattr(callback, "class_path", callback)).rsplit(".", 1)[-1]


def selects_on_validation(config: Namespace) -> bool:
    """Whether a checkpoint may be chosen by validation accuracy: not when the data module
    validates on the official test split (normbench's ``val_split: 0``); a data module without
    ``val_split`` is the user's own, its validation set theirs to choose."""
    init_args = getattr(config.data, "init_args", None) or Namespace()
    return getattr(init_args, "val_split", None) != 0


def add_default(config: Namespace, switch: str, class_path: str, **init_args) -> None:
    """Append callback ``class_path`` unless ``trainer.<switch>`` is false or a callback of
    that kind is configured already."""
    callbacks = config.trainer.callbacks or []
    # A callback of the kind: TQDMProgressBar's switch is also off with a RichProgressBar.
    kind = callback_name(class_path).removeprefix("TQDM")
    if config.trainer[switch] is False or any(callback_name(c).endswith(kind) for c in callbacks):
        return
    append_callback(config, class_path, **init_args)


def append_callback(config: Namespace, class_path: str, **init_args) -> None:
    """Append callback ``class_path`` with ``init_args`` to the config's trainer callbacks."""
    callbacks = config.trainer.callbacks or []
    config.trainer.callbacks = [*callbacks, Namespace(class_path=class_path, init_args=Namespace(**init_args))]


def has_periodic_checkpoint(config: Namespace) -> bool:
    """Whether checkpointing is off or a ModelCheckpoint already saves every N steps."""
    if config.trainer.enable_checkpointing is False:
        return True
    return any(
        callback_name(c) == "ModelCheckpoint" and getattr(getattr(c, "init_args", None), "every_n_train_steps", None)
        for c in config.trainer.callbacks or []
    )


# Lightning's own batch flattening (lightning 2.6 with the torch it installs now) warns at a fit's
# first batch about torch API it calls itself: nothing a user can change.
LIGHTNING_INTERNAL_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
# An evaluation from a checkpoint (validate, test, predict): Lightning warns that the run's
# ModelCheckpoint will not reload its best-k bookkeeping (its directory is a new version), and
# that callbacks whose state the checkpoint holds (NormDiagnostics, a ModelCheckpoint of other
# settings) are missing. An evaluation trains nothing and saves no checkpoint: neither matters.
EVALUATION_WARNINGS = (r"The dirpath has changed from ", r"Be aware that when using `ckpt_path`, callbacks used to")


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


@contextmanager
def lightning_internal_warnings_ignored() -> Iterator[None]:
    """Ignore ``LIGHTNING_INTERNAL_WARNINGS`` in the body: a fit in this process, wherever it
    started (the shell, a sweep's worker, a pack); and Lightning's advertisements of its cloud
    services (``💡 Tip: ... install litlogger``, at every fit), which its logger leaves out."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    outermost = _not_a_tip not in tips.filters  # a scope inside another leaves the filter to it
    tips.addFilter(_not_a_tip)
    try:
        with warnings.catch_warnings():
            for message in LIGHTNING_INTERNAL_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            yield
    finally:
        if outermost:
            tips.removeFilter(_not_a_tip)
