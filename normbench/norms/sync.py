"""Switch a whole model to cross-process norm statistics, without Lightning."""

from __future__ import annotations

import torch
from torch import nn

from normbench.norms.batch_norm import BatchNorm
from normbench.norms.stats import RunningStatsNorm


def _as_synced_bn(module: nn.modules.batchnorm._BatchNorm, process_group) -> BatchNorm:
    """``module`` as a ``bn`` layer with ``sync_stats``, sharing its parameters and buffers."""
    if not isinstance(module, BatchNorm):
        bn = BatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            bn.weight, bn.bias = module.weight, module.bias
        bn.running_mean, bn.running_var = module.running_mean, module.running_var
        bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        module = bn
    module.sync_stats, module.process_group = True, process_group
    return module


def convert_sync_norms(module: nn.Module, process_group=None, device: torch.device | str | None = None) -> nn.Module:
    """Make every norm layer in ``module`` compute batch statistics over all processes.

    BatchNorm layers become torch's ``SyncBatchNorm`` on accelerators. On CPU, where torch's
    SyncBatchNorm and DDP refuse to run it, they become ``bn`` layers with ``sync_stats``,
    which reduce the same statistics. Layers built on ``RunningStatsNorm`` (bnrs, brn, ghost_bn,
    evonorm_b0) get ``sync_stats = True``. Batch-independent norms are left alone. Use it in
    place of Lightning's ``sync_batchnorm=True``, which knows only torch's BatchNorm.

    Args:
        module: the model (or a single layer).
        process_group: group to reduce over; None is the whole world.
        device: where the model will train; None reads it off the first parameter or buffer.

    Returns:
        The model, converted in place; a new layer when ``module`` itself is a BatchNorm.
    """
    if device is None:
        tensors = [*module.parameters(), *module.buffers()]
        device = tensors[0].device if tensors else "cpu"
    if torch.device(device).type != "cpu":
        return _convert(nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group), process_group, False)
    return _convert(module, process_group, True)


def _convert(module: nn.Module, process_group, convert_bn: bool) -> nn.Module:
    if isinstance(module, RunningStatsNorm):
        module.sync_stats, module.process_group = True, process_group
    if convert_bn and isinstance(module, nn.modules.batchnorm._BatchNorm):
        module = _as_synced_bn(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, _convert(child, process_group, convert_bn))
    return module


def local_norms(module: nn.Module) -> nn.Module:
    """Undo ``convert_sync_norms``: every norm computes statistics of its own process's batch.

    For work one rank does alone (PreciseBN on a copy of the model, say), where a reduction
    across processes would wait forever for the others.

    Args:
        module: the model (or a single layer).

    Returns:
        The model, converted in place; a new layer when ``module`` itself is a SyncBatchNorm.
    """
    if isinstance(module, (RunningStatsNorm, BatchNorm)):
        module.sync_stats = False
    if isinstance(module, nn.SyncBatchNorm):
        module = _as_synced_bn(module, None)
        module.sync_stats = False
    for name, child in module.named_children():
        module.add_module(name, local_norms(child))
    return module
