"""What a training step is made of, shared by the module and packed runs: the split's metrics,
the device-side record of the first non-finite loss, and the network's call under
``torch.compile``."""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy


def classification_metrics(num_classes: int) -> tuple[MulticlassAccuracy, MeanMetric]:
    """(top-1 accuracy, mean loss) metrics of one split: torchmetrics' micro accuracy, and the
    mean of every image's loss (so that it weighs images, not batches). No input checks: theirs
    call .any() on the device, a host sync every step.

    Args:
        num_classes: the classifier's classes.
    """
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
    return accuracy, MeanMetric(nan_strategy="disable")


def note_first_nonfinite(first: Tensor, loss: Tensor, step: int) -> None:
    """Where ``loss`` (a loss or one per run) is NaN or inf for the first time, set ``first``
    (-1 until then, same shape) to ``step``; all on the device, no host sync.

    Args:
        first: the record of the first non-finite step, updated in place.
        loss: this step's loss(es).
        step: this step's global step.
    """
    first.copy_(torch.where(~torch.isfinite(loss.detach()) & (first < 0), step, first))


def _net_call(net: nn.Module, x: Tensor) -> Tensor:
    return net(x)


_compiled_count = itertools.count()


def compiled_net_call(**options: Any) -> Callable[[nn.Module, Tensor], Tensor]:
    """``net(x)`` under ``torch.compile(**options)``, taking the network as an argument: nothing
    compiled is stored on the network, whose state_dict, copies and pickles stay those of eager
    mode.

    Each call gives a function with a code object and a name of its own, so that each model
    compiles as it would in a process of its own. Dynamo keeps its compiled graphs per code
    object and counts them against ``torch._dynamo.config.recompile_limit`` (8), and remembers
    per function name which input sizes have changed; shared, the graphs of every model one
    process builds (the runs of a sequential sweep: about four each, for train, eval and the
    diagnostics) would add up until dynamo silently fell back to eager, and a run at batch size
    16 after one at 2 would compile for any batch size (slower kernels) from its first step.

    Args:
        options: keywords of ``torch.compile`` (``backend``, ``mode``, ...).
    """
    name = f"_net_call_{next(_compiled_count)}"
    fn = types.FunctionType(_net_call.__code__.replace(co_name=name), _net_call.__globals__, name)
    # Dynamo does not guard on modules' hook dicts by default: a hook registered after the
    # first call (NormDiagnostics registers its forward pre-hooks at fit start) would never run,
    # and one removed would still run. With the guards, adding or removing a hook recompiles.
    return torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)(torch.compile(fn, **options))
