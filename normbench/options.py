"""Integer options through jsonargparse's restricted types (``PositiveInt``, ``NonNegativeInt``):
the parser checks them on the command line, ``check_restricted`` when a class is built from
Python, and both say it in the same plain words."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from jsonargparse import Namespace
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveFloat, PositiveInt

# Each restricted type in plain words.
PLAIN: dict[Any, str] = {
    PositiveInt: "a positive integer",
    NonNegativeInt: "an integer >= 0",
    PositiveFloat: "a positive number",
    ClosedUnitInterval: "a number from 0 to 1",
}


def check_restricted(fn: Callable, values: dict[str, Any], prefix: str) -> None:
    """Check ``values`` of ``fn``'s parameters annotated with a restricted type, as the parser
    does on the command line; a bad one is a ValueError that names the option and its valid
    values.

    Args:
        fn: the function (a class's ``__init__``) whose annotations hold the types.
        values: parameter name -> the value given.
        prefix: the options' prefix on the command line (``data`` for ``--data.batch_size``).
    """
    for name, hint in typing.get_type_hints(fn).items():
        alternatives = typing.get_args(hint) if typing.get_origin(hint) is not list else (hint,)
        alternatives = alternatives or (hint,)
        value = values.get(name)
        if value is None:
            continue
        # The alternative that matches the value's shape: an element type for a list, else a scalar type.
        for kind in alternatives:
            of_list = typing.get_origin(kind) is list
            if of_list != isinstance(value, list):
                continue
            item = typing.get_args(kind)[0] if of_list else kind
            if not isinstance(item, type) or item not in PLAIN:
                continue
            bad = next((v for v in (value if of_list else [value]) if not _conforms(item, v)), None)
            if bad is not None or (of_list and not value):
                words = PLAIN[item] + (" or null" if type(None) in alternatives else "")
                shown = f"{bad!r} in {value!r}" if of_list and value else f"{value!r}"
                what = f"a list of {PLAIN[item].removeprefix('a ').removeprefix('an ')}s" if of_list else words
                raise ValueError(f"{name} must be {what}, got {shown}; set --{prefix}.{name} to {what}")


def _conforms(kind: Any, value: Any) -> bool:
    """Whether ``value`` is of the restricted type ``kind`` (a bool is no number)."""
    try:
        kind(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def plain(*values: Any) -> tuple[Any, ...]:
    """``values`` as plain ints and floats (None stays None): jsonargparse's restricted types
    are subclasses of them that hparams.yaml would tag."""
    return tuple(v if v is None or type(v) in (bool, int, float) else float(v) if isinstance(v, float) else int(v)
                 for v in values)  # fmt: skip


def plain_config(cfg: Any) -> Any:
    """A parsed config with every restricted int and float as a plain one, in lists and nested
    namespaces too: what YAML, pickles and run records can hold without jsonargparse."""
    if isinstance(cfg, list):
        return [plain_config(v) for v in cfg]
    if isinstance(cfg, Namespace):
        for key, value in list(cfg.items(branches=True)):
            cfg[key] = plain_config(value)
        return cfg
    return plain(cfg)[0] if isinstance(cfg, (int, float)) else cfg
