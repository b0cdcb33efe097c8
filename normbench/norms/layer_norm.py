"""Layer Normalization (Ba, Kiros & Hinton 2016)."""

from __future__ import annotations

from normbench.norms.group_norm import GroupNorm


class LayerNorm(GroupNorm):
    """``ln``: Layer Normalization (Ba et al. 2016, arXiv 1607.06450, Eq. 4) over (C, *).

    Each sample is normalized by the mean and biased variance of all its C x * values, then
    a per-channel gamma and beta: Group Norm with one group (Wu & He 2018, Sec. 3.1, Fig. 2),
    which is how it runs, so that it takes any spatial size.

    Args:
        num_features: number of channels C.
        eps: added to the variance.
        affine: learn a per-channel gamma and beta.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, num_groups=1, eps=eps, affine=affine)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
