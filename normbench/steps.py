"""What a training step is made of, shared by the module and packed runs: the split's metrics,
the device-side record of the first non-finite loss, and the network's call under
``torch.compile``."""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities.data import dim_zero_sum


def classification_metrics(num_classes: int, persistent: bool = False) -> tuple[MulticlassAccuracy, MeanMetric]:
    """(top-1 accuracy, mean loss) metrics of one split: torchmetrics' micro accuracy, and the
    mean of every image's loss (so that it weighs images, not batches). No input checks: theirs
    call .any() on the device, a host sync every step.

    Args:
        num_classes: the classifier's classes.
        persistent: keep the metrics' states in the owner's state_dict (and checkpoints).
    """
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
    loss = MeanMetric(nan_strategy="disable")
    for metric in (accuracy, loss):
        metric.persistent(persistent)
    return accuracy, loss


def note_first_nonfinite(first: Tensor, loss: Tensor, step: int) -> None:
    """Where ``loss`` (a loss or one per run) is NaN or inf for the first time, set ``first``
    (-1 until then, same shape) to ``step``; all on the device, no host sync.

    Args:
        first: the record of the first non-finite step, updated in place.
        loss: this step's loss(es).
        step: this step's global step.
    """
    first.copy_(torch.where(~torch.isfinite(loss.detach()) & (first < 0), step, first))


class NonFiniteWatch:
    """The first training step whose loss was NaN or inf, kept on the device and read by the
    host only every ``every`` steps; all ranks agree on it.

    Args:
        every: steps between host reads; None: every step on CPU, where reading is free, every
            20 on accelerators, where each read waits for the device.
    """

    def __init__(self, every: int | None = None) -> None:
        self.every = every
        # The global step of the first non-finite loss, -1 while there is none. Not a module
        # buffer: DDP would overwrite each rank's with rank zero's.
        self.first: Tensor | None = None

    def note(self, loss: Tensor, step: int) -> None:
        """Remember ``step`` if ``loss`` is the first non-finite one; no host sync."""
        if self.first is None or self.first.device != loss.device:
            self.first = torch.full((), -1, dtype=torch.long, device=loss.device)
        note_first_nonfinite(self.first, loss, step)

    def check(self, trainer: Any, step: int, device: torch.device) -> int | None:
        """On a reading step, the first non-finite step of any rank (the earliest: the global
        batch's loss, the ranks' mean, was non-finite from the first step any rank's share of it
        was, as on one device), else None; between readings, None without a read."""
        if step % (self.every or (1 if device.type == "cpu" else 20)):
            return None
        if trainer.world_size == 1:  # one read, no tensor op: a CPU step at batch size 2 is ~1 ms
            first = int(self.first) if self.first is not None else -1
            return first if first >= 0 else None
        first = self.first if self.first is not None else torch.full((), -1, dtype=torch.long, device=device)
        never = torch.iinfo(torch.long).max
        earliest = int(trainer.strategy.reduce(torch.where(first >= 0, first, never), reduce_op="min"))
        return None if earliest == never else earliest


def summed_metric_states(
    checkpoint: dict[str, Any], metrics: dict[str, Metric], reduce: Callable[[Tensor], Tensor]
) -> None:
    """Make a checkpoint's states of ``metrics`` (prefix in the state_dict -> metric) those of
    the whole run, on every process: each state summed over the processes by ``reduce`` (a
    collective: every rank calls this), since torchmetrics' state_dict holds one rank's part and
    Lightning writes rank zero's checkpoint. The sums sit with rank zero: on loading, the other
    ranks' copies are zeroed (``zero_other_ranks``), so the epoch's closing sync adds them once.

    Args:
        checkpoint: the checkpoint being saved, its ``state_dict`` already made.
        metrics: the metrics whose states to sum; every state must reduce by a sum.
        reduce: a tensor -> its sum over the processes (``trainer.strategy.reduce(t, "sum")``).
    """
    state = checkpoint.get("state_dict", {})
    for prefix, metric in metrics.items():
        for name in metric._defaults:
            if metric._reductions[name] is not dim_zero_sum:
                raise ValueError(f"{prefix}.{name}: a metric state that is not a sum cannot be summed over processes")
            key = f"{prefix}.{name}"
            if key in state:
                state[key] = reduce(getattr(metric, name).detach().clone())


def zero_other_ranks(checkpoint: dict[str, Any], prefixes: tuple[str, ...], rank: int) -> None:
    """On every rank but zero, zero a checkpoint's metric states under ``prefixes``, which hold
    the whole run's sums (``summed_metric_states``): each rank then adds its own part of the
    rest of the epoch, and the epoch's sync counts the part before the checkpoint once."""
    if rank == 0:
        return
    state = checkpoint.get("state_dict", {})
    for key, value in state.items():
        if key.startswith(tuple(f"{p}." for p in prefixes)) and isinstance(value, Tensor):
            state[key] = torch.zeros_like(value)


class HeldGrads:
    """LightningModule mixin: under DDP, each parameter's gradient made before DDP wraps the
    module, in the parameter's own memory layout, and zeroed in place from then on, never set to
    None (``hold_grads(stage)`` from ``setup``).

    DDP's reducer copies each gradient into a bucket view with its parameter's strides and
    warns ("Grad strides do not match bucket view strides": an extra copy every step) when a
    backward returns a gradient with other strides. Under channels_last a convolution weight
    with a size-1 dimension (a 1-channel stem, a 1x1 convolution) is channels-last and
    contiguous at once, and autograd keeps whichever strides the kernel returned. A gradient
    that exists before the backward is added to in place and keeps its parameter's strides;
    with ``gradient_as_bucket_view`` DDP makes it the bucket's view itself.
    """

    grads_held = False

    def hold_grads(self, stage: str) -> None:
        strategy = self.trainer.strategy  # DeepSpeed, a DDPStrategy too, keeps its own gradients
        self.grads_held = (
            stage == "fit" and isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
        )
        if not self.grads_held:
            return
        for p in self.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def zero_grad(self, set_to_none: bool = True) -> None:  # Lightning calls it before fitting
        super().zero_grad(set_to_none=set_to_none and not self.grads_held)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        optimizer.zero_grad(set_to_none=not self.grads_held)


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


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# The torch.compile mode whose only gain is CUDA graphs: off (eager) on other devices.
GRAPH_MODE = "reduce-overhead"


def compile_mode(compile: bool | str) -> str | None:
    """The ``torch.compile`` mode that ``--model.compile`` asks for: None for false, "default"
    for true, else the mode named."""
    if compile is False:
        return None
    return "default" if compile is True else str(compile)


class NetCall:
    """``net(x)``, eagerly or, with ``compile``, under ``torch.compile`` (inductor) through
    ``compiled_net_call``, made on the first call and dropped when pickled or copied.

    ``compile="reduce-overhead"`` replays the network's forward and backward as CUDA graphs
    (torch's CUDA graph trees: one launch each instead of one per kernel, parameters and
    buffers, the norms' running statistics included, updated in place by the replay). The norms
    compute their schedules on the device (``BatchRenorm.current_limits``), so a replay needs no
    host value that changes between steps. CUDA graphs exist only on CUDA, so on another device
    that mode runs eagerly instead of paying inductor's compile for nothing.

    Args:
        compile: False (eager), True (mode "default") or a ``torch.compile`` mode.
    """

    def __init__(self, compile: bool | str = False) -> None:
        self.compile = compile
        self._fn: Callable[[nn.Module, Tensor], Tensor] | None = None
        self._said_eager = False

    def active(self, device: torch.device) -> bool:
        """Whether a call with inputs on ``device`` runs compiled."""
        mode = compile_mode(self.compile)
        return mode is not None and not (mode == GRAPH_MODE and device.type != "cuda")

    def __call__(self, net: nn.Module, x: Tensor) -> Tensor:
        if not self.active(x.device):
            if self.compile == GRAPH_MODE and not self._said_eager:
                self._said_eager = True
                rank_zero_info(
                    f"compile={GRAPH_MODE} captures CUDA graphs; on {x.device.type} the network runs eagerly"
                )
            return net(x)
        if self._fn is None:
            self._fn = compiled_net_call(mode=compile_mode(self.compile))
        return self._fn(net, x)

    def __getstate__(self) -> dict[str, Any]:
        return {"compile": self.compile, "_fn": None, "_said_eager": False}
