"""Batch Renormalization (Ioffe 2017)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normbench.norms.stats import RunningStatsNorm, read_buffer, scale_shift, update_running_stats


class BatchRenorm(RunningStatsNorm):
    """``brn``: Batch Renormalization (Ioffe 2017, arXiv 1702.03275, Algorithm 1).

    In training, per channel::

        sigma_B = sqrt(biased batch variance + eps)        sigma = sqrt(running_var + eps)
        r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))
        d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
        x_hat = (x - mu_B) / sigma_B * r + d               y = gamma * x_hat + beta

    r and d use the running statistics as they stand before this batch, which then updates them.
    Gradients flow through mu_B and sigma_B. In eval y = gamma * (x - mu) / sigma + beta.

    One deliberate difference from the paper: it averages sigma, this layer averages the
    unbiased variance as torch's BatchNorm does, so the buffers mean the same in every layer
    and r_max = 1, d_max = 0 is exactly BatchNorm.

    Schedule (Sec. 4 of the paper): r_max = 1 and d_max = 0 for ``warmup_steps`` steps, then
    linear ramps over ``r_max_ramp_steps`` and ``d_max_ramp_steps`` to the final limits; all
    three 0 applies the final limits from the first step. The step count is
    ``num_batches_tracked``, so the schedule survives a checkpoint; a caller that updates the
    statistics several times a step (``NormBatch``'s groups) passes its own count of training
    steps as ``step``. The paper warms up for 5k
    steps and opens r_max = 3 at 40k and d_max = 5 at 25k of runs of 100k+ steps. The studies'
    runs are 10 epochs, as short as 3,910 steps (CIFAR-100 at batch size 128), so the defaults
    scale that down: 200 warm-up steps are 20 time constants of a momentum-0.1 running average,
    which is what warm-up waits for, and the limits are fully open by step 1,200, under a third
    of the shortest run, so that BRN's correction acts for most of every run.

    Study 1's published layer ("Why don't we simply use running statistics for batch
    normalization training?") is this one with ``r_max=None, d_max=None`` (no clipping; with
    ``warmup_steps=0`` not even at the start), ``update_first=True`` (the batch updates mu and
    sigma first, and r and d use the updated ones) and ``r_eps=False`` (r = sqrt(var_B) / sigma,
    no eps under the batch square root). Its later clipped variant is ``r_max=3, d_max=5`` with
    all three schedule steps 0.

    Args:
        num_features: number of channels C.
        r_max: final upper clip of r (>= 1); None or inf: r is never clipped after warm-up.
        d_max: final clip of |d| (>= 0); None or inf: d is never clipped after warm-up.
        warmup_steps: steps with r_max = 1 and d_max = 0.
        r_max_ramp_steps: steps after warm-up over which r_max rises linearly to its final value
            (an unbounded r_max applies at once).
        d_max_ramp_steps: steps after warm-up over which d_max rises linearly to its final value
            (an unbounded d_max applies at once).
        eps: added to the variances.
        momentum: running-statistics factor (None: cumulative average).
        affine: learn gamma and beta.
        sync_stats: reduce batch moments across processes, with gradients through them.
        update_first: fold this batch into the running statistics before computing r and d
            (study 1); False uses them as they stood before the batch (Algorithm 1).
        r_eps: r = sqrt(var_B + eps) / sigma as in Algorithm 1; False: sqrt(var_B) / sigma as in
            study 1. x_hat always divides by sqrt(var_B + eps).
    """

    def __init__(
        self,
        num_features: int,
        r_max: float | None = 3.0,
        d_max: float | None = 5.0,
        warmup_steps: int = 200,
        r_max_ramp_steps: int = 1000,
        d_max_ramp_steps: int = 500,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        sync_stats: bool = False,
        update_first: bool = False,
        r_eps: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, sync_stats)
        r_max = math.inf if r_max is None else float(r_max)
        d_max = math.inf if d_max is None else float(d_max)
        if not r_max >= 1:
            raise ValueError(
                f"brn: r_max={r_max} must be >= 1 (1 turns the r correction off, null leaves r unclipped); "
                "the paper uses 3"
            )
        if not d_max >= 0:
            raise ValueError(
                f"brn: d_max={d_max} must be >= 0 (0 turns the d correction off, null leaves d unclipped); "
                "the paper uses 5"
            )
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("r_max_ramp_steps", r_max_ramp_steps),
            ("d_max_ramp_steps", d_max_ramp_steps),
        ):
            if value < 0:
                raise ValueError(f"brn: {name}={value} must be >= 0")
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps = warmup_steps
        self.r_max_ramp_steps = r_max_ramp_steps
        self.d_max_ramp_steps = d_max_ramp_steps
        self.update_first = update_first
        self.r_eps = r_eps

    def _ramp(self, ramp_steps: int, final: float, step: Tensor | None = None) -> Tensor:
        """Fraction of the way from the warm-up limit to the final one, as a device tensor."""
        t = read_buffer(self.num_batches_tracked if step is None else step).to(torch.float32)
        if ramp_steps == 0 or math.isinf(final):
            return (t >= self.warmup_steps).to(torch.float32)
        return ((t - self.warmup_steps) / ramp_steps).clamp(0, 1)

    def current_limits(self, step: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The (r_max, d_max) that apply to the next training batch, at training step ``step``
        (default: ``num_batches_tracked``); tensors, no host sync."""
        r_ramp = self._ramp(self.r_max_ramp_steps, self.r_max, step)
        d_ramp = self._ramp(self.d_max_ramp_steps, self.d_max, step)
        # An unbounded limit jumps from its warm-up value to inf (inf * 0 would be nan).
        r_max = torch.where(r_ramp > 0, 1 + (self.r_max - 1) * r_ramp, 1.0)
        d_max = torch.where(d_ramp > 0, self.d_max * d_ramp, 0.0)
        return r_max, d_max

    def forward(self, x: Tensor, step: Tensor | None = None) -> Tensor:
        """Args: x: (N, C, *); step: the training step the schedule reads (default:
        ``num_batches_tracked``, one per batch)."""
        self._check_input(x)
        if not self.training:
            return self._by_running_stats(x)
        mean, var, count = self._moments(x)
        std_b = torch.sqrt(var + self.eps)
        with torch.no_grad():
            r_max, d_max = self.current_limits(step)
            if self.update_first:
                update_running_stats(self, mean, var, count)
            std = torch.sqrt(read_buffer(self.running_var) + self.eps)
            r = (std_b if self.r_eps else torch.sqrt(var)) / std
            r = torch.clamp(r, 1 / r_max, r_max)
            d = torch.clamp((mean - read_buffer(self.running_mean)) / std, -d_max, d_max)
        # x_hat = (x - mu_B) * (r / sigma_B) + d, folded into one multiply-add over x.
        scale = r / std_b
        y = scale_shift(x, scale, d - mean * scale, self.weight, self.bias)
        if not self.update_first:
            update_running_stats(self, mean, var, count)
        return y

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_ramp_steps={self.r_max_ramp_steps}, "
            f"d_max_ramp_steps={self.d_max_ramp_steps}, update_first={self.update_first}, r_eps={self.r_eps}"
        )
