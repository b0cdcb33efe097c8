"""Batch statistics shared by every layer that normalizes with, or tracks, batch moments.

One place computes per-channel batch moments, optionally reduced across processes, and one
place updates running statistics, so that bnrs, brn, ghost_bn, evonorm_b0 and bn's
cross-process path agree on what "batch statistics" mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def sync_active(process_group=None) -> bool:
    """True when a process group with more than one rank is there to reduce over."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``process_group``, differentiable.

    The backward of a summed all-reduce is a summed all-reduce of the gradients, so every
    rank's share of the loss reaches the inputs of every other rank. Both directions are plain
    ``dist.all_reduce`` calls, as in torch's own SyncBatchNorm (``torch/nn/modules/_functions.py``).
    The deprecated ``torch.distributed.nn.functional.all_reduce`` did the same math, but a
    backward through it followed by ``destroy_process_group`` aborted the process at exit
    (SIGABRT) about one time in ten.
    """

    @staticmethod
    def forward(ctx, t: Tensor, process_group) -> Tensor:
        ctx.process_group = process_group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=process_group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
        return grad, None


def _all_reduce(t: Tensor, process_group) -> Tensor:
    # Under no_grad the Function records nothing: a plain all-reduce.
    return _AllReduceSum.apply(t, process_group)


@torch.library.custom_op("normbench::buffer_snapshot", mutates_args=())
def _buffer_snapshot(t: Tensor) -> Tensor:
    return t.clone()


@_buffer_snapshot.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def read_buffer(t: Tensor) -> Tensor:
    """A running-statistics buffer's value where a training forward reads it.

    Eagerly the buffer itself. Under ``torch.compile`` (``--model.compile``) a copy made by an
    opaque op, which AOTAutograd saves for the backward: a value it can recompute it would
    recompute there from the buffer, which the same graph's running-statistics update has
    changed in place by then, so bnrs's and brn's gradients came from the updated statistics
    (torch 2.14; up to 5% of a gradient at the first step, measured against eager). One copy
    of C values per read, and none eagerly.
    """
    return _buffer_snapshot(t) if torch.compiler.is_compiling() else t


def broadcast_shape(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel (C,) tensor against an (N, C, *) input."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def batch_moments(
    x: Tensor,
    sync: bool = False,
    process_group=None,
    differentiable: bool = True,
    groups: tuple[Tensor, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and count of ``x`` over every dim but the channel dim.

    Across processes the sums and the count are reduced, so ranks holding unequal batches
    still get the statistics of the union. Per group or across processes the variance is
    taken in two passes, the second around the first's mean (corrected two-pass: Chan, Golub
    & LeVeque 1983): no cancellation however far the mean lies from zero, at the price of a
    second reduction (a second all-reduce across processes).

    Args:
        x: input of shape (N, C, *).
        sync: reduce over ``process_group`` when one with more than one rank exists.
        process_group: group to reduce over; None is the whole world.
        differentiable: let gradients flow through the reduction (and the statistics).
        groups: optional (index, G): sample n belongs to group index[n] of G groups (ghost
            batches); statistics are then returned per group with shape (G, C).

    Returns:
        mean and biased variance of shape (C,) or (G, C), and the count: a Python number for one
        process's whole batch (it is known on the host; a tensor made from it would be a
        host-to-device copy in every training step), else a tensor of shape () or (G,).
    """
    reduce = sync and sync_active(process_group)
    if not differentiable:
        with torch.no_grad():
            return batch_moments(x, reduce, process_group, True, groups)
    if x.dtype in (torch.float16, torch.bfloat16):
        # Under autocast (bf16-mixed) the input is half precision; statistics stay in float32,
        # as torch's BatchNorm keeps them, and so do the running buffers they update.
        x = x.float()
    per_sample = x.numel() // max(x.shape[0] * x.shape[1], 1)
    if groups is None and not reduce:
        if x.shape[0] * per_sample <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var, float(x.shape[0] * per_sample)
    c = x.shape[1]
    flat = x.reshape(x.shape[0], c, -1)

    def total(per_sample_sums: Tensor) -> Tensor:
        """(N, k) sums per sample -> per group (G, k) or in all (k,), across processes too."""
        if groups is None:
            out = per_sample_sums.sum(0)
        else:
            out = per_sample_sums.new_zeros(groups[1], per_sample_sums.shape[1]).index_add(
                0, groups[0], per_sample_sums
            )
        return _all_reduce(out, process_group) if reduce else out

    n = torch.full((x.shape[0], 1), float(per_sample), dtype=x.dtype, device=x.device)
    first = total(torch.cat([flat.sum(2), n], dim=1))  # (.., C + 1)
    count = first[..., c]
    mean = first[..., :c] / count.unsqueeze(-1)
    around = mean.expand(x.shape[0], c) if groups is None else mean[groups[0]]  # each sample's mean, (N, C)
    centred = flat - around.unsqueeze(-1)
    second = total(torch.cat([centred.sum(2), centred.square().sum(2)], dim=1))  # (.., 2C)
    residual, square = second[..., :c] / count.unsqueeze(-1), second[..., c:] / count.unsqueeze(-1)
    return mean + residual, (square - residual.square()).clamp_min(0), count


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor, weight=None, bias=None) -> Tensor:
    """y = (x * scale + shift) * weight + bias, as one fused multiply-add over x.

    scale and shift are per channel, (C,), or per sample and channel, (N, C). The output has x's
    dtype, as torch's BatchNorm returns: half-precision inputs (bf16-true, or a conv's output
    under autocast) are scaled in the statistics' float32 and the result is rounded once.
    """
    if weight is not None:
        scale, shift = scale * weight, shift * weight + bias
    shape = (-1, x.shape[1]) + (1,) * (x.dim() - 2)
    return in_dtype_of(x, torch.addcmul(shift.reshape(shape), x, scale.reshape(shape)))


def in_dtype_of(x: Tensor, y: Tensor) -> Tensor:
    """``y`` in ``x``'s dtype, as torch's norms return: a layer whose statistics are float32 for
    half-precision ``x`` rounds its output once. No call where the dtypes agree (1 us each)."""
    return y if y.dtype == x.dtype else y.to(x.dtype)


@torch.no_grad()
def update_running_stats(layer: nn.Module, mean: Tensor, var: Tensor, count: Tensor | float) -> None:
    """Fold one batch's mean and biased variance into ``layer``'s running statistics.

    As torch's BatchNorm does: running = (1 - momentum) * running + momentum * batch, with the
    unbiased variance, and a cumulative average when momentum is None. Nothing here reads a
    device value on the host: the cumulative factor 1 / num_batches_tracked stays a tensor.

    Args:
        layer: a layer with torch's buffer names and a ``momentum``.
        mean: the batch mean, (C,).
        var: the biased batch variance, (C,).
        count: values per channel behind them, a number or a tensor of shape ().
    """
    layer.num_batches_tracked.add_(1)
    if layer.momentum is None:
        factor = layer.num_batches_tracked.to(layer.running_mean.dtype).reciprocal()
    else:
        factor = layer.momentum
    if isinstance(count, Tensor):
        unbiased = var * (count / (count - 1).clamp_min(1))
    else:
        unbiased = var * (count / max(count - 1, 1))
    layer.running_mean.lerp_(mean.detach().to(layer.running_mean.dtype), factor)
    layer.running_var.lerp_(unbiased.detach().to(layer.running_var.dtype), factor)


class RunningStatsNorm(nn.Module):
    """Base of the custom layers that track running statistics, with torch's buffer names.

    It deliberately does not subclass torch's ``_BatchNorm``: Lightning's
    ``sync_batchnorm=True`` would silently replace such a layer by a plain SyncBatchNorm.
    Cross-process statistics are switched on with ``sync_stats`` (see ``norms.sync``).

    Args:
        num_features: number of channels C of an (N, C, *) input.
        eps: added to the variance before the square root.
        momentum: running-statistics factor as in torch (None: cumulative average).
        affine: learn a per-channel scale and shift.
        sync_stats: reduce batch statistics across processes when a process group exists.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        sync_stats: bool = False,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features={num_features} must be at least 1")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.sync_stats = sync_stats
        self.process_group = None
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, {self.num_features}, *), got {tuple(x.shape)}"
            )

    def _by_running_stats(self, x: Tensor) -> Tensor:
        """gamma * (x - running_mean) / sqrt(running_var + eps) + beta: eval of every BN-like layer."""
        inv_std = torch.rsqrt(read_buffer(self.running_var) + self.eps)
        return scale_shift(x, inv_std, -read_buffer(self.running_mean) * inv_std, self.weight, self.bias)

    def _moments(self, x: Tensor, differentiable: bool = True, groups=None):
        return batch_moments(x, self.sync_stats, self.process_group, differentiable, groups)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, sync_stats={self.sync_stats}"
        )
