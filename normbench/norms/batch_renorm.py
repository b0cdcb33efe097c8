"""Batch Renormalization (Ioffe 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from normbench.norms.stats import RunningStatsNorm, scale_shift, update_running_stats


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
    ``num_batches_tracked``, so the schedule survives a checkpoint. The paper warms up for 5k
    steps and opens r_max = 3 at 40k and d_max = 5 at 25k of runs of 100k+ steps. The studies'
    runs are 10 epochs, as short as 3,910 steps (CIFAR-100 at batch size 128), so the defaults
    scale that down: 200 warm-up steps are 20 time constants of a momentum-0.1 running average,
    which is what warm-up waits for, and the limits are fully open by step 1,200, under a third
    of the shortest run, so that BRN's correction acts for most of every run.

    Args:
        num_features: number of channels C.
        r_max: final upper clip of r (>= 1).
        d_max: final clip of |d| (>= 0).
        warmup_steps: steps with r_max = 1 and d_max = 0.
        r_max_ramp_steps: steps after warm-up over which r_max rises linearly to its final value.
        d_max_ramp_steps: steps after warm-up over which d_max rises linearly to its final value.
        eps: added to the variances.
        momentum: running-statistics factor (None: cumulative average).
        affine: learn gamma and beta.
        sync_stats: reduce batch moments across processes, with gradients through them.
    """

    def __init__(
        self,
        num_features: int,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 200,
        r_max_ramp_steps: int = 1000,
        d_max_ramp_steps: int = 500,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        sync_stats: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, sync_stats)
        if r_max < 1:
            raise ValueError(f"brn: r_max={r_max} must be >= 1 (1 turns the r correction off); the paper uses 3")
        if d_max < 0:
            raise ValueError(f"brn: d_max={d_max} must be >= 0 (0 turns the d correction off); the paper uses 5")
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("r_max_ramp_steps", r_max_ramp_steps),
            ("d_max_ramp_steps", d_max_ramp_steps),
        ):
            if value < 0:
                raise ValueError(f"brn: {name}={value} must be >= 0")
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_ramp_steps = r_max_ramp_steps
        self.d_max_ramp_steps = d_max_ramp_steps

    def _ramp(self, ramp_steps: int) -> Tensor:
        """Fraction of the way from the warm-up limit to the final one, as a device tensor."""
        t = self.num_batches_tracked.to(torch.float32)
        if ramp_steps == 0:
            return (t >= self.warmup_steps).to(torch.float32)
        return ((t - self.warmup_steps) / ramp_steps).clamp(0, 1)

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """The (r_max, d_max) that apply to the next training batch; tensors, no host sync."""
        r_max = 1 + (self.r_max - 1) * self._ramp(self.r_max_ramp_steps)
        d_max = self.d_max * self._ramp(self.d_max_ramp_steps)
        return r_max, d_max

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return self._by_running_stats(x)
        mean, var, count = self._moments(x)
        std_b = torch.sqrt(var + self.eps)
        with torch.no_grad():
            r_max, d_max = self.current_limits()
            std = torch.sqrt(self.running_var + self.eps)
            r = torch.clamp(std_b / std, 1 / r_max, r_max)
            d = torch.clamp((mean - self.running_mean) / std, -d_max, d_max)
        # x_hat = (x - mu_B) * (r / sigma_B) + d, folded into one multiply-add over x.
        scale = r / std_b
        y = scale_shift(x, scale, d - mean * scale, self.weight, self.bias)
        update_running_stats(self, mean, var, count)
        return y

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_ramp_steps={self.r_max_ramp_steps}, "
            f"d_max_ramp_steps={self.d_max_ramp_steps}"
        )
