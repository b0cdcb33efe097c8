"""Packed runs (``normbench sweep --pack``): K copies of one network, each its own run, trained
in one step with ``torch.func.vmap``; plain torch, like the networks."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap


class PackedRuns(nn.Module):
    """K copies of one network, with stacked parameters and buffers, run with ``vmap``.

    The K networks' parameters and buffers are stacked along a new leading dim
    (``torch.func.stack_module_state``) and the forward is vmapped over it with ``functional_call``.
    Each run sees its own batch and keeps its own running statistics (the stacked buffers are
    updated in place, per run); with the loss the sum of the runs' losses each run's gradient is
    its own, and elementwise optimizers (Adam, SGD with momentum) on the stacked tensors are
    exactly K optimizers. Nothing couples the runs: no shared statistics, no global gradient-norm
    clipping. A pack holds runs of one network and norm that differ in seed (initialization and
    data order).

    Args:
        nets: the K networks, identical in structure (each with its own initialization).
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        shapes = {tuple((k, tuple(v.shape)) for k, v in n.state_dict().items()) for n in nets}
        if len(shapes) != 1:
            raise ValueError("packed runs need networks whose parameters and buffers have the same names and shapes")
        params, buffers = stack_module_state(list(nets))
        self.k = len(nets)
        self.param_names, self.buffer_names = list(params), list(buffers)
        # The default layout whatever the runs': under vmap, cuDNN cannot ask is_contiguous(channels_last).
        plain = torch.contiguous_format
        self.stacked = nn.ParameterList(
            nn.Parameter(params[n].detach().clone(memory_format=plain)) for n in self.param_names
        )
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"stacked_buffer_{i}", buffers[name].clone(memory_format=plain))
        # The shared definition, without storage of its own: functional_call supplies the tensors.
        # Kept out of the module tree, so that .to() and state_dict() see only the stacked ones.
        object.__setattr__(self, "base", copy.deepcopy(nets[0]).to("meta"))

    def _buffers_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"stacked_buffer_{i}") for i, name in enumerate(self.buffer_names)}

    def forward(self, x: Tensor, shared_input: bool = False) -> Tensor:
        """Logits of every run: (K, B, ...) from x of (K, B, ...), or from one (B, ...) batch
        that every run sees (``shared_input``, e.g. evaluation)."""
        # The definition trains or evaluates as this module does. Set here, not in train():
        # Lightning restores each module's ``training`` flag after validation without train().
        if self.base.training != self.training:
            self.base.train(self.training)
        params = dict(zip(self.param_names, self.stacked))

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(self.base, (p, b), (xi,))

        with warnings.catch_warnings():
            # vmap has no batching rule for the in-place lerp_ that updates running statistics and
            # loops over the runs for it: slower for that op, the same numbers.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            return vmap(one, in_dims=(0, 0, None if shared_input else 0), randomness="different")(
                params, self._buffers_dict(), x.contiguous()
            )

    def run_state_dict(self, k: int) -> dict[str, Tensor]:
        """Run k's parameters and buffers, as its network's own ``state_dict`` would hold them."""
        state = {n: p[k].detach() for n, p in zip(self.param_names, self.stacked)}
        state.update({n: b[k] for n, b in self._buffers_dict().items()})
        return state


def packed_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Every image's cross-entropy in every run, (K, B), from logits (K, B, classes) and targets (K, B)."""
    k, b = targets.shape
    return F.cross_entropy(logits.reshape(k * b, -1), targets.reshape(-1), reduction="none").reshape(k, b)


def packed_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over runs of each run's mean cross-entropy, the per-run losses (K,)): the sum's
    gradient in each run is that run's own.

    Args:
        logits: (K, B, classes).
        targets: (K, B).
    """
    per_run = packed_losses(logits, targets).mean(1)
    return per_run.sum(), per_run
