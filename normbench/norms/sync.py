"""Switch a whole model to cross-process norm statistics, without Lightning."""

from __future__ import annotations

from torch import nn

from normbench.norms.batch_norm import SyncBatchNorm
from normbench.norms.stats import RunningStatsNorm


def convert_sync_norms(module: nn.Module, process_group=None) -> nn.Module:
    """Make every norm layer in ``module`` compute batch statistics over all processes.

    torch BatchNorm layers (``bn``) become ``normbench.norms.SyncBatchNorm`` (torch's
    SyncBatchNorm, also on CPU), sharing their parameters and buffers; layers built on
    ``RunningStatsNorm`` (bnrs, brn, ghost_bn, evonorm_b0) get ``sync_stats = True``.
    Batch-independent norms are left alone. Use it in place of Lightning's
    ``sync_batchnorm=True``, which knows only torch's BatchNorm.

    Args:
        module: the model (or a single layer).
        process_group: group to reduce over; None is the whole world.

    Returns:
        The model, converted in place; a new layer when ``module`` itself is a BatchNorm.
    """
    if isinstance(module, RunningStatsNorm):
        module.sync_stats, module.process_group = True, process_group
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) is not SyncBatchNorm:
        sync = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        module = sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_norms(child, process_group))
    return module
