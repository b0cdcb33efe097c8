"""BatchNorm (Ioffe & Szegedy 2015) and BatchNorm with running statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normbench.norms.stats import (
    RunningStatsNorm,
    batch_moments,
    scale_shift,
    sync_active,
    update_running_stats,
)


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """``bn``: Batch Normalization (Ioffe & Szegedy 2015, arXiv 1502.03167, Algorithm 1).

    y = gamma * (x - mu_B) / sqrt(sigma_B^2 + eps) + beta over (N, *) per channel in training;
    the running mean and unbiased variance replace the batch moments in eval. This is torch's
    own BatchNorm, which it stays so that cuDNN and ``SyncBatchNorm`` conversion apply; it only
    accepts every (N, C, *) input rather than one rank per class.

    ``sync_stats`` computes the batch moments over all processes by reducing the sum, the sum
    of squares and the count, with gradients through them. ``convert_sync_norms`` uses it where
    torch's SyncBatchNorm cannot run (CPU process groups, where torch and DDP refuse it) and
    torch's SyncBatchNorm everywhere else.

    ``update_first`` is accepted so that every BN-like layer takes study 1's option, and changes
    nothing here: the training output uses only the batch moments, so updating the running
    statistics before or after normalizing gives the same output and the same buffers.

    Args:
        num_features: number of channels C.
        eps: added to the variance.
        momentum: running-statistics factor (None: cumulative average).
        affine: learn gamma and beta.
        track_running_stats: keep running statistics for eval.
        sync_stats: reduce batch moments across processes.
        update_first: study 1's order (update the running statistics, then normalize); the same
            as the default for this layer.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        sync_stats: bool = False,
        update_first: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.sync_stats = sync_stats
        self.update_first = update_first
        self.process_group = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, *) input, got {input.dim()}D input")

    def forward(self, input: Tensor) -> Tensor:
        synced = self.training and self.sync_stats and sync_active(self.process_group)
        cumulative = self.training and self.track_running_stats and self.momentum is None
        if not (synced or cumulative):
            return super().forward(input)
        self._check_input_dim(input)
        if not synced:
            # A cumulative average (momentum None): torch's BatchNorm reads num_batches_tracked on
            # the host for its factor, a host sync every step that vmap (packed runs) cannot
            # trace. The same update with the factor kept on the device, then torch's batch norm
            # without running statistics.
            mean, var, count = batch_moments(input, differentiable=False)
            update_running_stats(self, mean, var, count)
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        mean, var, count = batch_moments(input, True, self.process_group)
        if self.track_running_stats:
            update_running_stats(self, mean, var, count)
        inv_std = torch.rsqrt(var + self.eps)
        return scale_shift(input, inv_std, -mean * inv_std, self.weight, self.bias)


class BatchNormRS(RunningStatsNorm):
    """``bnrs``: BatchNorm that normalizes by its running statistics in training too.

    y = gamma * (x - mu_run) / sqrt(sigma^2_run + eps) + beta in training as in eval. The batch
    moments only update mu_run and sigma^2_run (unbiased, momentum as in torch), with no gradient
    through them, so dy/dx = gamma / sqrt(sigma^2_run + eps). This is the layer of "Why don't we
    simply use running statistics for batch normalization training?".

    Order: by default the current batch is normalized by the statistics as they stood *before*
    it, and updates them afterwards. A batch never sees itself, and the forward equals Batch
    Renormalization (Ioffe 2017) in its limit r_max, d_max -> inf, where BRN also normalizes by
    the pre-update running statistics. ``update_first=True`` is study 1's published layer: the
    batch first updates mu_run and sigma^2_run, which then normalize it (still no gradient
    through them), so each batch moves its own normalization by ``momentum``.

    Args:
        num_features: number of channels C.
        eps: added to the variance.
        momentum: running-statistics factor (None: cumulative average).
        affine: learn gamma and beta.
        sync_stats: reduce the batch moments across processes (no gradient either way).
        update_first: update the running statistics with this batch, then normalize by them.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        sync_stats: bool = False,
        update_first: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, sync_stats)
        self.update_first = update_first

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return self._by_running_stats(x)
        if not self.update_first:
            y = self._by_running_stats(x)  # before this batch updates the statistics
        mean, var, count = self._moments(x, differentiable=False)
        update_running_stats(self, mean, var, count)
        return self._by_running_stats(x) if self.update_first else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, update_first={self.update_first}"
