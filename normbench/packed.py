"""Packed runs: K independent runs of one network trained in one process and one step.

The K networks' parameters and buffers are stacked along a new leading dim
(``torch.func.stack_module_state``) and the forward is vmapped over it with
``torch.func.functional_call``. Each run sees its own batch and keeps its own running statistics
(the stacked buffers are updated in place, per run); the loss is the sum of the runs' losses,
so each run's gradient is its own, and elementwise optimizers (Adam, SGD with momentum) on the
stacked tensors are exactly K optimizers. Nothing couples the runs: no shared statistics, and no
global gradient-norm clipping over the pack. All runs share one module definition, so a pack
holds runs of the same network and norm that differ in seed (initialization and data order).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from normbench.data import InMemoryLoader


class PackedRuns(nn.Module):
    """K copies of one network, with stacked parameters and buffers, run with ``vmap``.

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
        self.stacked = nn.ParameterList(nn.Parameter(params[n].detach().clone()) for n in self.param_names)
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"stacked_buffer_{i}", buffers[name].clone())
        # The shared definition, without storage of its own: functional_call supplies the tensors.
        # Kept out of the module tree, so that .to() and state_dict() see only the stacked ones.
        object.__setattr__(self, "base", copy.deepcopy(nets[0]).to("meta"))

    def train(self, mode: bool = True) -> PackedRuns:
        self.base.train(mode)
        return super().train(mode)

    def _buffers_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"stacked_buffer_{i}") for i, name in enumerate(self.buffer_names)}

    def forward(self, x: Tensor, shared_input: bool = False) -> Tensor:
        """Logits of every run: (K, B, ...) from x of (K, B, ...), or from one (B, ...) batch
        that every run sees (``shared_input``, e.g. evaluation)."""
        params = dict(zip(self.param_names, self.stacked))

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(self.base, (p, b), (xi,))

        return vmap(one, in_dims=(0, 0, None if shared_input else 0), randomness="different")(
            params, self._buffers_dict(), x
        )

    def run_state_dict(self, k: int) -> dict[str, Tensor]:
        """Run k's parameters and buffers, as its network's own ``state_dict`` would hold them."""
        state = {n: p[k].detach() for n, p in zip(self.param_names, self.stacked)}
        state.update({n: b[k] for n, b in self._buffers_dict().items()})
        return state


def packed_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over runs of each run's mean cross-entropy, the per-run losses (K,)).

    Args:
        logits: (K, B, classes).
        targets: (K, B).
    """
    k, b = targets.shape
    per_run = F.cross_entropy(logits.reshape(k * b, -1), targets.reshape(-1), reduction="none").reshape(k, b).mean(1)
    return per_run.sum(), per_run


class PackedLoader:
    """The K runs' own loaders stepped together: batch i of every run, stacked to (K, B, ...)."""

    def __init__(self, loaders: Sequence[InMemoryLoader]) -> None:
        if len({len(lo) for lo in loaders}) != 1:
            raise ValueError("packed runs need loaders of the same length (same data and batch size)")
        self.loaders = list(loaders)
        self.sampler = self
        self.batch_sampler = None

    def set_epoch(self, epoch: int) -> None:
        for lo in self.loaders:
            lo.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batches in zip(*self.loaders):
            yield torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])
