"""Sweep runs that differ only in their seed, trained as one pack (``normbench sweep --pack``).

Each run of the pack is built exactly as ``normbench fit`` builds it alone (its config parsed by
the same CLI, its model initialized after its own ``seed_everything``, its data order from its
own seed), then the K networks train in one process and one step through
``normbench.packed_runs.PackedRuns``. Each run keeps its own metrics, TensorBoard run, HPARAMS entry and
run record (``normbench.recorder.RunRecord``, as a lone run's ``RunRecorder`` keeps it) in its own
run directory, as if it had run alone; a run whose loss turns NaN or inf is recorded as diverged
at that step while the others go on (nothing couples the runs).

A pack has no checkpoints of its own: an interrupted pack runs again from the start. Trainer
callbacks of the runs' configs that only observe (NormDiagnostics) are not run for packed runs;
their records and TensorBoard runs hold the loss and accuracy curves. A run whose config sets
anything else a pack would not apply (a learning-rate scheduler, gradient clipping, any Trainer
setting outside ``TRAINER_KEYS``, a callback that acts on training) is refused with a one-line
error naming the setting, so that a pack trains exactly the runs it stands for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import Tensor, nn
from torchmetrics import MaxMetric

from normbench.cli import NormBenchCLI
from normbench.devices import world_size
from normbench.hparams import experiment_hparams
from normbench.layout import batch_layout
from normbench.loaders import PackedLoader
from normbench.packed_runs import PackedRuns, packed_losses
from normbench.recorder import RunRecord, log_run_hparams
from normbench.results import DIVERGED, FINISHED, RUNNING, code_revision, hardware
from normbench.run_defaults import callback_name
from normbench.seeding import seed_everything
from normbench.steps import classification_metrics, note_first_nonfinite

# Trainer settings a pack takes from its runs' configs (all equal within a pack).
TRAINER_KEYS = ("max_epochs", "max_steps", "accelerator", "limit_train_batches", "limit_val_batches",
                "deterministic", "precision", "check_val_every_n_epoch", "log_every_n_steps")  # fmt: skip
# Trainer settings that do not change what a run trains: the pack sets its own (one device, its
# own logging, no checkpoints, no progress bar or sanity check) and the records say the same.
TRAINER_OWN = ("devices", "logger", "callbacks", "default_root_dir", "enable_checkpointing", "enable_progress_bar",
               "enable_model_summary", "num_sanity_val_steps")  # fmt: skip
# Callbacks that only observe or save (the pack does not run them; see the module docstring).
CALLBACKS_OBSERVING = ("NormDiagnostics", "ModelCheckpoint", "TQDMProgressBar", "RichProgressBar", "RunRecorder")


def unpackable(config, defaults) -> str | None:
    """The first setting of a run's parsed config that a pack would not apply, as
    ``key=value``, or None when the pack trains exactly this run.

    Args:
        config: the run's config as ``NormBenchCLI``'s parser gives it (no subcommand).
        defaults: that parser's defaults.
    """
    if config.model.get("lr_scheduler") is not None:
        return f"model.lr_scheduler={config.model.lr_scheduler.class_path}"
    if config.model.get("compile"):
        return f"model.compile={str(config.model.compile).lower()}"  # a pack runs its networks under vmap, uncompiled
    for key in ("agc", "freeze_norms_after", "norm_batch"):  # the module's own training hooks and layers
        if config.model.get(key) is not None:
            return f"model.{key}={config.model[key]}"
    if world_size(config.trainer) > 1:
        # A pack trains on one device: on several, each run alone would step on a global batch.
        return f"trainer.devices={config.trainer.devices} and trainer.num_nodes={config.trainer.num_nodes}"
    for key, value in config.trainer.items():
        if "." in key or key in TRAINER_KEYS or key in TRAINER_OWN:
            continue
        if value != defaults.trainer.get(key):
            return f"trainer.{key}={value}"
    for callback in config.trainer.callbacks or []:
        if callback_name(callback) not in CALLBACKS_OBSERVING:
            return f"trainer.callbacks: {getattr(callback, 'class_path', callback)}"
    return None


def check_packable(config, defaults, run: str) -> None:
    """Raise a one-line ValueError when run ``run`` sets something a pack would not apply."""
    setting = unpackable(config, defaults)
    if setting is not None:
        raise ValueError(
            f"sweep --pack: run {run} sets {setting}, which packed runs do not apply; "
            "run the sweep with --pack false, or drop that setting"
        )


class PackedModule(L.LightningModule):
    """K runs of one NormBenchModule configuration in one step, with per-run metrics: each run
    has the module's own torchmetrics (its accuracy and image-weighted mean loss, on the device),
    its own record of the first step whose loss was NaN or inf, and its own ``RunRecord`` (the
    record a lone run's ``RunRecorder`` keeps: epochs, validations, sampled training losses).

    Args:
        modules: the K runs' modules, built alone (same configuration, own initialization).
        run_dirs: each run's run directory, where its record is written.
        loggers: each run's TensorBoard logger (or None).
        seeds: each run's seed.
    """

    def __init__(self, modules: list[nn.Module], run_dirs: list[str], loggers: list[Any], seeds: list[int]) -> None:
        super().__init__()
        self.k = len(modules)
        self.packed = PackedRuns([m.net for m in modules])
        self.optimizer_factory = modules[0].optimizer_factory
        self.run_dirs, self.run_loggers, self.seeds = run_dirs, loggers, seeds
        num_classes = modules[0].hparams.num_classes
        for split in ("train", "val"):
            pairs = [classification_metrics(num_classes) for _ in range(self.k)]
            setattr(self, f"{split}_acc", nn.ModuleList(acc for acc, _ in pairs))
            setattr(self, f"{split}_loss", nn.ModuleList(loss for _, loss in pairs))
        self.register_buffer("first_nonfinite", torch.full((self.k,), -1, dtype=torch.long), persistent=False)
        self.val_acc_best = nn.ModuleList(MaxMetric() for _ in range(self.k))  # best so far, as the module's
        self.records = [RunRecord() for _ in range(self.k)]
        self._pending_losses: list[tuple[int, Tensor]] = []  # (step, the K runs' losses), on the device
        self._val_done = False

    def _update(self, split: str, logits: Tensor, y: Tensor) -> Tensor:
        """Add one batch of every run, logits (K, B, classes) and y (K, B), to the split's
        metrics; returns each run's mean loss, (K,)."""
        losses = packed_losses(logits, y)
        detached = logits.detach()
        for run in range(self.k):
            getattr(self, f"{split}_loss")[run].update(losses[run].detach())
            getattr(self, f"{split}_acc")[run].update(detached[run], y[run])
        return losses.mean(1)

    def _compute_and_reset(self, split: str) -> tuple[list[float], list[float]]:
        """(per-run mean loss, per-run accuracy) of the split so far; the metrics start again."""
        figures = []
        for name in ("loss", "acc"):
            metrics = getattr(self, f"{split}_{name}")
            figures.append(torch.stack([m.compute() for m in metrics]).tolist())
            for m in metrics:
                m.reset()
        return figures[0], figures[1]

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        per_run = self._update("train", self.packed(x), y)
        note_first_nonfinite(self.first_nonfinite, per_run, self.global_step)
        every = self.trainer.log_every_n_steps
        if every and self.global_step % every == 0:  # as RunRecorder samples a lone run's losses
            self._pending_losses.append((self.global_step, per_run.detach()))
        # The sum over runs: each run's gradient is its own mean loss's.
        return per_run.sum()

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self._update("val", self.packed(x, shared_input=True), y.expand(self.k, -1))

    def on_validation_epoch_end(self) -> None:
        self._val_done = not self.trainer.sanity_checking
        if self.trainer.sanity_checking:
            self._compute_and_reset("val")

    def _flush_losses(self, diverged: list[int]) -> None:
        """The sampled losses to each run's record and TensorBoard run: one host sync; none after
        the step a run diverged at (alone, it would have stopped there)."""
        if not self._pending_losses:
            return
        steps = [step for step, _ in self._pending_losses]
        values = torch.stack([v.float() for _, v in self._pending_losses]).tolist()
        self._pending_losses = []
        for step, row in zip(steps, values):
            for k, value in enumerate(row):
                if diverged[k] < 0 or step <= diverged[k]:
                    self.records[k].losses.append([step, value])
                    if self.run_loggers[k] is not None:
                        self.run_loggers[k].log_metrics({"train/loss_step": value}, step=step)

    def on_train_epoch_end(self) -> None:
        diverged = self.first_nonfinite.tolist()
        self._flush_losses(diverged)
        train_loss, train_acc = self._compute_and_reset("train")
        val_loss, val_acc = self._compute_and_reset("val") if self._val_done else (None, None)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        for k in range(self.k):
            row: dict[str, float] = {"train/loss": train_loss[k], "train/acc": train_acc[k]}
            if val_acc is not None:
                self.val_acc_best[k].update(val_acc[k])
                best = self.val_acc_best[k].compute().item()
                val_row = {"val/loss": val_loss[k], "val/acc": val_acc[k], "val/acc_best": best}
                row.update(val_row)
            if diverged[k] >= 0:
                continue  # alone, a diverged run stops there: its record ends before that epoch
            if val_acc is not None:
                self.records[k].add_eval(self.global_step, val_row)
            self.records[k].add_epoch(self.current_epoch, row)
            if self.run_loggers[k] is not None:
                self.run_loggers[k].log_metrics(row, step=self.global_step)
            self.records[k].write(self.run_dirs[k], self.global_step, lr, self.seeds[k], status=RUNNING)
        self._val_done = False
        if all(step >= 0 for step in diverged):
            self.trainer.should_stop = True

    def configure_optimizers(self):
        # Elementwise optimizers on the stacked tensors are K independent optimizers.
        return self.optimizer_factory(self.packed.parameters())


def fit_pack(cells: list[Any]) -> None:
    """Train the cells (identical but for ``seed_everything``) as one pack and write each run's
    record, TensorBoard events and HParams in its own run directory, as ``RunRecorder`` writes a
    lone run's.

    Args:
        cells: ``normbench.sweep.Cell`` objects.
    """
    clis = [NormBenchCLI(args=cell.args[1:], run=False) for cell in cells]  # each seeds, then builds its model
    first = clis[0].config
    defaults = clis[0].parser.get_defaults()
    for cli, cell in zip(clis, cells, strict=True):
        check_packable(cli.config, defaults, cell.name)
    # One device per pack (check_packable refuses more): the worker's own, device 0 of those
    # it sees (CUDA_VISIBLE_DEVICES), or the device a list of one names.
    trainer = L.Trainer(
        **{k: first.trainer[k] for k in TRAINER_KEYS if first.trainer.get(k) is not None},
        devices=first.trainer.devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(Path(cells[0].run_dir).parents[2]),
    )
    loaders = []
    for cli in clis:
        dm = cli.datamodule
        dm.trainer = trainer  # the device its in-memory data goes to
        dm.prepare_data()
        dm.setup("fit")
        seed_everything(cli.config.seed_everything)  # the run's own data order, as alone
        loaders.append(dm.train_dataloader())
    val_loader = clis[0].datamodule.val_dataloader()
    loggers = [cli.trainer.logger for cli in clis]
    run_dirs = [cell.run_dir for cell in cells]
    seeds = [cli.config.seed_everything for cli in clis]
    module = PackedModule([cli.model for cli in clis], run_dirs, loggers, seeds)
    for index, (cli, run_dir, record) in enumerate(zip(clis, run_dirs, module.records, strict=True)):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        config = cli.parser.dump(cli.config, skip_none=False)
        (Path(run_dir) / "config.yaml").write_text(config)
        record.begin()
        record.write(run_dir, 0, None, seeds[index], status=RUNNING, config=yaml.safe_load(config),
                     revision=code_revision(), layout=batch_layout(trainer, cli.model, cli.datamodule),
                     packed={"runs": [c.name for c in cells], "index": index})  # fmt: skip
    trainer.fit(module, train_dataloaders=PackedLoader(loaders), val_dataloaders=val_loader)
    diverged = module.first_nonfinite.tolist()
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    for k, (cli, run_dir, record) in enumerate(zip(clis, run_dirs, module.records, strict=True)):
        metrics = record.figures()
        if diverged[k] >= 0:
            # Where it would have stopped alone.
            record.write(run_dir, diverged[k] + 1, lr, seeds[k], status=DIVERGED, diverged_at_step=diverged[k],
                         hardware=hardware(module.device), **metrics)  # fmt: skip
        else:
            record.write(run_dir, trainer.global_step, lr, seeds[k], status=FINISHED,
                         hardware=hardware(module.device), **metrics)  # fmt: skip
            hparams = experiment_hparams(trainer, cli.model, cli.datamodule, seeds[k])
            if loggers[k] is not None:
                loggers[k].hparams.update(hparams)  # hparams.yaml (written at finalize), as a lone run's
            log_run_hparams(run_dir, hparams, metrics)
        if loggers[k] is not None:
            loggers[k].finalize("success")
