"""Filter Response Normalization with TLU (Singh & Krishnan 2019)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FilterResponseNorm(nn.Module):
    """``frn``: Filter Response Normalization + Thresholded Linear Unit (Singh & Krishnan 2019,
    arXiv 1911.09737, Eq. 1-3 and 5).

    Per sample and channel, nu^2 = mean(x^2) over the spatial dims (no mean subtraction);
    x_hat = x / sqrt(nu^2 + |eps|), y = gamma * x_hat + beta, z = max(y, tau). For an (N, C)
    input nu^2 = x^2, where the paper says a learned eps matters (Sec. 3.1); with
    ``learnable_eps`` eps is a parameter, ``eps_l``, that starts at ``eps`` and enters as |eps_l|,
    as in the paper's code (its Fig. 6: ``rsqrt(nu2 + tf.abs(eps))``). It starts away from 0:
    at 0 the gradient of |.| is 0 and it would never move.
    Batch-independent, identical in training and eval.

    Args:
        num_features: number of channels C.
        eps: eps, or the learned eps's starting value.
        learnable_eps: learn eps.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features))
        self.eps_l = nn.Parameter(torch.full((1,), float(eps))) if learnable_eps else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"FilterResponseNorm expects input of shape (N, {self.num_features}, *), got {tuple(x.shape)}"
            )
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        nu2 = x.square().mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.square()
        eps = self.eps if self.eps_l is None else self.eps_l.abs()
        y = x * torch.rsqrt(nu2 + eps) * self.weight.reshape(shape) + self.bias.reshape(shape)
        return torch.maximum(y, self.tau.reshape(shape))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable_eps={self.eps_l is not None}"
