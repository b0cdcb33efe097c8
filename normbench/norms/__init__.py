"""The normalization layers under study: plain PyTorch, no Lightning.

``create_norm(name, num_features, **kwargs)`` builds any of ``NORMS``; ``convert_sync_norms``
turns on cross-process statistics for a whole model; ``update_bn_stats`` is PreciseBN.
"""

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
from normbench.norms.norm_batch import BATCH_NORMS, NormBatch, check_norm_batch, norm_batch_factory
from normbench.norms.precise_bn import freeze_running_stats, tracks_running_stats, update_bn_stats
from normbench.norms.registry import NORMS, NormName, check_options, create_norm, options_of
from normbench.norms.rms_norm import RmsNorm2d
from normbench.norms.stats import RunningStatsNorm
from normbench.norms.sync import convert_sync_norms, local_norms
from normbench.norms.weight_standardization import (
    GammaActivation,
    ScaledWSConv2d,
    WSConv2d,
    activation_gain,
    adaptive_clip_grad,
)

__all__ = [
    "BATCH_NORMS",
    "NORMS",
    "BatchNorm",
    "BatchNormRS",
    "BatchRenorm",
    "DynamicTanh",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "FrozenBatchNorm",
    "GammaActivation",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "NoNorm",
    "NormBatch",
    "NormName",
    "RmsNorm2d",
    "RunningStatsNorm",
    "ScaledWSConv2d",
    "WSConv2d",
    "activation_gain",
    "adaptive_clip_grad",
    "check_norm_batch",
    "check_options",
    "convert_sync_norms",
    "create_norm",
    "freeze_running_stats",
    "local_norms",
    "norm_batch_factory",
    "options_of",
    "tracks_running_stats",
    "update_bn_stats",
]
