"""Integer options through jsonargparse's restricted types (``PositiveInt``, ``NonNegativeInt``):
the parser checks them on the command line, ``check_restricted`` when a class is built from
Python, and both say it in the same plain words."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

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
        alternatives = typing.get_args(hint) or (hint,)
        for kind in alternatives:
            value = values.get(name)
            if not isinstance(kind, type) or kind not in PLAIN or value is None:
                continue
            try:
                kind(value)
                ok = not isinstance(value, bool)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                words = PLAIN[kind] + (" or null" if type(None) in alternatives else "")
                raise ValueError(f"{name} must be {words}, got {value!r}; set --{prefix}.{name} to {words}")


def plain(*values: Any) -> tuple[Any, ...]:
    """``values`` as plain ints and floats (None stays None): jsonargparse's restricted types
    are subclasses of them that hparams.yaml would tag."""
    return tuple(v if v is None or type(v) in (bool, int, float) else float(v) if isinstance(v, float) else int(v)
                 for v in values)  # fmt: skip
