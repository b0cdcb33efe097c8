"""Group Normalization (Wu & He 2018)."""

from __future__ import annotations

from torch import nn


def check_groups(name: str, num_groups: int, num_features: int) -> None:
    """Raise a one-line ValueError when ``num_groups`` does not divide ``num_features``."""
    if num_groups < 1 or num_features % num_groups:
        divisors = [g for g in range(1, num_features + 1) if num_features % g == 0]
        raise ValueError(
            f"{name}: num_groups={num_groups} does not divide num_features={num_features}; "
            f"pass num_groups as one of {divisors}"
        )


class GroupNorm(nn.GroupNorm):
    """``gn``: Group Normalization (Wu & He 2018, arXiv 1803.08494, Eq. 1-3).

    Per sample, the C channels are split into ``num_groups`` groups and each group is
    normalized by its own mean and biased variance over (C/G, *); then a per-channel
    gamma and beta. Batch-independent, identical in training and eval. torch's GroupNorm,
    with the channel count first like every factory here (timm's ``create_norm`` does the
    same) so that networks never branch on a norm's name.

    Args:
        num_features: number of channels C.
        num_groups: number of groups G, which must divide C; 32 as in the paper.
        eps: added to the variance.
        affine: learn gamma and beta.
    """

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True) -> None:
        check_groups("gn", num_groups, num_features)
        super().__init__(num_groups, num_features, eps, affine)
