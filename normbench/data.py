"""LightningDataModules for MNIST, FashionMNIST, CIFAR-10 and CIFAR-100 over torchvision's datasets.

One base class, ``ImageDataModule``, holds the logic; each dataset is a subclass that names its
``DatasetSpec`` (``normbench.specs``: the dataset's facts as data). ``prepare_data`` is the one
place that may download; ``setup`` reads files already on disk, so every rank builds the same
datasets without touching the network.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from normbench.datasets import (
    TransformedSubset,
    first_images,
    image_transform,
    mean_std,
    open_dataset,
    split_off,
)
from normbench.loaders import InMemoryLoader, memory_loader
from normbench.options import check_restricted, plain
from normbench.orders import EpochOrder, EpochSampler, ResumableLoader
from normbench.specs import SPECS, DatasetSpec


def torch_loader(dataset: Dataset, batch_size: int, shuffle: bool, rank: int, world_size: int, num_workers: int,
                 drop_last: bool) -> DataLoader:  # fmt: skip
    """A DataLoader over torchvision transforms. Training takes the in-memory loader's order
    (``EpochOrder``: on CPU the same batches whichever path; one device's global batches on several)
    and resumes in the middle of an epoch (``ResumableLoader``); an evaluation loader on several
    ranks gives each rank every world_size-th image, without padding."""
    if shuffle:
        order = EpochOrder(len(dataset), batch_size, True, torch.initial_seed(), rank, world_size, drop_last)
        return ResumableLoader(dataset, EpochSampler(dataset, order), batch_size=batch_size, drop_last=drop_last,
                               num_workers=num_workers, persistent_workers=num_workers > 0,
                               pin_memory=torch.cuda.is_available())  # fmt: skip
    sampler = None
    if world_size > 1:
        # Lightning's own DistributedSampler would pad the shards to equal length and count
        # some images twice; this one gives each rank every world_size-th image, no padding.
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


class ImageDataModule(LightningDataModule):
    """Train, validation and test loaders for one torchvision image-classification dataset.

    Subclasses set ``spec`` and nothing else; its fields are class attributes too (``name``,
    ``num_classes``, ``in_channels``, ...).

    Args:
        data_dir: folder that holds (or receives) the dataset's files, in torchvision's layout.
        download: let ``prepare_data`` download missing files.
        batch_size: training batch size.
        eval_batch_size: validation, test and predict batch size. None picks one for the device:
            32 on CPU, where small batches stay in cache, and at least 512 on
            accelerators. Evaluation results do not depend on it: in eval mode every norm here is
            batch-independent (only NormDiagnostics' batch-statistics accuracy uses eval batches).
        val_split: 0 validates on the official test split every epoch, as the studies did; a
            fraction in (0, 1) of the training set is held out for validation instead (a fixed
            split, the same on every rank) and the test split is left to ``test_dataloader``.
        split_seed: seed of the validation carve-out.
        num_workers: data-loading worker processes per dataloader.
        normalization: ``half`` maps [0, 1] to [-1, 1] with mean = std = 0.5 per channel, study
            2's inputs; ``dataset`` uses the dataset's own per-channel mean and std; ``none``
            leaves ToTensor's [0, 1], study 1's inputs.
        augment: random crop (padding 4) and horizontal flip of training images, for the CIFAR
            datasets only; the MNIST family is never augmented, since flips change what a digit or
            garment looks like and the studies trained it unaugmented. Evaluation data is never
            augmented.
        train_subset: use only the first N training images (taken before the validation carve-out).
        test_subset: use only the first N images of the test split (which validates under
            ``val_split: 0``), as the study's loop's ``--test-subset``.
        in_memory: hold the images as one uint8 tensor on the training device and batch, augment
            and normalize them there (``InMemoryLoader``); False uses torchvision transforms in a
            DataLoader, for data that does not fit.
        drop_last: leave out each training epoch's last, smaller batch (study 1 does), so every
            step sees ``batch_size`` images.
    """

    spec: ClassVar[DatasetSpec]
    name: ClassVar[str]
    dataset_cls: ClassVar[type[datasets.VisionDataset]]
    num_classes: ClassVar[int]
    in_channels: ClassVar[int]
    image_size: ClassVar[int]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    augmentable: ClassVar[bool] = False  # whether ``augment=True`` applies random crop and flip

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:  # the spec's facts as class attributes, as Lightning and the CLI read them
            for field in ("name", "dataset_cls", "num_classes", "in_channels", "image_size", "mean", "std",
                          "augmentable"):  # fmt: skip
                setattr(cls, field, getattr(spec, field))

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: PositiveInt = 128,
        eval_batch_size: PositiveInt | None = None,
        val_split: float = 0.0,
        split_seed: int = 0,
        num_workers: NonNegativeInt = 2,
        normalization: Literal["half", "dataset", "none"] = "half",
        augment: bool = False,
        train_subset: PositiveInt | None = None,
        test_subset: PositiveInt | None = None,
        in_memory: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        check_restricted(ImageDataModule.__init__, locals(), "data")
        batch_size, num_workers, eval_batch_size, train_subset, test_subset = plain(
            batch_size, num_workers, eval_batch_size, train_subset, test_subset
        )
        if not 0.0 <= val_split < 1.0:
            raise ValueError(
                f"val_split must be in [0, 1), got {val_split}; "
                "use 0 to validate on the test split or a fraction such as 0.1 of the training set"
            )
        if normalization not in ("half", "dataset", "none"):
            raise ValueError(f"normalization must be 'half', 'dataset' or 'none', got {normalization!r}")
        # Logged by RunRecorder with the experiment's variables first, not Lightning's raw dump.
        self.save_hyperparameters(logger=False)
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_split = val_split
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.normalization = normalization
        self.augment = augment
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.in_memory = in_memory
        self.drop_last = drop_last
        self._tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- transforms --------------------------------------------------------------------------

    def eval_transform(self) -> transforms.Compose:
        """PIL image -> normalized float tensor (C, H, W)."""
        return image_transform(self.spec, self.normalization, augment=False)

    def train_transform(self) -> transforms.Compose:
        """``eval_transform``, preceded by random crop and flip when augmenting this dataset."""
        return image_transform(self.spec, self.normalization, augment=self.augment)

    # -- LightningDataModule hooks -----------------------------------------------------------

    def prepare_data(self) -> None:
        """Download the train and test splits if allowed and missing; the only method that downloads."""
        for train in (True, False):
            open_dataset(self.spec, self.data_dir, train, self.download, None)

    def setup(self, stage: str | None = None) -> None:
        """Build ``train_set``, ``val_set`` and ``test_set`` from files on disk (never downloads).

        Args:
            stage: Lightning's stage; the training and validation sets are built for fit,
                validate and None, the test set always.
        """
        if self.test_set is None:
            test = open_dataset(
                self.spec, self.data_dir, False, False, None if self.test_subset else self.eval_transform()
            )
            self.test_set = first_images(test, self.test_subset, "test_subset", self.eval_transform(), "test")
        if stage not in (None, "fit", "validate") or self.train_set is not None:
            return
        full = open_dataset(self.spec, self.data_dir, True, False, None)
        indices = list(range(len(first_images(full, self.train_subset, "train_subset", None, "training"))))
        if self.val_split == 0:
            self.train_set = TransformedSubset(full, indices, self.train_transform())
            self.val_set = self.test_set
            return
        train_part, val_part = split_off(indices, self.val_split, self.split_seed)
        self.train_set = TransformedSubset(full, train_part, self.train_transform())
        self.val_set = TransformedSubset(full, val_part, self.eval_transform())

    def _loader(
        self, dataset: Dataset | None, batch_size: int, shuffle: bool, sharded: bool = True
    ) -> DataLoader | InMemoryLoader:
        """The loader of one split: in memory or over torchvision transforms, this rank's share
        (``sharded``) or every image as one device sees them."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if sharded and trainer is not None else (0, 1)
        drop_last = shuffle and self.drop_last
        if not self.in_memory:
            return torch_loader(dataset, batch_size, shuffle, rank, world_size, self.num_workers, drop_last)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        augment = shuffle and self.augment and self.augmentable
        mean, std = mean_std(self.spec, self.normalization)
        return memory_loader(dataset, self._tensors, batch_size, shuffle, device, mean, std, augment, rank,
                             world_size, drop_last)  # fmt: skip

    def _eval_batch_size(self) -> int:
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return 32 if device.type == "cpu" else max(self.batch_size, 512)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # In-memory batches are born on the device: skip Lightning's generic walk of the batch,
        # a quarter of a millisecond per step.
        if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader | InMemoryLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | InMemoryLoader:
        return self._loader(self.val_set, self._eval_batch_size(), shuffle=False)

    def test_dataloader(self) -> DataLoader | InMemoryLoader:
        return self._loader(self.test_set, self._eval_batch_size(), shuffle=False)

    def predict_dataloader(self) -> DataLoader | InMemoryLoader:
        return self._loader(self.test_set, self._eval_batch_size(), shuffle=False)

    def unsharded_dataloader(self, split: Literal["train", "val"], batch_size: int | None = None):
        """The loader of ``split`` as one device sees it, on every rank: all of its images, in
        one device's order (the training order of epoch 0), for work that one rank does alone
        on a stated subset (NormDiagnostics).

        Args:
            split: ``train`` or ``val``.
            batch_size: images per batch; None: the split's own batch size.
        """
        if split == "train":
            return self._loader(self.train_set, batch_size or self.batch_size, shuffle=True, sharded=False)
        return self._loader(self.val_set, batch_size or self._eval_batch_size(), shuffle=False, sharded=False)


class MNISTDataModule(ImageDataModule):
    """MNIST digits: 1 x 28 x 28, 10 classes, 60k train / 10k test."""

    spec = SPECS["mnist"]


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST garments: 1 x 28 x 28, 10 classes, 60k train / 10k test."""

    spec = SPECS["fashion_mnist"]


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 3 x 32 x 32, 10 classes, 50k train / 10k test."""

    spec = SPECS["cifar10"]


class CIFAR100DataModule(ImageDataModule):
    """CIFAR-100 with its 100 fine labels: 3 x 32 x 32, 50k train / 10k test."""

    spec = SPECS["cifar100"]


# Registry name -> data module; each class is named as its spec's ``module_name`` says (``--data``).
DATAMODULES: dict[str, type[ImageDataModule]] = {
    cls.spec.name: cls for cls in (MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule, CIFAR100DataModule)
}
