"""The "no normalization" baseline."""

from __future__ import annotations

from torch import Tensor, nn


class NoNorm(nn.Module):
    """``none``: the identity, y = x, with the factory shape every norm shares.

    Args:
        num_features: number of channels C (unused; kept so networks never branch on the name).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x
