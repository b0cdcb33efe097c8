"""``normbench fit|validate|test|predict``: LightningCLI over the module and the data modules,
and resuming a run where its checkpoint left it.

Also a run's name from its config. Devices (``normbench.devices``), seeding
(``normbench.seeding``), where a run resumes (``normbench.checkpoints``) and the callbacks a run
gets by default (``normbench.run_defaults``) live in their own modules. No command module is
imported here; ``normbench.main`` is the table of commands.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import NonNegativeInt
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from normbench.budget import Budget, apply_budget, check_end
from normbench.checkpoints import check_same_model, checkpoint_step, data_not_given, resolve_resume, saved_settings
from normbench.data import ImageDataModule
from normbench.devices import world_size
from normbench.errors import check_config_files, one_line, reported
from normbench.experiments import experiment_name
from normbench.layout import check_batch_settings
from normbench.module import NormBenchModule
from normbench.norm_args import keep_norm_options, norm_given_alone
from normbench.recorder import RunRecorder
from normbench.run_defaults import EVALUATION_WARNINGS, add_default_callbacks, lightning_internal_warnings_ignored
from normbench.seeding import seed_everything
from normbench.specs import DATA_MODULE_NAMES, dataset_name

# The private API of Lightning and jsonargparse that normbench relies on, all of it, here: none of
# it has a public equivalent. pyproject.toml bounds both packages to the versions it is known in
# (lightning < 2.7, jsonargparse < 5), and tests/test_cli.py checks each still exists.
PRIVATE_API = {
    "lightning.pytorch.cli.LightningCLI._set_seed": "overridden: 64-bit seeds (Lightning's refuses above 2**32 - 1)",
    "lightning.pytorch.cli.LightningCLI._add_subcommands": "extended: normbench's own commands in --help",
    "lightning.pytorch.cli.LightningCLI._parse_ckpt_path": "overridden: a checkpoint must agree with the command",
    "jsonargparse.ArgumentParser._subcommands_action": "where _add_subcommands adds normbench's own commands",
    "argparse._SubParsersAction._choices_actions": "the subcommands' help lines, which _add_subcommands rewrites",
}

LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


def run_name(config: Namespace) -> str:
    """The readable run name, e.g. ``cifar100_brn_bs2``: the same words as the configs.

    The batch size is the global one, the images of one optimizer step. On several devices the
    layout follows it, ``cifar10_bn_bs8_4x2`` (4 processes of 2 images), so that such a run never
    shares a directory, a TensorBoard run or a report row with one device's batch size 2 or 8.
    """
    return experiment_name(dataset_name(config.data.class_path), config.model.norm,
                           config.data.init_args.batch_size, config.model.net, world_size(config.trainer))  # fmt: skip


# Lightning's four commands in ``--help`` (Lightning takes each Trainer method's first docstring
# line, which stops mid-sentence for test and predict).
SUBCOMMAND_HELP = {
    "fit": "Train a run from its config (--ckpt_path last resumes it).",
    "validate": "Score a checkpoint on the validation set.",
    "test": "Score a checkpoint on the test split.",
    "predict": "Write each test image's predicted class to predictions.csv.",
}

# ``normbench --help``'s first line (Lightning's own says "Lightning Trainer command line tool").
DESCRIPTION = (
    "normbench: image classifiers trained with interchangeable normalization layers across batch sizes. "
    "fit, validate, test and predict are Lightning's; sweep, report and bench are normbench's own."
)


class NormBenchCLI(LightningCLI):
    """LightningCLI that links the dataset's classes and channels into the model and names
    each run directory after its experiment: ``lightning_logs/<name>/version_N``.

    Args:
        args: the command's arguments (None: ``sys.argv``).
        run: run the subcommand; False only builds the classes.
        commands: more commands (name -> help line) for ``normbench --help`` to list, which
            ``normbench.main`` hands to their own modules before this parser runs.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, commands: dict[str, str] | None = None) -> None:
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        # Whether this command says what the model is, by a config or --model options.
        self._model_given = any(a == "--config" or a.startswith(("--config=", "--model")) for a in argv)
        self._argv = argv
        self._commands = dict(commands or {})
        # Only the subcommand asked for gets its parser (each of Lightning's four costs 0.1 s to
        # build); ``normbench --help`` and a command line that names none get all four.
        self._chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
        with warnings.catch_warnings():
            # Tests and sweeps pass args inside processes whose own argv is another command's.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
            super().__init__(
                NormBenchModule,
                ImageDataModule,
                subclass_mode_data=True,
                # One device unless the user asks for more: Lightning's "auto" would take every
                # GPU and change the batch size under study (rule 13 of STYLE.md).
                trainer_defaults={"callbacks": [RunRecorder()], "devices": 1},
                save_config_kwargs={"overwrite": True},
                # Parse errors raise, so that they can be said in one line.
                parser_kwargs={
                    "description": DESCRIPTION,
                    "exit_on_error": False,
                    **{c: {"exit_on_error": False} for c in self.subcommands()},
                },
                auto_configure_optimizers=False,
                args=args,
                run=run,
            )

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        """Lightning's subcommands (name -> the Trainer method's arguments the CLI skips): the one
        this command line names, or all of them."""
        every = LightningCLI.subcommands()
        return {self._chosen: every[self._chosen]} if self._chosen else every

    def _set_seed(self) -> None:
        # Lightning's own refuses seeds above 2**32 - 1; normbench takes 64-bit seeds.
        config = self.config[self.subcommand] if self.subcommand else self.config
        seed = config.get("seed_everything")
        if seed is False or seed is True or seed is None:
            return super()._set_seed()
        seed_everything(seed)

    def _add_subcommands(self, parser, **kwargs) -> None:
        """Lightning's subcommands, and the commands given to the constructor, each with its one
        line in ``--help``."""
        for name, help_line in SUBCOMMAND_HELP.items():
            kwargs[name] = {"description": help_line, **kwargs.get(name, {})}
        super()._add_subcommands(parser, **kwargs)
        for action in parser._subcommands_action._choices_actions:
            action.help = SUBCOMMAND_HELP.get(action.dest, action.help)
        for name, help_line in self._commands.items():
            own = ArgumentParser(prog=f"normbench {name}", description=help_line, add_help=False)
            parser._subcommands_action.add_subcommand(name, own, help=help_line)

    def instantiate_classes(self) -> None:
        # A value that type hints cannot rule out (width 0, a Lightning setting it refuses, a
        # norm option of the wrong type) fails while the classes are built: a user error.
        try:
            super().instantiate_classes()
        except (TypeError, MisconfigurationException) as err:
            message = one_line(err)
            if (
                isinstance(err, MisconfigurationException)
                and "gpu" in message.lower()
                and not torch.cuda.is_available()
            ):
                message = f"trainer.accelerator: this machine has no usable GPU ({message}); use cpu or auto"
            raise ValueError(message) from err

    def parse_arguments(self, parser, args: ArgsType) -> None:
        """Lightning's parse; then a norm given on the command line without its options keeps
        only the config's options it takes (``normbench fit --config configs/cifar10_gn_bs2.yaml
        --model.norm brn`` drops gn's ``num_groups``), and says so. ``--print_config`` prints
        the config so kept: the parser prints as it parses, so it parses once more to print."""
        if not norm_given_alone(self._argv):
            super().parse_arguments(parser, args)
            return
        printing = [a for a in self._argv if a == "--print_config" or a.startswith("--print_config=")]
        super().parse_arguments(parser, [a for a in self._argv if a not in printing])
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        dropped = keep_norm_options(self._argv, config.model)
        if dropped and rank_zero_only.rank == 0:
            print(
                f"normbench: --model.norm {config.model.norm} does not take the config's norm_kwargs "
                f"{', '.join(dropped)}; dropped (give --model.norm_kwargs to set its options)",
                file=sys.stderr,
            )
        if printing:
            kept = json.dumps(dict(config.model.norm_kwargs or {}))
            super().parse_arguments(parser, [*self._argv, "--model.norm_kwargs", kept])

    def _parse_ckpt_path(self) -> None:
        """A checkpoint and this command must agree on the network.

        LightningCLI replaces the model's settings with those saved in the checkpoint, silently,
        even those the user just gave. normbench does so only when the command says nothing about
        the model (``normbench test --ckpt_path X --data ...``), and then takes the data settings
        the command does not give from the checkpoint too; otherwise a setting that differs from
        the checkpoint's is an error that names it.
        """
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if not path or not Path(path).is_file():
            return
        saved, saved_data = saved_settings(path)
        if self._model_given:
            check_same_model(path, saved, self.config[sub].model)
            return
        super()._parse_ckpt_path()
        data = self.config[sub].get("data")
        if init := data_not_given(saved_data, self._argv, data):
            patch = {sub: {"data": {"class_path": data.class_path, "init_args": init}}}
            self.config = self.parser.parse_object(patch, self.config)

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
            help="Version folder under the run directory (default: the next free version_N; with "
            "--ckpt_path last, the newest one that has a last checkpoint)",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=NonNegativeInt,
            default=1000,
            help="Also refresh checkpoints/last.ckpt every this many training steps, so an interrupted "
            "run resumes mid-epoch (0: only at the end of each epoch)",
        )
        parser.add_class_arguments(Budget, "budget", help="What a batch-size study holds fixed (normbench.budget)")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        apply_budget(config, config.data.init_args.batch_size * world_size(trainer))
        if (note := check_end(trainer)) and self.subcommand == "fit":
            rank_zero_only(print)(note, file=sys.stderr)
        check_batch_settings(config, fit=self.subcommand == "fit")
        if trainer.get("barebones"):
            # Lightning's barebones refuses the logger, checkpoints and self.log, which every run
            # here keeps (its TensorBoard run, last.ckpt, its record's metrics).
            raise ValueError(
                "trainer.barebones=true turns off the logging, checkpoints and metrics every normbench run "
                "records; drop it (what a step costs and how to cut it: docs/speed.md)"
            )
        add_default_callbacks(config, config.checkpoint_every_n_steps, self.subcommand)
        if self.subcommand in ("validate", "test", "predict"):
            # What Lightning says of callbacks as it loads the checkpoint evaluated (run_defaults):
            # nothing an evaluation saves or needs. (run_cli's catch_warnings scope drops these.)
            for message in EVALUATION_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
        if "ckpt_path" in config and config.ckpt_path is not None:
            ckpt = resolve_resume(config, self.subcommand, config.name or run_name(config))
            config.ckpt_path = ckpt
        else:
            ckpt = None
        if "weights_only" in config and config.weights_only is None:
            # Checkpoints hold tensors and plain values only; never unpickle arbitrary objects.
            config.weights_only = True
        if config.trainer.logger is False:
            # No logger: Lightning would save config.yaml in default_root_dir, which a sweep's runs
            # share; the run record holds the config instead.
            self.save_config_callback = None
        if config.trainer.logger in (None, True):
            init_args = Namespace(**run_logger_args(config), default_hp_metric=False)
            if self.subcommand == "fit" and ckpt is not None:
                # The resumed run appends to its own TensorBoard run; events the interrupted one
                # wrote after its checkpoint are hidden, as they are written again. Lightning logs
                # step n's figures at step n (the epoch's at its last step), and a checkpoint
                # taken after n steps says global_step = n: everything from n on is redone.
                init_args.purge_step = checkpoint_step(ckpt)
            config.trainer.logger = Namespace(class_path=LOGGER, init_args=init_args)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer, with its run directory, ``lightning_logs/<name>/version_N``, the same in every
        Lightning mode: ``fast_dev_run`` replaces the loggers by one without a directory, and
        ``logger: false`` has none, where the record, and checkpoints, would land in
        ``default_root_dir``, shared by every run of a sweep. ``RunRecorder`` is handed the run's
        logger (and, where LightningCLI saves no config.yaml, the config), and checkpoints without
        a directory of their own go to the run directory's ``checkpoints/``."""
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config[self.subcommand] if self.subcommand else self.config
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        configured = kwargs.get("logger", init.get("trainer", {}).get("logger"))
        loggers = configured if isinstance(configured, list) else [configured]
        logger = next((lg for lg in loggers if isinstance(lg, (TensorBoardLogger, CSVLogger))), None)
        if logger is None and configured is False:
            logger = TensorBoardLogger(**run_logger_args(config))  # never attached: it names the directory
        if logger is None:
            return trainer  # another kind of logger: Lightning's log_dir, as Lightning has it
        for callback in trainer.callbacks:
            if isinstance(callback, RunRecorder):
                callback.logger = logger
                if trainer.fast_dev_run or configured is False:
                    dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                    callback.config = dumped[self.subcommand] if self.subcommand else dumped
        if logger not in trainer.loggers:
            for callback in trainer.checkpoint_callbacks:
                if callback.dirpath is None:
                    callback.dirpath = os.path.realpath(os.path.join(logger.log_dir, "checkpoints"))
        return trainer


def run_logger_args(config: Namespace) -> dict[str, Any]:
    """Where a run's logger writes, its run directory: ``save_dir`` (``<default_root_dir>/
    lightning_logs``), ``name`` and ``version`` (None: the next free ``version_N``)."""
    root = config.trainer.default_root_dir or "."
    return {"save_dir": os.path.join(root, "lightning_logs"), "name": config.name or run_name(config),
            "version": config.version}  # fmt: skip


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def run_cli(args: ArgsType = None, commands: dict[str, str] | None = None) -> NormBenchCLI:
    """``normbench fit|validate|test|predict ...``: the CLI, with a user error said in one line
    (``normbench.errors.reported``); returns it, its model and trainer as the command left them.

    Args:
        args: the command's arguments, the subcommand first (None: ``sys.argv``).
        commands: the other commands, for ``--help`` to list.
    """
    with reported(DATA_MODULE_NAMES):
        check_config_files([str(a) for a in args] if isinstance(args, (list, tuple)) else sys.argv[1:])
        try:
            with lightning_internal_warnings_ignored():
                return NormBenchCLI(args=args, commands=commands)
        except SystemExit as done:
            if isinstance(done.__context__, KeyboardInterrupt):
                # Lightning turns Ctrl-C into exit status 1 once the run is recorded as
                # interrupted, and ignores SIGINT from then on: it is Ctrl-C again, for
                # normbench.main (exit 130, how to resume) or a sweep (it stops).
                signal.signal(signal.SIGINT, signal.default_int_handler)
                interrupt = KeyboardInterrupt()
                interrupt.resumable = getattr(done.__context__, "resumable", None)  # set by RunRecorder
                raise interrupt from None
            raise
