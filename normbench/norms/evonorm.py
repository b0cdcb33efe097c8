"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normbench.norms.group_norm import check_groups
from normbench.norms.stats import RunningStatsNorm, broadcast_shape, in_dtype_of, update_running_stats


def _instance_var(x: Tensor) -> Tensor:
    """Biased variance over the spatial dims per (sample, channel); 0 for an (N, C) input."""
    if x.dim() == 2:
        return torch.zeros_like(x)
    return x.var(dim=tuple(range(2, x.dim())), correction=0, keepdim=True)


class EvoNormB0(RunningStatsNorm):
    """``evonorm_b0``: EvoNorm-B0 (Liu et al. 2020, "Evolving Normalization-Activation Layers",
    arXiv 2004.02967, Table 1)::

        y = x / max(sqrt(s^2_{N,*}(x) + eps), v1 * x + sqrt(s^2_{*}(x) + eps)) * gamma + beta

    s^2_{N,*} is the biased batch variance per channel (over samples and space), with gradient
    through it as in BatchNorm; in eval its running average replaces it (unbiased, as torch
    keeps running_var). s^2_{*} is the per-sample instance variance. ``running_mean`` is kept
    too, for diagnostics and PreciseBN, though B0's output does not use it.

    Args:
        num_features: number of channels C.
        eps: added to both variances.
        momentum: running-statistics factor (None: cumulative average).
        sync_stats: reduce the batch variance across processes.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, sync_stats: bool = False
    ) -> None:
        super().__init__(num_features, eps, momentum, True, sync_stats)
        self.v1 = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        shape = broadcast_shape(x)
        if self.training:
            mean, var, count = self._moments(x)
            update_running_stats(self, mean, var, count)
        else:
            var = self.running_var
        batch_std = torch.sqrt(var + self.eps).reshape(shape)
        instance = self.v1.reshape(shape) * x + torch.sqrt(_instance_var(x) + self.eps)
        y = x / torch.maximum(batch_std, instance) * self.weight.reshape(shape) + self.bias.reshape(shape)
        return in_dtype_of(x, y)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, sync_stats={self.sync_stats}"


class EvoNormS0(nn.Module):
    """``evonorm_s0``: EvoNorm-S0 (Liu et al. 2020, arXiv 2004.02967, Table 1)::

        y = x * sigmoid(v1 * x) / sqrt(s^2_{C/G,*}(x) + eps) * gamma + beta

    s^2_{C/G,*} is the per-sample biased variance over each group of C/G channels and space, as
    in Group Norm. Batch-independent, identical in training and eval.

    Args:
        num_features: number of channels C.
        num_groups: number of groups G, which must divide C; 32 as in the paper.
        eps: added to the variance.
    """

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        check_groups("evonorm_s0", num_groups, num_features)
        self.num_features, self.num_groups, self.eps = num_features, num_groups, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v1 = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = broadcast_shape(x)
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        std = torch.sqrt(grouped.var(dim=2, correction=0, keepdim=True) + self.eps)
        std = std.expand_as(grouped).reshape(x.shape)
        y = x * torch.sigmoid(self.v1.reshape(shape) * x) / std
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"
