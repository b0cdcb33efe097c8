"""Callbacks for tests: the process SIGKILLs itself after a given training step, once; a slow disk."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L


def terminal_job() -> None:
    """``preexec_fn`` of a command a test Ctrl-Cs: SIGINT at its default disposition, as in a
    terminal's foreground job, which Python turns into KeyboardInterrupt. A test process started
    in the background of a non-interactive shell (``cmd &``, nohup, a CI runner's step) passes
    SIGINT on ignored, and Python leaves an ignored SIGINT ignored: the run would finish."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class KillAtStep(L.Callback):
    """SIGKILL this process right after optimizer step ``step`` (no cleanup, as a power cut),
    unless ``marker`` exists; the marker is written first, so a rerun goes through.

    Args:
        step: the global step after which to die.
        marker: file that records the kill.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAtStep(KillAtStep):
    """Like ``KillAtStep``, with SIGINT: the user's Ctrl-C."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGINT)


class SlowEventFile(L.Callback):
    """A slow disk under TensorBoard: each event record takes ``seconds`` to reach the file, so
    that events are still queued in the writer whenever the process dies.

    Args:
        seconds: time to write one record.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def setup(self, trainer, pl_module, stage: str) -> None:
        records = trainer.logger.experiment.file_writer.event_writer._async_writer._writer
        write = records.write

        def slow(data: bytes) -> None:
            time.sleep(self.seconds)
            write(data)

        records.write = slow


class KillAfterCheckpoint(KillAtStep):
    """SIGKILL this process as the batch after step ``step`` starts: right after the checkpoint of
    step ``step``, before anything else is logged."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


class CtrlCAtStep(KillAtStep):
    """A terminal's Ctrl-C: SIGINT to the whole process group (the sweep and all its workers),
    after step ``step``, once every one of ``runs`` runs has passed step ``ready_step``, so that
    all of them are mid-training when it arrives.

    Args:
        step: the global step after which to press Ctrl-C.
        marker: file that records it; ``<marker>.<pid>`` says a run has passed ``ready_step``.
        runs: how many runs must be that far first.
        ready_step: the step each run must have passed; 0: started training. Past a checkpoint's
            step, every run has a checkpoint to resume from when the Ctrl-C arrives.
    """

    def __init__(self, step: int, marker: str, runs: int, ready_step: int = 0) -> None:
        super().__init__(step, marker)
        self.runs, self.ready_step = runs, ready_step

    def _ready(self) -> None:
        Path(f"{self.marker}.{os.getpid()}").touch()

    def on_train_start(self, trainer, pl_module) -> None:
        if self.ready_step == 0:
            self._ready()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ready_step and trainer.global_step == self.ready_step:
            self._ready()
        if trainer.global_step == self.step and not self.marker.exists():
            deadline = time.time() + 120
            while len(list(self.marker.parent.glob(f"{self.marker.name}.*"))) < self.runs and time.time() < deadline:
                time.sleep(0.05)
            self.marker.write_text(str(os.getpid()))
            os.killpg(os.getpgid(0), signal.SIGINT)


class RaiseAtStep(L.Callback):
    """A callback with a bug: raises ``RuntimeError`` right after optimizer step ``step``.

    Args:
        step: the global step after which to raise.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"callback bug at step {self.step}")


class RaiseOnceAtStep(KillAtStep):
    """Like ``KillAtStep``, raising ``RuntimeError`` in place of the kill: the run fails (its
    cleanup runs), and a rerun goes through."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            raise RuntimeError(f"raised once at step {self.step}")


class KillEveryRankAtStep(L.Callback):
    """SIGKILL every process of a run before training step ``step`` starts (after the
    checkpoint of the step before), as a machine that goes down takes every rank.

    Args:
        step: the global step before which to die.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveWeightsAtStart(L.Callback):
    """The module's state as training starts (after a resumed checkpoint is loaded and the
    precision plugin has converted the module), saved to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.path)
