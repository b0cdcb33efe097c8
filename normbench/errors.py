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
from lightning.fabric.utilities.exceptions import MisconfigurationException

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


# The errors of what the user gave; each is said in one line.
USER_ERRORS = (
    ArgumentError,
    ValueError,
    FileNotFoundError,
    DatasetNotFoundError,
    yaml.YAMLError,
    MisconfigurationException,
)


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


def _parse_error(text: str, data_modules: tuple[str, ...]) -> str:
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
    if path and key == "data" and data_modules:
        return f"data: {path.group(1)!r} is not a data module; use one of {', '.join(data_modules)}"
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
    """Each ``--config FILE``: it exists and is valid YAML, said with the file's name and line.

    Args:
        argv: a command's arguments.
    """
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


@contextmanager
def reported(data_modules: Iterable[str] = ()) -> Iterator[None]:
    """Say a user error raised in the block in one line on stderr and raise ``UserError`` (exit
    status 2) in its place; with ``NORMBENCH_DEBUG`` set, let it through with its traceback.

    Args:
        data_modules: the data modules' class names, for a bad ``--data``.
    """
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("NORMBENCH_DEBUG"):
            raise
        message = PREFIX + one_line(err, data_modules)
        print(message, file=sys.stderr)
        raise UserError(message) from None
