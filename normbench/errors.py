"""User errors and their one-line rendering, for every command.

An error in what the user gave (a value, a file, a config) ends a command with one line on
stderr that names the bad value and the fix, ``normbench: error: ...``, and exit status 2, no
traceback (``NORMBENCH_DEBUG=1`` shows it). Anything else is a bug and keeps its traceback.
This module knows no other normbench module: callers hand it the names it needs.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from jsonargparse import ArgumentError

PREFIX = "normbench: error: "


class UserError(SystemExit):
    """Exit status 2 after a one-line error; ``message`` is that line."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DatasetNotFoundError(RuntimeError):
    """The dataset's files are not on disk and could not be downloaded."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model it is loaded into."""


# The errors of what the user gave; each is said in one line. Lightning's
# MisconfigurationException joins them once Lightning is loaded (``user_errors``).
USER_ERRORS = (
    ArgumentError,
    ValueError,
    FileNotFoundError,
    DatasetNotFoundError,
    yaml.YAMLError,
)
LIGHTNING_EXCEPTIONS = "lightning.fabric.utilities.exceptions"


def user_errors() -> tuple[type[BaseException], ...]:
    """``USER_ERRORS``, with Lightning's ``MisconfigurationException`` where Lightning is loaded:
    only then can it be raised, and not importing it here keeps the commands that do not train
    (report, --help of normbench's own) from loading Lightning and torch."""
    lightning = sys.modules.get(LIGHTNING_EXCEPTIONS)
    return (*USER_ERRORS, lightning.MisconfigurationException) if lightning else USER_ERRORS


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an error's message (its type's name when it has none), cut to ``limit``."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def error_line(err: BaseException, limit: int = 500) -> str:
    """What a run record says of the error that ended a run: the line the user saw for a user
    error, else ``Type: first line of the message``."""
    if isinstance(err, UserError):
        return err.message[:limit]
    return f"{type(err).__name__}: {err}".splitlines()[0][:limit]


def one_line(err: BaseException, data_modules: Iterable[str] = ()) -> str:
    """The error as one line; jsonargparse's parse errors are cut down to the failing key, the
    bad value and what is expected.

    Args:
        err: the error.
        data_modules: the data modules' class names, for a bad ``--data``.
    """
    text = " ".join((str(err).strip() or type(err).__name__).split())
    if isinstance(err, ArgumentError) or "Parser key" in text or "Union subtypes" in text:
        text = _parse_error(text, tuple(data_modules))
    return text[:600]


# Types as a user reads them, by the name jsonargparse gives them in its errors.
TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true/false", "str": "text", "NoneType": "null",
    "PositiveInt": "a positive integer", "NonNegativeInt": "an integer >= 0", "PositiveFloat": "a positive number",
    "NonNegativeFloat": "a number >= 0", "ClosedUnitInterval": "a number from 0 to 1",
    "OpenUnitInterval": "a number between 0 and 1", "dict": "a mapping", "list": "a list", "timedelta": "a duration",
}  # fmt: skip


def _words(names: list[str]) -> str | None:
    """``an integer or null`` for jsonargparse's type names (or ``one of ...``); None when one
    has no plain words."""
    words = [n if n.startswith("one of ") else TYPE_WORDS.get(n) for n in names]
    if not names or None in words:
        return None
    ordered = [w for w in words if w != "null"] + [w for w in words if w == "null"]
    return " or ".join(dict.fromkeys(ordered))


def _typed(where: str, value: str, names: list[str]) -> str | None:
    """``key: 'abc' is not an integer or null``, or None."""
    words = _words(names)
    return None if words is None else f"{where}{value.strip()!r} is not {words}"


# Alternatives a user cannot give on a command line, left out of what an option accepts.
UNTYPABLE = {"Tensor"}


def _subtypes(listing: str) -> list[str] | None:
    """The type names of a Union's ``Subtypes: [...]`` (a Literal as ``one of a, b``), without
    the untypable ones; None when one has no plain words (a class, say)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(listing + ","):
        depth += ch in "[" and 1 or ch in "]" and -1 or 0
        if ch == "," and depth == 0:
            items.append(listing[start:i].strip())
            start = i + 1
    names, choices = [], []
    for item in items:
        literal = re.match(r"typing\.Literal\[(.*)\]$", item)
        cls = re.match(r"<class '(?:[\w.]+\.)?(\w+)'>$", item)
        if literal:
            if not choices:
                names.append("")  # where the choices go
            choices += [v.strip().strip("'") for v in literal.group(1).split(",")]
        elif re.match(r"(dict|list)\[", item):
            names.append(item.split("[")[0])
        elif cls and cls.group(1) in UNTYPABLE:
            continue
        elif cls and cls.group(1) in TYPE_WORDS:
            names.append(cls.group(1))
        else:
            return None
    names = [n or "one of " + ", ".join(dict.fromkeys(choices)) for n in names]
    return names or None


def _type_error(text: str, data_modules: tuple[str, ...] = ()) -> str | None:
    """A value of the wrong type, said in plain words with the option's whole key: the innermost
    ``Parser key`` of jsonargparse's nested errors and what its type accepts; None for others."""
    keys = re.findall(r'Parser key "([^"]+)": ', text)
    if not keys:
        return None
    key = ".".join(dict.fromkeys(keys))
    tail = text.rsplit(f'Parser key "{keys[-1]}": ', 1)[1]
    union = re.search(r"Does not validate against any of the Union subtypes Subtypes: \[(.*?)\] Errors: .*? "
                      r"Given value type: <class '[\w.]+'> Given value: (.*?)(?:\. Got value:| - |$)", tail)  # fmt: skip
    if union:
        names = _subtypes(union.group(1))
        if names is not None:
            return _typed(f"{key}: ", union.group(2), names)
        if re.search(r"No module named|not accessible or invalid|class_path|expects a function or a callable", tail):
            value = union.group(2).strip()
            if key == "data" and data_modules:
                return f"data: {value!r} is not a data module; use one of {', '.join(data_modules)}"
            return f"{key}: {value!r} is not an importable class; give its full class path"
        return None
    typed = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*?)(?:\. Got value:| - |$)", tail)
    if typed:
        return _typed(f"{key}: ", typed.group(2), [typed.group(1)])
    restricted = re.match(r"Not of type (\w+): (?:(\S+) does not conform|.*?: '([^']*)')", tail)
    if restricted:
        return _typed(f"{key}: ", restricted.group(2) or restricted.group(3) or "", [restricted.group(1)])
    return None


# normbench's commands, for a command line that gives none (normbench.main holds them; a test
# keeps the two equal).
COMMANDS = ("fit", "validate", "test", "predict", "sweep", "report", "bench")

# What to give for an argument a command cannot run without, when the command line has none.
REQUIRED_HINTS = {
    "data": "give an experiment config (--config configs/mnist_bn_bs16.yaml) or a data module (--data MNISTDataModule)",
    "base": "give a sweep config (--config configs/sweeps/study2_fashion_cpu.yaml) or a base experiment (--base)",
    "paths": "give the sweep or run directories to report on (normbench report sweeps/study2_fashion_cpu)",
}


def _parse_error(text: str, data_modules: tuple[str, ...]) -> str:
    outer = re.match(r'Parser key "([^"]+)": ', text)
    key = outer.group(1) if outer else None
    said = _type_error(text, data_modules)
    if said:
        return said
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
        said = _typed(where, typed.group(2), [typed.group(1)])
        return said or f"{where}{typed.group(2).strip()!r} is not a valid {typed.group(1)}; give a value of that type"

    path = re.search(r"Expected a dot import path string: (\S+)", text) or re.search(
        r"Expected a path but (\S+) either not accessible", text
    )
    if path and key == "data" and data_modules:
        return f"data: {path.group(1)!r} is not a data module; use one of {', '.join(data_modules)}"
    if path:
        return f"{where}{path.group(1)!r} is not an importable class; give its full class path"
    if re.search(r'expected "subcommand" to be one of .* but it was not provided', text):
        return f"no command given; use one of {', '.join(COMMANDS)} (normbench --help says what each does)"
    required = re.search(r"the following arguments are required: (.*)", text)
    if required:
        missing = [m.strip() for m in required.group(1).split(",")]
        hints = [REQUIRED_HINTS[m.rsplit(".", 1)[-1]] for m in missing if m.rsplit(".", 1)[-1] in REQUIRED_HINTS]
        return f"{', '.join(missing)} not given" + (f"; {'; '.join(hints)}" if hints else "")
    unknown = re.search(r"[Uu]nrecognized arguments: (.*)", text) or re.search(
        r"does not accept option '([^']+)'", text
    )
    if unknown:
        return f"unknown option {unknown.group(1)}; see the command's --help for the valid ones, or check the spelling"
    nokey = re.search(r'No action for key "([^"]+)"', text) or re.search(
        r"Key \"?'?([\w.]+)'?\"? is not expected", text
    )
    if nokey:
        return (
            f"unknown config key {nokey.group(1)!r}; see normbench fit --help for the valid keys, or check the spelling"
        )
    return where + text


def check_config_files(argv: list[str]) -> None:
    """Each ``--config FILE``: it exists and is valid YAML, said with the file's name and line.

    Args:
        argv: a command's arguments.
    """
    command = argv[0] if argv else ""
    if command in ("-c", "--config") or command.startswith("--config="):
        # Lightning's parser takes a config before the command too, but as a whole file of
        # commands ({fit: {...}}): an experiment config there would be read as nothing at all.
        given = command.split("=", 1)[1] if "=" in command else (argv[1] if len(argv) > 1 else "FILE")
        named = next((a for a in argv[1:] if a in COMMANDS), "fit")
        raise ValueError(f"--config goes after the command: normbench {named} --config {given}")
    example = "configs/sweeps/study2_fashion_cpu.yaml" if command == "sweep" else "configs/mnist_bn_bs16.yaml"
    for flag, value in itertools.pairwise(argv):
        if flag != "--config" or value.lstrip().startswith(("{", "[")) or ":" in value and "\n" in value:
            continue
        if not os.path.isfile(value):
            raise FileNotFoundError(
                f"config file {value} does not exist; pass the path of a YAML config, e.g. {example}"
            )
        try:
            _check_kind(command, value, yaml.safe_load(Path(value).read_text()))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {value} is not valid YAML{where} ({problem}); fix it there") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {value} cannot be read ({err}); pass a readable YAML file") from None


def _check_kind(command: str, path: str, config: object) -> None:
    """A sweep config given to a run's command, or an experiment config to ``sweep``: one line that
    says which kind it is and the command that takes it."""
    if not isinstance(config, dict):
        return
    if command in ("fit", "validate", "test", "predict") and "grid" in config:
        raise ValueError(f"config file {path} is a sweep config (it has a grid); run it with normbench sweep --config "
                         f"{path}")  # fmt: skip
    if command == "sweep" and "grid" not in config and {"model", "data", "trainer"} & set(config):
        raise ValueError(f"config file {path} is an experiment config, not a sweep config (it has no grid); run it "
                         f"with normbench fit --config {path}, or give a sweep config such as "
                         "configs/sweeps/study2_fashion_cpu.yaml")  # fmt: skip


@contextmanager
def reported(data_modules: Iterable[str] = ()) -> Iterator[None]:
    """Say a user error raised in the block in one line on stderr and raise ``UserError`` (exit
    status 2) in its place; with ``NORMBENCH_DEBUG`` set, let it through with its traceback.

    Args:
        data_modules: the data modules' class names, for a bad ``--data``.
    """
    try:
        yield
    except user_errors() as err:
        if os.environ.get("NORMBENCH_DEBUG"):
            raise
        message = PREFIX + one_line(err, data_modules)
        print(message, file=sys.stderr)
        raise UserError(message) from None
