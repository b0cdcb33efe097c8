"""PreciseBN: exact population statistics for every layer that tracks running statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn


def tracks_running_stats(module: nn.Module) -> bool:
    """True for layers with torch's running-statistics buffers (bn, bnrs, brn, ghost_bn, evonorm_b0)."""
    return getattr(module, "running_var", None) is not None and hasattr(module, "momentum")


def _first(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


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
    training produces; momenta are set to 0 meanwhile, so that no running statistic moves (bnrs
    and brn read them in training) and every batch sees the same model. The inputs' per-channel
    sums are accumulated in float64, and the layers then get their exact mean and unbiased
    variance (running_var is unbiased, as in torch). fvcore averages per-batch variances
    instead, which misses the spread of the batch means. Modes, momenta, hooks and
    ``num_batches_tracked`` (brn's schedule) are restored in a ``finally``.

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
    sums = {m: None for m in layers}

    def accumulate(layer, args):
        x = args[0].detach().to(torch.float64)
        dims = [0] + list(range(2, x.dim()))
        s = torch.stack([x.new_full((x.shape[1],), x.numel() / x.shape[1]), x.sum(dims), x.square().sum(dims)])
        sums[layer] = s if sums[layer] is None else sums[layer] + s

    modes = {m: m.training for m in model.modules()}
    saved = {
        m: (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in layers
    }
    hooks = [m.register_forward_pre_hook(accumulate) for m in layers]
    used = 0
    try:
        model.train()
        for m in layers:
            m.momentum = 0.0
        for batch in islice(batches, num_batches):
            forward(model, batch)
            used += 1
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for m, (momentum, tracked) in saved.items():
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    if used == 0:
        raise ValueError("update_bn_stats got no batches: pass a non-empty loader and num_batches >= 1")
    for m in layers:
        n, s, sq = sums[m]
        mean = s / n
        # Unbiased population variance from the exact sums: (sum x^2 - n mean^2) / (n - 1).
        var = (sq - n * mean.square()) / (n - 1).clamp_min(1)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return used
