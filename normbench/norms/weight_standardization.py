"""Weight Standardization (Qiao et al. 2019)."""

from __future__ import annotations

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
