"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from normbench.norms.stats import RunningStatsNorm, scale_shift, sync_active, update_running_stats


class GhostBatchNorm(RunningStatsNorm):
    """``ghost_bn``: Ghost BatchNorm (Hoffer et al. 2017, "Train longer, generalize better",
    arXiv 1705.08741, Algorithm 1).

    The batch is split, in order, into virtual ("ghost") batches of ``virtual_batch_size``
    samples (the last may be smaller); each is normalized by its own moments exactly as
    BatchNorm would, y = gamma * (x - mu_l) / sqrt(sigma_l^2 + eps) + beta. The running
    statistics take one update per ghost batch, in order, which is the paper's weighted sum
    mu_run = (1-eta)^L mu_run + sum_l eta (1-eta)^(L-l) mu_l; ``num_batches_tracked`` therefore
    counts ghost batches, as BatchNorm applied to each one would. Eval uses the running
    statistics.

    With ``sync_stats`` across processes, ghost batches are cut from the global batch in rank
    order, so a ghost batch that straddles two ranks is normalized as one. Every rank must hold
    a batch of the same size, as Lightning's distributed samplers (and normbench's in-memory
    loader) give every rank in every training step: rank r's samples are then r * B ... r * B +
    B - 1 of the global batch, known on the host with no exchange of sizes (an all-gather and
    a host read per layer and step). The reduced counts are checked on the device
    (``torch._assert_async``, no host sync) against that assumption.

    Args:
        num_features: number of channels C.
        virtual_batch_size: samples per ghost batch. 32 is a common choice in small-batch
            studies; at batch sizes <= 32 the layer is plain BatchNorm.
        eps: added to the variance.
        momentum: running-statistics factor per ghost batch (None: cumulative average).
        affine: learn gamma and beta.
        sync_stats: cut ghost batches from the global batch across processes.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        sync_stats: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, sync_stats)
        if virtual_batch_size < 1:
            raise ValueError(f"ghost_bn: virtual_batch_size={virtual_batch_size} must be >= 1")
        self.virtual_batch_size = virtual_batch_size

    def _global_position(self, x: Tensor) -> tuple[int, int]:
        """(offset of this rank's first sample, size of the global batch), every rank holding
        ``x.shape[0]`` samples."""
        if not (self.sync_stats and sync_active(self.process_group)):
            return 0, x.shape[0]
        world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        return rank * x.shape[0], world * x.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return self._by_running_stats(x)
        offset, total = self._global_position(x)
        num_ghosts = -(-total // self.virtual_batch_size)
        # As torch's BatchNorm refuses a batch of one value per channel (its variance is 0 and
        # would be folded into running_var), so does every ghost batch; the last is the smallest.
        last = total - (num_ghosts - 1) * self.virtual_batch_size
        per_sample = x[0, 0].numel() if x.shape[0] else 1
        if last * per_sample <= 1:
            raise ValueError(
                f"ghost_bn: expected more than 1 value per channel in every ghost batch when training, got a "
                f"last ghost batch of {last} sample(s) of shape {tuple(x.shape[1:])} (batch {total}, "
                f"virtual_batch_size {self.virtual_batch_size}); use a batch size that leaves no 1-sample ghost batch"
            )
        index = torch.div(
            torch.arange(offset, offset + x.shape[0], device=x.device), self.virtual_batch_size, rounding_mode="floor"
        )
        mean, var, count = self._moments(x, groups=(index, num_ghosts))  # (G, C), (G, C), (G,)
        if total != x.shape[0]:
            # Ranks of unequal batches would disagree on the ghost batches: their counts then
            # do not sum to the assumed global batch.
            torch._assert_async(count.sum() == total * per_sample, "ghost_bn: ranks hold batches of unequal size")
        inv_std = torch.rsqrt(var + self.eps)
        scale = inv_std[index]
        y = scale_shift(x, scale, -mean[index] * scale, self.weight, self.bias)
        for g in range(num_ghosts):
            update_running_stats(self, mean[g], var[g], count[g])
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"
