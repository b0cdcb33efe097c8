"""``normbench fit|validate|test|predict``: LightningCLI over the module and the data modules."""

from __future__ import annotations

import os
import sys

from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningCLI

from normbench.callbacks import RunRecorder
from normbench.data import ImageDataModule, dataset_name
from normbench.module import NormBenchModule

LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
PROGRESS_BAR = "lightning.pytorch.callbacks.TQDMProgressBar"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
PROGRESS_REFRESH = 20  # steps between progress-bar redraws


def run_name(config: Namespace) -> str:
    """The readable run name, e.g. ``cifar100_brn_bs2``: the same words as the configs."""
    dataset = dataset_name(config.data.class_path)
    net = "" if config.model.net == "seed_cnn" else f"{config.model.net}_"
    return f"{dataset}_{net}{config.model.norm}_bs{config.data.init_args.batch_size}"


class NormBenchCLI(LightningCLI):
    """LightningCLI that links the dataset's classes and channels into the model and names
    each run directory after its experiment: ``lightning_logs/<name>/version_N``."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        super().__init__(
            NormBenchModule,
            ImageDataModule,
            subclass_mode_data=True,
            trainer_defaults={"callbacks": [RunRecorder()]},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--name",
            type=str | None,
            default=None,
            help="Run directory under lightning_logs/ (default: <dataset>_<norm>_bs<batch_size>)",
        )
        parser.add_argument(
            "--version",
            type=int | str | None,
            default=None,
            help="Version folder under the run directory (default: the next free version_N)",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")

    @staticmethod
    def _add_default(config: Namespace, switch: str, class_path: str, **init_args) -> None:
        """Append callback ``class_path`` unless ``trainer.<switch>`` is false or a callback of
        that kind is configured already."""
        callbacks = config.trainer.callbacks or []
        kind = class_path.rsplit(".", 1)[-1].removeprefix("TQDM")
        if config.trainer[switch] is False or any(kind in str(getattr(c, "class_path", "")) for c in callbacks):
            return
        config.trainer.callbacks = [*callbacks, Namespace(class_path=class_path, init_args=Namespace(**init_args))]

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # Defaults that the user's own callbacks or switches replace, as Lightning's do.
        # The last checkpoint to resume from, and the best by the validation accuracy.
        self._add_default(config, "enable_checkpointing", CHECKPOINT, monitor="val/acc", mode="max",
                          save_last=True, filename="best-{epoch}")  # fmt: skip
        # Lightning's bar redraws every step; at batch size 2 that is thousands a second.
        self._add_default(config, "enable_progress_bar", PROGRESS_BAR, refresh_rate=PROGRESS_REFRESH, leave=False)
        if config.trainer.logger in (None, True):
            root = config.trainer.default_root_dir or "."
            config.trainer.logger = Namespace(
                class_path=LOGGER,
                init_args=Namespace(
                    save_dir=os.path.join(root, "lightning_logs"),
                    name=config.name or run_name(config),
                    version=config.version,
                    default_hp_metric=False,
                ),
            )


def main(args: ArgsType = None) -> None:
    """The one entry point: ``normbench ...`` in a shell, ``main([...])`` in tests and sweeps.

    ``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI; ``sweep``, ``report`` and
    ``bench`` to ``normbench.sweep``, ``normbench.report`` and ``normbench.bench``.

    Args:
        args: command-line arguments; None reads ``sys.argv``.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "sweep":
        from normbench.sweep import sweep

        sweep(argv[1:])
    elif argv and argv[0] == "report":
        from normbench.report import report

        report(argv[1:])
    elif argv and argv[0] == "bench":
        from normbench.bench import bench

        bench(argv[1:])
    else:
        NormBenchCLI(args=args)


if __name__ == "__main__":
    main()
