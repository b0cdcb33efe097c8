"""Dynamic Tanh (Zhu, Chen, He, LeCun & Liu 2025)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DynamicTanh(nn.Module):
    """``dyt``: Dynamic Tanh, the normalization-free stand-in of "Transformers without
    Normalization" (Zhu et al. 2025, arXiv 2503.10622, Eq. 1 and Algorithm 1):

        DyT(x) = weight * tanh(alpha * x) + bias

    ``alpha`` is one learnable scalar (initialised to ``alpha_init_value``, 0.5 in the paper),
    ``weight`` and ``bias`` are per channel (ones and zeros), named as in the paper's code. It
    computes nothing over the batch, the channels or the positions: each value alone.

    Args:
        num_features: number of channels C of an (N, C, *) input.
        alpha_init_value: the initial alpha.
    """

    def __init__(self, num_features: int, alpha_init_value: float = 0.5) -> None:
        super().__init__()
        self.num_features = num_features
        self.alpha_init_value = alpha_init_value
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init_value)))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"DynamicTanh expects input of shape (N, {self.num_features}, *), got {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.tanh(self.alpha * x) * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha_init_value={self.alpha_init_value}"
