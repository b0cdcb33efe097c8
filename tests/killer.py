"""A callback for tests: the process SIGKILLs itself after a given training step, once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


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
