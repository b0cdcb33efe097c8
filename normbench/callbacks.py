"""Diagnostics that read the model and write TensorBoard. They never change training."""

from __future__ import annotations

import lightning as L

from normbench.norms import tracks_running_stats


class RunningStatsLogger(L.Callback):
    """Logs, per layer that tracks running statistics, the mean over channels of
    ``running_mean`` and ``running_var`` at the end of every training epoch, as study 2 prints
    them: ``running_stats/<layer>/mean`` and ``running_stats/<layer>/var``."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = {}
        for name, module in pl_module.named_modules():
            if tracks_running_stats(module):
                layer = name.removeprefix("net.")
                stats[f"running_stats/{layer}/mean"] = module.running_mean.mean()
                stats[f"running_stats/{layer}/var"] = module.running_var.mean()
        if stats:
            pl_module.log_dict(stats, on_step=False, on_epoch=True)
