"""PreciseBN: exact population statistics for every layer that tracks running statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from normbench.norms.batch_norm import BatchNormRS
from normbench.norms.batch_renorm import BatchRenorm
from normbench.norms.norm_batch import NormBatch


def tracks_running_stats(module: nn.Module) -> bool:
    """True for layers with torch's running-statistics buffers (bn, bnrs, brn, ghost_bn, evonorm_b0)."""
    return getattr(module, "running_var", None) is not None and hasattr(module, "momentum")


def freeze_running_stats(net: nn.Module) -> None:
    """FrozenBN (Wu & Johnson 2021, Sec. 4): put every layer of ``net`` that tracks running
    statistics in eval mode, so that in training too it normalizes by them and leaves them be;
    its affine still learns."""
    for m in net.modules():
        if tracks_running_stats(m):
            m.eval()


def _first(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def uses_running_stats_in_training(module: nn.Module) -> bool:
    """True for layers whose training-mode output reads their running statistics: bnrs always,
    brn once its r and d limits open. Layers after such a layer see features that depend on
    its running statistics, so those must be recalibrated before the later layers are."""
    return isinstance(module, (BatchNormRS, BatchRenorm))


@torch.no_grad()
def update_bn_stats(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 200,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """Replace every stat-tracking layer's running statistics by the exact population statistics
    of its inputs over ``num_batches`` batches (PreciseBN; Wu & Johnson 2021, "Rethinking
    'Batch' in BatchNorm", Sec. 3; fvcore's ``update_bn_stats`` is the reference behaviour).

    As fvcore does, the model runs in training mode, so each layer sees the features that
    training produces, and the statistics are those of all inputs pooled: fvcore sets momentum
    to 1 and folds each batch's mean and Bessel-corrected variance, weighted by its size
    (spatial positions included), into the mean and the biased variance of every input seen
    (its ``_PopulationVarianceEstimator``; the plain average of per-batch variances is its other,
    older estimator). Here each batch's per-channel mean and sum of squared deviations are merged
    in float64 and each layer gets the pooled mean and the unbiased variance, n / (n - 1) times fvcore's,
    as torch keeps running_var unbiased.

    Meanwhile no layer's statistics move (momenta are 0) and brn's step count stays where
    training left it, so its r and d limits are those of the trained model on every batch.
    Layers that read their running statistics in training (``uses_running_stats_in_training``:
    bnrs, brn) change what every later layer sees once they are recalibrated, so the layers are
    then recalibrated in depth order, each pass ending at such a layer: one pass over the
    batches when there is none, up to one per layer otherwise (an iterator of batches is kept
    in memory for the later passes; a DataLoader is iterated again). Modes, momenta, hooks,
    ``num_batches_tracked`` and ``NormBatch``'s step counts are restored in a ``finally``.

    Args:
        model: the model; its layers may be on any device.
        batches: an iterable of batches, e.g. a DataLoader.
        num_batches: how many batches to use at most.
        forward: ``forward(model, batch)``; by default ``model(batch[0])`` for a tuple batch,
            else ``model(batch)``. Pass one that moves the batch to the model's device.

    Returns:
        The number of batches used.
    """
    layers = [m for m in model.modules() if tracks_running_stats(m)]
    if not layers:
        return 0
    forward = forward or (lambda m, batch: m(_first(batch)))
    if any(uses_running_stats_in_training(m) for m in layers) and iter(batches) is batches:
        batches = list(islice(batches, num_batches))  # a one-shot iterator, kept for the later passes
    sums: dict[nn.Module, Any] = {}
    order: list[nn.Module] = []  # depth order: the order the layers run in
    active: set[nn.Module] = set(layers)
    modes = {m: m.training for m in model.modules()}
    saved = {
        m: (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in layers
    }

    def accumulate(layer, args):
        if layer not in order:
            order.append(layer)
        tracked = saved[layer][1]
        if tracked is not None:
            layer.num_batches_tracked.copy_(tracked)  # brn's schedule reads it: hold it still
        if layer not in active:
            return
        x = args[0].detach()
        dims = [0] + list(range(2, x.dim()))
        # Each batch's mean and sum of squared deviations in one stable pass at the input's
        # precision (at least float32), merged across batches in float64 (Chan et al. 1979):
        # as exact as float64 sums to float32's precision, without a float64 copy of every activation.
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        n = torch.full_like(mean, x.numel() / x.shape[1], dtype=torch.float64)
        batch = torch.stack([n, mean.double(), var.double() * n])
        sums[layer] = batch if layer not in sums else _merge(sums[layer], batch)

    # brn in norm batches reads its schedule from its NormBatch's count of steps: held too.
    steps = {m: m.steps.clone() for m in model.modules() if isinstance(m, NormBatch) and m.scheduled}

    def hold_steps(wrapper, args):
        wrapper.steps.copy_(steps[wrapper])

    hooks = [m.register_forward_pre_hook(accumulate) for m in layers]
    hooks += [m.register_forward_pre_hook(hold_steps) for m in steps]
    used = 0
    done: list[nn.Module] = []
    try:
        model.train()
        for m in layers:
            m.momentum = 0.0
        while True:
            sums.clear()
            used = 0
            for batch in islice(batches, num_batches):
                forward(model, batch)
                used += 1
            if used == 0:
                break
            # This pass is exact for the layers up to the first one whose update changes what
            # later layers see; those later layers go again, on the recalibrated ones.
            pending = [m for m in order if m not in done]
            cut = next((i for i, m in enumerate(pending) if uses_running_stats_in_training(m)), len(pending) - 1)
            for m in pending[: cut + 1]:
                _set_population_stats(m, sums[m])
                done.append(m)
            active = set(pending[cut + 1 :])
            if not active:
                break
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, (momentum, tracked) in saved.items():
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        for m, count in steps.items():
            m.steps.copy_(count)
    if used == 0:
        raise ValueError("update_bn_stats got no batches: pass a non-empty loader and num_batches >= 1")
    return used


def _merge(a: Tensor, b: Tensor) -> Tensor:
    """(count, mean, sum of squared deviations) of two groups of values pooled."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return torch.stack([n, ma + delta * nb / n, sa + sb + delta.square() * na * nb / n])


def _set_population_stats(m: nn.Module, sums) -> None:
    n, mean, m2 = sums
    # Unbiased population variance: the pooled sum of squared deviations / (n - 1).
    var = m2 / (n - 1).clamp_min(1)
    m.running_mean.copy_(mean.to(m.running_mean.dtype))
    m.running_var.copy_(var.to(m.running_var.dtype))
