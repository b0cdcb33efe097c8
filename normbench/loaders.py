"""Loaders that hold their data on the training device: one study's images as a uint8 tensor
(``InMemoryLoader``), and K such loaders stepped together for packed runs (``PackedLoader``).

Both follow the part of the DataLoader protocol Lightning uses (``DeviceLoader``): a length,
iteration, ``sampler.set_epoch`` for the epoch's order and no ``batch_sampler``. Lightning does
not prefetch from loaders that have a length, so batches handed out are batches trained on.
``memory_loader`` builds a data module's in-memory loader.

The training order (``normbench.orders.EpochOrder``) is the one both data paths share.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from normbench.datasets import TransformedSubset
from normbench.orders import EpochOrder, epoch_generator


class DeviceLoader:
    """The DataLoader protocol as Lightning reads it from a loader it did not build: ``len()``,
    iteration, ``sampler.set_epoch(epoch)`` (the loader is its own sampler) and no
    ``batch_sampler``."""

    batch_sampler = None  # Lightning inspects loaders for one

    @property
    def sampler(self) -> DeviceLoader:
        """Where Lightning looks for ``set_epoch``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError


class InMemoryLoader(DeviceLoader):
    """Batches of a dataset held as one uint8 tensor on the training device.

    No per-image Python work: each batch is gathered by index, scaled to [0, 1], augmented (random
    crop with zero padding and horizontal flip, as torchvision's RandomCrop and
    RandomHorizontalFlip do to the image) and normalized, all batched on the device. Each epoch
    shuffles with a permutation drawn from a generator seeded by (seed, epoch), so the same seed
    gives the same order, also after a restart; Lightning passes the epoch through
    ``sampler.set_epoch``. Under several processes each rank takes its part of every global
    batch, as one device's step on the global batch holds it (``EpochOrder``); an evaluation
    loader takes every world_size-th image and does not pad, so that every image counts exactly
    once and the metrics (sums over the ranks) are those of one device on the same images.

    The loader is stateful in Lightning's sense (``state_dict``/``load_state_dict``): a
    checkpoint taken in the middle of an epoch holds the epoch and the number of batches handed
    out, and a run resumed from it goes on with the next batch of the same order (batches handed
    out are batches trained on: see the module's docstring).
    Each batch's augmentation draws from its own generator, seeded by (seed, epoch, batch), so
    skipping the batches before the resume point changes nothing after it.

    Args:
        images: uint8 (N, C, H, W).
        targets: int64 (N,).
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: draw a new order every epoch.
        drop_last: leave out the last batch of an epoch when it is smaller than ``batch_size``.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
        augment: random crop (padding ``padding``) and horizontal flip.
        padding: zero padding of the random crop.
        seed: seed of the orders and augmentations.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
        padding: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.images, self.targets = images, targets
        self.drop_last = drop_last
        self.batch_size, self.shuffle, self.augment, self.padding = batch_size, shuffle, augment, padding
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=images.device).reshape(shape)
        self.std = torch.tensor(std, device=images.device).reshape(shape)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.position = 0  # batches handed out in the current epoch
        self._resume_at: tuple[int, int] | None = None  # (epoch, batch) from a checkpoint

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: the epoch, and the batches of it already handed out."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume in epoch ``state["epoch"]`` at batch ``state["position"]`` (from ``state_dict``)."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"the checkpoint's data order has seed {state['seed']}, this run {self.seed}; "
                "resume with the run's own seed_everything"
            )
        self.epoch = int(state["epoch"])
        self._resume_at = (self.epoch, int(state["position"]))

    def _generator(self, stream: int, batch: int = 0) -> torch.Generator:
        return epoch_generator(self.seed, self.epoch, stream, batch)  # on the CPU: see normbench.orders

    @property
    def epoch_order(self) -> EpochOrder:
        return EpochOrder(len(self.targets), self.batch_size, self.shuffle, self.seed, self.rank, self.world_size,
                          self.drop_last)  # fmt: skip

    def order(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch."""
        return self.epoch_order.indices(self.epoch, self.images.device)

    def __len__(self) -> int:
        return self.epoch_order.batches()

    def _crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """out[b, :, i, j] = padded[b, :, dy_b + i, dx_b + j], then a flip of half the batch.

        The offsets and flips are drawn for the whole global batch (every rank's part, from the
        same generator) and this rank takes its part's: each image is augmented as one device
        with the global batch augments it, and no two ranks draw alike."""
        b, c, h, w = x.shape
        p = self.padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        every, mine = b * self.world_size, slice(self.rank * b, (self.rank + 1) * b)
        # Drawn on the CPU (the same draws on every device); to another device in one copy.
        shape = (every, 1, 1, 1)
        dy = torch.randint(0, 2 * p + 1, shape, generator=g)[mine]
        dx = torch.randint(0, 2 * p + 1, shape, generator=g)[mine]
        flip = torch.rand(shape, generator=g)[mine] < 0.5
        if x.device.type != "cpu":
            dy, dx, flip = torch.stack([dy, dx, flip]).to(x.device)
        rows = (dy + torch.arange(h, device=x.device).reshape(1, 1, h, 1)).expand(b, c, h, w + 2 * p)
        cols = (dx + torch.arange(w, device=x.device).reshape(1, 1, 1, w)).expand(b, c, h, w)
        cropped = padded.gather(2, rows).gather(3, cols)
        return torch.where(flip.bool(), cropped.flip(3), cropped)  # bool again after the copy

    def __iter__(self):
        order = self.order()
        first = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            first = self._resume_at[1]
        self._resume_at, self.position = None, first
        for batch in range(first, len(self)):
            self.position = batch + 1
            idx = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            x = self.images[idx].float().div_(255)
            if self.augment:
                x = self._crop_flip(x, self._generator(1, batch))
            yield x.sub_(self.mean).div_(self.std), self.targets[idx]


class PackedLoader(DeviceLoader):
    """The K runs' own loaders stepped together: batch i of every run, stacked to (K, B, ...)."""

    def __init__(self, loaders: Sequence[InMemoryLoader]) -> None:
        if len({len(lo) for lo in loaders}) != 1:
            raise ValueError("packed runs need loaders of the same length (same data and batch size)")
        self.loaders = list(loaders)

    def set_epoch(self, epoch: int) -> None:
        for lo in self.loaders:
            lo.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batches in zip(*self.loaders):
            yield torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])


# -- the loaders a data module hands Lightning ---------------------------------------------


def as_tensors(dataset: Dataset, cache: dict) -> tuple[Tensor, Tensor]:
    """(uint8 (N, C, H, W), int64 (N,)) of a torchvision dataset, read once from its arrays and
    kept in ``cache``."""
    if id(dataset) not in cache:
        data = torch.as_tensor(dataset.data)
        data = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # MNIST (N,H,W), CIFAR (N,H,W,C)
        cache[id(dataset)] = data.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long)
    return cache[id(dataset)]


def memory_loader(dataset: Dataset, cache: dict, batch_size: int, train: bool, device: torch.device,
                  mean: tuple[float, ...], std: tuple[float, ...], augment: bool, rank: int, world_size: int,
                  drop_last: bool) -> InMemoryLoader:  # fmt: skip
    """An ``InMemoryLoader`` over a torchvision dataset or a ``TransformedSubset`` of one, its
    images on ``device``."""
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, TransformedSubset) else (dataset, None)
    images, targets = as_tensors(base, cache)
    if indices is not None:
        index = torch.as_tensor(indices, dtype=torch.long)
        images, targets = images[index], targets[index]
    return InMemoryLoader(images.to(device), targets.to(device), batch_size, shuffle=train, mean=mean, std=std,
                          augment=augment, seed=torch.initial_seed(), rank=rank, world_size=world_size,
                          drop_last=drop_last)  # fmt: skip
