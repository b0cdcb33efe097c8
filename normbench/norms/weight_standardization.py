"""Weight Standardization (Qiao et al. 2019), and the normalizer-free recipe's parts (Brock et al.
2021): scaled weight standardization, the activations' gains, adaptive gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class WSConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization (Qiao et al. 2019, arXiv 1903.10520, Eq. 5-6).

    Each output filter's weights are standardized before the convolution,
    W_hat = (W - mu_W) / sqrt(sigma_W^2 + eps), with mu_W and the biased sigma_W^2 over
    (C_in, k_h, k_w), and gradients flow through the standardization. It is a conv layer, not
    a norm, so networks combine it with any norm (GN+WS is the paper's pairing). The authors'
    code divides by the unbiased std + 1e-5; this follows the paper's equation.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            torch.nn.Conv2d.
        eps: added to the weight variance.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        flat = self.weight.flatten(1)
        var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        return ((flat - mean) * torch.rsqrt(var + self.eps)).view_as(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class ScaledWSConv2d(WSConv2d):
    """Conv2d with Scaled Weight Standardization, the normalizer-free networks' convolution
    (Brock, De & Smith 2021, "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets", arXiv 2101.08692, Eq. 2; as DeepMind's ``nfnets/base.py`` WSConv2D):

        W_hat = gain * (W - mu_W) / sqrt(max(N * sigma_W^2, eps))

    with mu_W and the biased sigma_W^2 over each output filter's N = C_in x k_h x k_w fan-in, and
    ``gain`` a learnable scale per output channel (ones at the start). The activation's gain
    gamma is applied by ``GammaActivation``, as the reference code applies it.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            torch.nn.Conv2d.
        eps: floor of N * sigma_W^2 (1e-4 in the reference code).
    """

    def __init__(self, *args, eps: float = 1e-4, **kwargs) -> None:
        super().__init__(*args, eps=eps, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def standardized_weight(self) -> Tensor:
        flat = self.weight.flatten(1)
        var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * flat.shape[1], min=self.eps))
        return ((flat - mean) * scale).view_as(self.weight) * self.gain


def activation_gain(activation: nn.Module, points: int = 240_001) -> float:
    """gamma = 1 / std(g(z)) for z ~ N(0, 1): the gain that keeps a unit-variance input's output
    at unit variance (Brock et al. 2021, Sec. 4: for ReLU, sqrt(2 / (1 - 1/pi))), by the
    trapezoid rule for E[g(z)] and E[g(z)^2] on a grid over [-12, 12] in float64 (a kink such as
    ReLU's costs it nothing, as it would cost a Gauss-Hermite rule).

    Args:
        activation: the nonlinearity g.
        points: grid points.
    """
    z = torch.linspace(-12.0, 12.0, points, dtype=torch.float64)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    with torch.no_grad():
        g = activation(z.clone())  # an in-place activation would overwrite the grid
    mean = torch.trapezoid(density * g, z)
    return float(1 / torch.sqrt(torch.trapezoid(density * g * g, z) - mean**2))


class GammaActivation(nn.Module):
    """``gamma * g(x)``: a nonlinearity scaled to keep unit variance (``activation_gain``), the
    normalizer-free networks' activation.

    Args:
        activation: the nonlinearity g.
    """

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.act = activation
        self.gamma = activation_gain(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x) * self.gamma

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:.6f}"


@torch.no_grad()
def adaptive_clip_grad(parameters: list[nn.Parameter], clip: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021, Eq. 3), unit-wise: for each unit i (a row
    of a weight: one output channel; a whole bias), G_i <- clip * max(|W_i|, eps) / |G_i| * G_i
    where |G_i| / max(|W_i|, eps) > clip, Frobenius norms, in place.

    Args:
        parameters: the parameters whose gradients are clipped.
        clip: lambda.
        eps: the floor of the weight norm (1e-3 in the paper), so that zero-initialized weights
            still get a gradient.
    """
    for p in parameters:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
        w_norm = torch.linalg.vector_norm(p, dim=dims, keepdim=dims is not None)
        g_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=dims is not None)
        limit = w_norm.clamp_min(eps) * clip
        # torch.where, not an if: no host read of the norms.
        p.grad.mul_(torch.where(g_norm > limit, limit / g_norm.clamp_min(1e-6), torch.ones_like(g_norm)))
