"""Which images a training epoch takes, in which order, on which rank: ``EpochOrder``, the order
both data paths share (the in-memory loader's, and the DataLoader's over torchvision transforms
through ``EpochSampler`` and ``ResumableLoader``), so that the two train on the same batches,
take one device's global batches on several processes, and resume in the middle of an epoch
alike. Every draw (the permutation here, the in-memory loader's augmentation) is made by a CPU
generator and then moved to the training device, so a seed gives the same batches on CPU, CUDA
and MPS, and on both data paths."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def epoch_generator(seed: int, epoch: int, stream: int, batch: int = 0) -> torch.Generator:
    """The generator of one epoch's order (``stream`` 0) or of one batch's augmentation (1)."""
    g = torch.Generator()  # on the CPU, whatever the training device
    base = (seed * 1_000_003 + epoch) * 2 + stream
    # Python integers do not overflow; the generator takes 64 bits. For seeds below about
    # 9.2 million the modulus changes nothing, so their orders stay what they were.
    g.manual_seed((base if stream == 0 else base * 1_000_003 + batch) % 2**64)
    return g


@dataclass(frozen=True)
class EpochOrder:
    """Which of ``n`` samples, in which order, one rank takes in an epoch.

    Shuffled, a permutation drawn from (seed, epoch). Under several processes each rank takes
    its consecutive part of every global batch (rank r the r-th ``batch_size`` of each
    ``batch_size`` x ``world_size``), so that a step on N devices holds the images, in the
    order, of one device's step on the global batch. With ``drop_last`` the order keeps one
    device's whole global batches; without, the last global batch is split evenly, holding up
    to ``world_size`` - 1 images twice (``padded_images``). Unshuffled (evaluation), each rank
    takes every world_size-th image and nothing is padded.
    """

    n: int
    batch_size: int
    shuffle: bool
    seed: int
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False

    def indices(self, epoch: int, device=None) -> Tensor:
        """This rank's sample indices for ``epoch``, drawn on the CPU, on ``device``."""
        return self._indices(epoch).to(device)

    def _indices(self, epoch: int) -> Tensor:
        n = self.n
        perm = torch.randperm(n, generator=epoch_generator(self.seed, epoch, 0)) if self.shuffle else torch.arange(n)
        if self.world_size == 1:
            return perm
        if not self.shuffle:
            return perm[self.rank :: self.world_size]
        if self.drop_last:  # the global batches one device takes, whole: nothing padded, no extra step
            total = n // (self.batch_size * self.world_size) * self.batch_size * self.world_size
            perm = perm[:total]
        else:  # a last global batch split evenly (uneven shards would leave a rank without a step)
            total = -(-n // self.world_size) * self.world_size
            perm = torch.cat([perm, perm[: total - n]])
        return perm[self._global_batch_share(total)]

    def _global_batch_share(self, total: int) -> Tensor:
        """This rank's positions in an epoch's order of ``total`` samples: of each global batch
        (the last one shorter), the rank-th of ``world_size`` equal consecutive parts; so a norm
        that normalizes over groups inside each device's batch (``model.norm_batch``) groups the
        same images as on one device."""
        step = self.batch_size * self.world_size
        share = []
        for start in range(0, total, step):
            part = (min(start + step, total) - start) // self.world_size
            share.append(torch.arange(start + self.rank * part, start + (self.rank + 1) * part))
        return torch.cat(share) if share else torch.zeros(0, dtype=torch.long)

    def per_rank(self) -> int:
        """Samples this rank takes in an epoch."""
        if self.shuffle and self.drop_last:
            return self.n // (self.batch_size * self.world_size) * self.batch_size
        if self.shuffle:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))  # an uneven shard: no image twice

    def batches(self) -> int:
        """Batches this rank takes in an epoch."""
        per_rank = self.per_rank()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def padded_images(self) -> int:
        """Images an epoch's order holds twice on this layout (0 on one device, with drop_last,
        or without shuffling)."""
        if self.world_size == 1 or not self.shuffle or self.drop_last:
            return 0
        return -self.n % self.world_size


class EpochSampler(DistributedSampler):
    """``EpochOrder`` as a DataLoader's sampler: the in-memory loader's training order for a
    DataLoader over torchvision transforms. A DistributedSampler, so that Lightning leaves it in
    place under several processes and hands it the epoch (``set_epoch``); ``resume_at`` starts
    the next iteration of that epoch at a batch.

    Args:
        dataset: the training set.
        order: the epoch order (its ``n`` the dataset's length).
    """

    def __init__(self, dataset: Dataset, order: EpochOrder) -> None:
        super().__init__(dataset, num_replicas=order.world_size, rank=order.rank, shuffle=order.shuffle,
                         seed=order.seed, drop_last=order.drop_last)  # fmt: skip
        self.order = order
        self.first_batch: tuple[int, int] | None = None  # (epoch, batch) where the next pass starts

    def __iter__(self) -> Iterator[int]:
        first = 0
        if self.first_batch is not None and self.first_batch[0] == self.epoch:
            first = self.first_batch[1]
        self.first_batch = None
        return iter(self.order.indices(self.epoch)[first * self.order.batch_size :].tolist())

    def __len__(self) -> int:
        return self.order.per_rank()


class ResumableLoader(DataLoader):
    """A training DataLoader over an ``EpochSampler`` that is stateful in Lightning's sense, as
    the in-memory loader is: a checkpoint in the middle of an epoch holds the batches handed out,
    and the resumed run goes on with the next batch of the same order (not the epoch's first
    batches again). Batches are counted as they are handed to Lightning, so the workers'
    prefetching does not count.
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, **kwargs) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.position = 0

    def __iter__(self):
        sampler = self.sampler
        resumed = sampler.first_batch
        self.position = resumed[1] if resumed is not None and resumed[0] == sampler.epoch else 0
        for batch in super().__iter__():
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "position": self.position, "seed": self.sampler.order.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.sampler.order.seed) != self.sampler.order.seed:
            raise ValueError(
                f"the checkpoint's data order has seed {state['seed']}, this run {self.sampler.order.seed}; "
                "resume with the run's own seed_everything"
            )
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.first_batch = (int(state["epoch"]), int(state["position"]))
