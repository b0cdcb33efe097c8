"""The one table from a norm's name to its factory.

The name is the vocabulary of the whole project: the same string in YAML, run directories,
table rows and plot legends. Every factory takes ``num_features`` first and its options as
keywords with defaults, and accepts any (N, C, *) input.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from torch import nn

from normbench.norms.batch_norm import BatchNorm, BatchNormRS
from normbench.norms.batch_renorm import BatchRenorm
from normbench.norms.dynamic_tanh import DynamicTanh
from normbench.norms.evonorm import EvoNormB0, EvoNormS0
from normbench.norms.filter_response_norm import FilterResponseNorm
from normbench.norms.frozen_batch_norm import FrozenBatchNorm
from normbench.norms.ghost_batch_norm import GhostBatchNorm
from normbench.norms.group_norm import GroupNorm
from normbench.norms.identity import NoNorm
from normbench.norms.instance_norm import InstanceNorm
from normbench.norms.layer_norm import LayerNorm
from normbench.norms.rms_norm import RmsNorm2d

NORMS: dict[str, Callable[..., nn.Module]] = {
    "bn": BatchNorm,
    "bnrs": BatchNormRS,
    "brn": BatchRenorm,
    "ghost_bn": GhostBatchNorm,
    "gn": GroupNorm,
    "ln": LayerNorm,
    "in": InstanceNorm,
    "frn": FilterResponseNorm,
    "evonorm_b0": EvoNormB0,
    "evonorm_s0": EvoNormS0,
    "dyt": DynamicTanh,
    "rmsnorm": RmsNorm2d,
    "frozen_bn": FrozenBatchNorm,
    "none": NoNorm,
}

# The registry's names as a closed type, so that a config naming an unknown norm fails at
# parse time. A test keeps it equal to NORMS.
NormName = Literal[
    "bn", "bnrs", "brn", "ghost_bn", "gn", "ln", "in", "frn", "evonorm_b0", "evonorm_s0", "dyt", "rmsnorm", "frozen_bn",
    "none",
]  # fmt: skip
assert set(get_args(NormName)) == set(NORMS)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type ``hint``, as a config can give it: an int is
    a valid float, a bool is not a number."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in get_args(hint))
    if hint is None or hint is type(None):
        return value is None
    if origin is Literal:
        return value in get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return not isinstance(hint, type) or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in get_args(hint))
    if hint is type(None):
        return "null"
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def options_of(name: str) -> list[str]:
    """The options of the norm registered as ``name``: its factory's keywords, in order."""
    return [k for k in inspect.signature(NORMS[name]).parameters if k != "num_features"]


def check_options(name: str, num_features: int, kwargs: dict[str, Any]) -> None:
    """Raise a one-line error for an option ``name``'s layer does not have, a value of the wrong
    type (checked against the factory's annotations: ``norm_kwargs`` is an untyped dict in
    configs), or an impossible value (eps <= 0, momentum outside [0, 1], num_features < 1)."""
    factory = NORMS[name]
    options = options_of(name)
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        raise ValueError(f"norm {name!r} has no option {unknown[0]!r}; its options are: {', '.join(options) or 'none'}")
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    for key, value in kwargs.items():
        if key in hints and not _matches(value, hints[key]):
            raise TypeError(
                f"{name}: option {key}={value!r} is of type {type(value).__name__}; expected {_type_name(hints[key])}"
            )
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"{name}: num_features={num_features!r} must be a positive integer (the channel count)")
    if "eps" in kwargs and not kwargs["eps"] > 0:
        raise ValueError(f"{name}: eps={kwargs['eps']!r} must be > 0 (it keeps the division finite); 1e-5 is usual")
    momentum = kwargs.get("momentum")
    if momentum is not None and not 0 <= momentum <= 1:
        raise ValueError(f"{name}: momentum={momentum!r} must be in [0, 1], or null for a cumulative average")


def create_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """Build the norm registered as ``name`` for ``num_features`` channels.

    Args:
        name: a key of ``NORMS``.
        num_features: number of channels C of the (N, C, *) input.
        **kwargs: the layer's options, e.g. ``num_groups`` for gn or ``r_max`` for brn; each is
            checked against the layer's annotated type.
    """
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid norms are: {', '.join(sorted(NORMS))}")
    check_options(name, num_features, kwargs)
    return NORMS[name](num_features, **kwargs)
