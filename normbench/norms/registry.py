"""The one table from a norm's name to its factory.

The name is the vocabulary of the whole project: the same string in YAML, run directories,
table rows and plot legends. Every factory takes ``num_features`` first and its options as
keywords with defaults, and accepts any (N, C, *) input.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal, get_args

from torch import nn

from normbench.norms.batch_norm import BatchNorm, BatchNormRS
from normbench.norms.batch_renorm import BatchRenorm
from normbench.norms.evonorm import EvoNormB0, EvoNormS0
from normbench.norms.filter_response_norm import FilterResponseNorm
from normbench.norms.ghost_batch_norm import GhostBatchNorm
from normbench.norms.group_norm import GroupNorm
from normbench.norms.identity import NoNorm
from normbench.norms.instance_norm import InstanceNorm
from normbench.norms.layer_norm import LayerNorm

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
    "none": NoNorm,
}

# The registry's names as a closed type, so that a config naming an unknown norm fails at
# parse time. A test keeps it equal to NORMS.
NormName = Literal["bn", "bnrs", "brn", "ghost_bn", "gn", "ln", "in", "frn", "evonorm_b0", "evonorm_s0", "none"]
assert set(get_args(NormName)) == set(NORMS)


def create_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """Build the norm registered as ``name`` for ``num_features`` channels.

    Args:
        name: a key of ``NORMS``.
        num_features: number of channels C of the (N, C, *) input.
        **kwargs: the layer's options, e.g. ``num_groups`` for gn or ``r_max`` for brn.
    """
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid norms are: {', '.join(sorted(NORMS))}")
    options = [k for k in inspect.signature(NORMS[name]).parameters if k != "num_features"]
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        raise ValueError(f"norm {name!r} has no option {unknown[0]!r}; its options are: {', '.join(options) or 'none'}")
    return NORMS[name](num_features, **kwargs)
