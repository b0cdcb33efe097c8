"""RMSNorm over channels (Zhang & Sennrich 2019), as timm's ``RmsNorm2d``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RmsNorm2d(nn.Module):
    """``rmsnorm``: Root Mean Square Layer Normalization (Zhang & Sennrich 2019, arXiv
    1910.07467, Eq. 4) over the C channels at each position, as timm's ``RmsNorm2d``
    (``timm/layers/norm.py``, ``rms_norm2d``):

        y = x / sqrt(mean over C of x^2 + eps) * weight

    no mean subtracted and no bias; ``weight`` per channel, ones at the start. Each sample and
    position alone: nothing is computed over the batch.

    Args:
        num_features: number of channels C of an (N, C, *) input.
        eps: added to the mean square (timm's default 1e-6).
        affine: learn the per-channel weight.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"RmsNorm2d expects input of shape (N, {self.num_features}, *), got {tuple(x.shape)}")
        y = x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view((1, -1) + (1,) * (x.dim() - 2))
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
