"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky 2016)."""

from __future__ import annotations

from normbench.norms.group_norm import GroupNorm


class InstanceNorm(GroupNorm):
    """``in``: Instance Normalization with affine (Ulyanov et al. 2016, arXiv 1607.08022, Eq. 2).

    Each (sample, channel) plane is normalized by its own mean and biased variance over (*),
    then a per-channel gamma and beta; no running statistics, so training and eval agree. Run
    as Group Norm with one channel per group (Wu & He 2018, Sec. 3.1), which also takes an
    (N, C) input, where every plane is a single value and the output is beta.

    Args:
        num_features: number of channels C.
        eps: added to the variance.
        affine: learn gamma and beta.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, num_groups=num_features, eps=eps, affine=affine)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
