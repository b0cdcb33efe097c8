"""``normbench fit|validate|test|predict``: LightningCLI over the module and the data modules."""

from __future__ import annotations

import itertools
import os
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry, MPSAccelerator
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.trainer.connectors.accelerator_connector import _select_auto_accelerator

from normbench.callbacks import RunRecorder

# main(args) is how the tests and sweeps call the CLI, inside processes with arguments of their own.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
from normbench.data import DATAMODULES, DatasetNotFoundError, ImageDataModule, dataset_name
from normbench.module import CheckpointMismatchError, NormBenchModule

LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
PROGRESS_BAR = "lightning.pytorch.callbacks.TQDMProgressBar"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
PROGRESS_REFRESH = 20  # steps between progress-bar redraws


def device_count(accelerator: Any, devices: Any) -> int:
    """How many devices of one node ``Trainer(accelerator=..., devices=...)`` trains on, by
    Lightning's own rules (``auto``, ``-1``, a count, a list of ids), without building a Trainer;
    a value those rules refuse counts as what it says, and the Trainer then says why.

    Args:
        accelerator: the Trainer's ``accelerator`` (a name or an Accelerator).
        devices: the Trainer's ``devices``.
    """
    try:
        if isinstance(accelerator, Accelerator):
            cls = type(accelerator)
        else:
            name = str(accelerator or "auto")
            if name == "auto":
                name = _select_auto_accelerator()
            elif name == "gpu":
                name = "mps" if MPSAccelerator.is_available() else "cuda"
            cls = type(AcceleratorRegistry.get(name))
        flag = cls.auto_device_count() if devices == "auto" else devices
        return len(cls.get_parallel_devices(cls.parse_devices(flag)))
    except Exception:  # noqa: BLE001 - the Trainer reports a bad value itself, in its words
        if isinstance(devices, (list, tuple)):
            return len(devices)
        return int(devices) if str(devices).isdigit() and int(devices) > 0 else 1


def world_size(trainer: Namespace) -> int:
    """Processes a run's Trainer config trains with: devices per node times nodes."""
    return device_count(trainer.accelerator, trainer.devices) * int(trainer.num_nodes or 1)


def run_name(config: Namespace) -> str:
    """The readable run name, e.g. ``cifar100_brn_bs2``: the same words as the configs.

    The batch size is the global one, the images of one optimizer step. On several devices the
    layout follows it, ``cifar10_bn_bs8_4x2`` (4 processes of 2 images), so that such a run never
    shares a directory, a TensorBoard run or a report row with one device's batch size 2 or 8.
    """
    dataset = dataset_name(config.data.class_path)
    net = "" if config.model.net == "seed_cnn" else f"{config.model.net}_"
    per_device = config.data.init_args.batch_size
    world = world_size(config.trainer)
    layout = f"_{world}x{per_device}" if world > 1 else ""
    return f"{dataset}_{net}{config.model.norm}_bs{per_device * world}{layout}"


# seed_everything's range: torch takes 64-bit seeds, Lightning's seed_everything only numpy's 32.
MAX_SEED = 2**63 - 1


def seed_everything(seed: int) -> int:
    """Seed torch, numpy and Python's random as Lightning's ``seed_everything(seed,
    workers=True)`` does, for any seed in [0, 2**63 - 1]: Lightning's own is used where it
    applies (seeds below 2**32), and above it torch and Python's random take the whole seed and
    numpy, whose seeds are 32-bit, the seed modulo 2**32. ``PL_GLOBAL_SEED`` holds the whole seed
    for DDP's processes and data loader workers.

    Args:
        seed: the run's ``seed_everything``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed_everything={seed!r} is out of range; give an integer from 0 to 2**63 - 1")
    if seed <= np.iinfo(np.uint32).max:
        return L.seed_everything(seed, workers=True)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = "1"
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


# The module arguments that shape the network's tensors: a checkpoint fits only equal ones.
ARCHITECTURE = ("norm", "norm_kwargs", "net", "width", "num_blocks", "activation", "weight_standardization")


def _same(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return dict(a or {}) == dict(b or {})
    return a == b


class NormBenchCLI(LightningCLI):
    """LightningCLI that links the dataset's classes and channels into the model and names
    each run directory after its experiment: ``lightning_logs/<name>/version_N``."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        # Whether this command says what the model is, by a config or --model options.
        self._model_given = any(a == "--config" or a.startswith(("--config=", "--model")) for a in argv)
        super().__init__(
            NormBenchModule,
            ImageDataModule,
            subclass_mode_data=True,
            # One device unless the user asks for more: Lightning's "auto" would take every GPU
            # and change the batch size under study (rule 13 of STYLE.md).
            trainer_defaults={"callbacks": [RunRecorder()], "devices": 1},
            save_config_kwargs={"overwrite": True},
            # Parse errors raise, so that main() can say them in one line.
            parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in SUBCOMMANDS}},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def _set_seed(self) -> None:
        # Lightning's own refuses seeds above 2**32 - 1; normbench takes 64-bit seeds.
        seed = self._get(self.config, "seed_everything")
        if seed is False or seed is True or seed is None:
            return super()._set_seed()
        seed_everything(seed)

    def _add_subcommands(self, parser, **kwargs) -> None:
        """Lightning's subcommands, and normbench's own, each with its one line in ``--help``.

        ``main`` hands sweep, report and bench to their modules before this parser runs; they
        are here so that ``normbench --help`` lists them.
        """
        super()._add_subcommands(parser, **kwargs)
        for name, help_line in OWN_SUBCOMMANDS.items():
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

    def _parse_ckpt_path(self) -> None:
        """A checkpoint and this command must agree on the network.

        LightningCLI replaces the model's settings with those saved in the checkpoint, silently,
        even those the user just gave. normbench does so only when the command says nothing about
        the model (``normbench test --ckpt_path X --data ...``); otherwise a setting that differs
        from the checkpoint's is an error that names it.
        """
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if not path or not Path(path).is_file():
            return
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise CheckpointMismatchError(
                f"checkpoint {path} cannot be read ({first}); pass a .ckpt file saved by normbench fit"
            ) from None
        if not self._model_given:
            super()._parse_ckpt_path()
            return
        model = self.config[sub].model
        for key in ARCHITECTURE:
            if key in saved and key in model and _same(saved[key], model[key]) is False:
                raise CheckpointMismatchError(
                    f"checkpoint {path} is of another model: it has {key}={saved[key]!r}, this run "
                    f"{key}={model[key]!r}; drop --model.{key} or give {saved[key]!r}, or pass a checkpoint of this "
                    "model"
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
            help="Version folder under the run directory (default: the next free version_N; with "
            "--ckpt_path last, the newest one that has a last checkpoint)",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=1000,
            help="Also refresh checkpoints/last.ckpt every this many training steps, so an interrupted "
            "run resumes mid-epoch (0: only at the end of each epoch)",
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
        NormBenchCLI._append_callback(config, class_path, **init_args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.max_epochs == -1 and trainer.max_steps in (None, -1) and trainer.max_time is None:
            raise ValueError(
                "trainer.max_epochs=-1 with no max_steps or max_time trains forever; set --trainer.max_epochs to "
                "a positive number of epochs, or give --trainer.max_steps"
            )
        if config.checkpoint_every_n_steps < 0:
            raise ValueError(
                f"checkpoint_every_n_steps must be >= 0, got {config.checkpoint_every_n_steps}; "
                "use 0 to checkpoint only at the end of each epoch"
            )
        # Defaults that the user's own callbacks or switches replace, as Lightning's do.
        # The best checkpoint by validation accuracy, and last.ckpt, at the end of every training
        # epoch (after the epoch's metrics are logged, so that the run record in it is complete).
        self._add_default(config, "enable_checkpointing", CHECKPOINT, monitor="val/acc", mode="max",
                          save_last=True, filename="best-{epoch}", save_on_train_epoch_end=True,
                          enable_version_counter=False)  # fmt: skip
        if config.checkpoint_every_n_steps and not self._has_periodic_checkpoint(config):
            # last.ckpt in the middle of epochs too: at batch size 2 an epoch is 25,000 steps.
            # Both write last.ckpt; without the version counter they replace it, not add last-v1.ckpt.
            self._append_callback(config, CHECKPOINT, every_n_train_steps=config.checkpoint_every_n_steps,
                                  save_top_k=0, save_last=True, enable_version_counter=False)  # fmt: skip
        # Lightning's bar redraws every step; at batch size 2 that is thousands a second.
        self._add_default(config, "enable_progress_bar", PROGRESS_BAR, refresh_rate=PROGRESS_REFRESH, leave=False)
        if "ckpt_path" in config and config.ckpt_path is not None:
            ckpt = resolve_resume(config, self.subcommand)
            config.ckpt_path = ckpt
        else:
            ckpt = None
        if "weights_only" in config and config.weights_only is None:
            # Checkpoints hold tensors and plain values only; never unpickle arbitrary objects.
            config.weights_only = True
        if config.trainer.logger in (None, True):
            root = config.trainer.default_root_dir or "."
            init_args = Namespace(
                save_dir=os.path.join(root, "lightning_logs"),
                name=config.name or run_name(config),
                version=config.version,
                default_hp_metric=False,
            )
            if self.subcommand == "fit" and ckpt is not None:
                # The resumed run appends to its own TensorBoard run; events the interrupted one
                # wrote after its checkpoint are hidden, as they are written again. Lightning logs
                # step n's figures at step n (the epoch's at its last step), and a checkpoint
                # taken after n steps says global_step = n: everything from n on is redone.
                init_args.purge_step = checkpoint_step(ckpt)
            config.trainer.logger = Namespace(class_path=LOGGER, init_args=init_args)

    @staticmethod
    def _append_callback(config: Namespace, class_path: str, **init_args) -> None:
        callbacks = config.trainer.callbacks or []
        config.trainer.callbacks = [*callbacks, Namespace(class_path=class_path, init_args=Namespace(**init_args))]

    @staticmethod
    def _has_periodic_checkpoint(config: Namespace) -> bool:
        if config.trainer.enable_checkpointing is False:
            return True
        return any(
            "ModelCheckpoint" in str(getattr(c, "class_path", ""))
            and getattr(getattr(c, "init_args", None), "every_n_train_steps", None)
            for c in config.trainer.callbacks or []
        )


def checkpoint_step(path: str) -> int:
    """The global step a checkpoint was saved at."""
    return int(torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0))


def resolve_resume(config: Namespace, subcommand: str | None) -> str | None:
    """The checkpoint to load, and, for ``fit``, the run directory to continue in.

    ``--ckpt_path last`` continues the newest version of this run that has a ``last.ckpt``
    (``--version`` picks another); with none, the run starts fresh. A checkpoint path inside
    ``<save_dir>/<name>/<version>/checkpoints/`` continues that run directory, unless ``--name``
    or ``--version`` say otherwise. Lightning alone would open a new, empty version folder.
    """
    ckpt = str(config.ckpt_path)
    root = os.path.join(config.trainer.default_root_dir or ".", "lightning_logs")
    name = config.name or run_name(config)
    if ckpt == "last":
        run_dir = Path(root) / name
        # Lightning's logger names an integer version version_<n>, a string one as it is.
        given = config.version
        given = f"version_{given}" if isinstance(given, int) else given
        versions = [given] if given is not None else _versions_newest_first(run_dir)
        found = [run_dir / str(v) / "checkpoints" / "last.ckpt" for v in versions]
        found = [f for f in found if f.is_file()]
        if not found:
            print(f"normbench: no last checkpoint under {run_dir}; starting the run fresh", file=sys.stderr)
            return None
        config.version = found[0].parent.parent.name
        return str(found[0])
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"checkpoint {ckpt} not found; pass an existing .ckpt file or last")
    path = Path(ckpt).resolve()
    if subcommand == "fit" and path.parent.name == "checkpoints" and config.name is None and config.version is None:
        config.name, config.version = path.parents[2].name, path.parents[1].name
        if config.trainer.default_root_dir is None and path.parents[3].name == "lightning_logs":
            config.trainer.default_root_dir = str(path.parents[4])
    return ckpt


def _versions_newest_first(run_dir: Path) -> list[str]:
    def number(p: Path) -> int:
        tail = p.name.removeprefix("version_")
        return int(tail) if tail.isdigit() else -1

    return [p.name for p in sorted(run_dir.glob("*"), key=lambda p: (number(p), p.stat().st_mtime), reverse=True)]


# Errors in what the user gave (a value, a file, a config): one line that names the bad value
# and the fix, exit status 2, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ArgumentError,
    ValueError,
    FileNotFoundError,
    DatasetNotFoundError,
    yaml.YAMLError,
    MisconfigurationException,
)
SUBCOMMANDS = ("fit", "validate", "test", "predict")
OWN_SUBCOMMANDS = {  # one line each in normbench --help
    "sweep": "Run a grid of fit runs from a sweep config.",
    "report": "Tables, plots and verdicts from run records.",
    "bench": "Time normbench against the study's own loop.",
}


class UserError(SystemExit):
    """Exit status 2 after a one-line error; ``message`` is that line."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(err: BaseException) -> str:
    """The error as one line; jsonargparse's parse errors are cut down to the failing key, the
    bad value and what is expected."""
    text = " ".join((str(err).strip() or type(err).__name__).split())
    if isinstance(err, ArgumentError) or "Parser key" in text or "Union subtypes" in text:
        text = _parse_error(text)
    return text[:600]


def _parse_error(text: str) -> str:
    outer = re.match(r'Parser key "([^"]+)": ', text)
    key = outer.group(1) if outer else None
    if "Union subtypes" in text and "Errors: " in text:
        # One error per alternative type; the None alternative's is never the point.
        items = [i.strip() for i in re.split(r"(?:^| )- ", text.split("Errors: ", 1)[1]) if i.strip()]
        items = [i for i in items if "NoneType" not in i]
        text = items[0] if items else text
    elif outer:
        text = text[outer.end() :]
    text = re.sub(r"^Problem with given class_path '[^']+': ", "", text)
    inner = re.match(r'Parser key "([^"]+)": ', text)
    if inner:
        key = f"{key}.{inner.group(1)}" if key else inner.group(1)
        text = text[inner.end() :]
    where = f"{key}: " if key else ""
    literal = re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)", text)
    if literal:
        choices = ", ".join(c.strip().strip("'") for c in literal.group(1).split(","))
        return f"{where}{literal.group(2).strip()!r} is not one of {choices}"
    typed = re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", text)
    if typed:
        return f"{where}{typed.group(2).strip()!r} is not a valid {typed.group(1)}; give a value of that type"
    path = re.search(r"Expected a dot import path string: (\S+)", text) or re.search(
        r"Expected a path but (\S+) either not accessible", text
    )
    if path and key == "data":
        valid = ", ".join(cls.__name__ for cls in DATAMODULES.values())
        return f"data: {path.group(1)!r} is not a data module; use one of {valid}"
    if path:
        return f"{where}{path.group(1)!r} is not an importable class; give its full class path"
    unknown = re.search(r"[Uu]nrecognized arguments: (.*)", text) or re.search(
        r"does not accept option '([^']+)'", text
    )
    if unknown:
        return f"unknown option {unknown.group(1)}; see normbench fit --help for the valid keys, or check the spelling"
    nokey = re.search(r'No action for key "([^"]+)"', text) or re.search(
        r"Key \"?'?([\w.]+)'?\"? is not expected", text
    )
    if nokey:
        return (
            f"unknown config key {nokey.group(1)!r}; see normbench fit --help for the valid keys, or check the spelling"
        )
    return where + text


def check_config_files(argv: list[str]) -> None:
    """Each ``--config FILE``: it exists and is valid YAML, said with the file's name and line."""
    for flag, value in itertools.pairwise(argv):
        if flag != "--config" or value.lstrip().startswith(("{", "[")) or ":" in value and "\n" in value:
            continue
        if not os.path.isfile(value):
            raise FileNotFoundError(
                f"config file {value} does not exist; pass the path of a YAML config, e.g. configs/mnist_bn_bs16.yaml"
            )
        try:
            yaml.safe_load(Path(value).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {value} is not valid YAML{where} ({problem}); fix it there") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {value} cannot be read ({err}); pass a readable YAML file") from None


def main(args: ArgsType = None) -> None:
    """The one entry point: ``normbench ...`` in a shell, ``main([...])`` in tests and sweeps.

    ``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI; ``sweep``, ``report`` and
    ``bench`` to ``normbench.sweep``, ``normbench.report`` and ``normbench.bench``. A bad value,
    file or config ends it with one line on stderr, ``normbench: error: ...``, and exit status 2
    (``SystemExit``); ``NORMBENCH_DEBUG=1`` shows the traceback instead.

    Args:
        args: command-line arguments; None reads ``sys.argv``.
    """
    argv = sys.argv[1:] if args is None else list(args)
    try:
        check_config_files(argv)
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
    except KeyboardInterrupt:
        if args is not None:
            raise  # a caller's own loop decides
        print(
            "normbench: interrupted; run the same command again to resume (add --ckpt_path last to fit)",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except USER_ERRORS as err:
        if os.environ.get("NORMBENCH_DEBUG"):
            raise
        message = f"normbench: error: {one_line(err)}"
        print(message, file=sys.stderr)
        raise UserError(message) from None


if __name__ == "__main__":
    main()
