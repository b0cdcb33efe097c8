"""BatchNorm with fixed statistics and affine (torchvision's ``FrozenBatchNorm2d``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FrozenBatchNorm(nn.Module):
    """``frozen_bn``: BatchNorm whose statistics and affine are fixed, in training and in
    evaluation alike, with the semantics of torchvision's ``FrozenBatchNorm2d``
    (``torchvision/ops/misc.py``): ``weight``, ``bias``, ``running_mean`` and ``running_var``
    are buffers, nothing is learned or updated, and

        y = x * weight / sqrt(running_var + eps) + (bias - running_mean * weight / sqrt(running_var + eps))

    Fresh, it is the identity up to eps (mean 0, variance 1, weight 1, bias 0); it is meant to
    take a trained BN's statistics and affine (``load_state_dict``). It has no momentum, so
    PreciseBN and the diagnostics leave it alone.

    Args:
        num_features: number of channels C of an (N, C, *) input.
        eps: added to the variance.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        # A BN's state dict carries num_batches_tracked, which a frozen layer has no use for
        # (torchvision drops it the same way).
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"FrozenBatchNorm expects input of shape (N, {self.num_features}, *), got {tuple(x.shape)}"
            )
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(shape) + shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
