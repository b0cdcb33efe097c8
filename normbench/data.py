"""LightningDataModules for MNIST, FashionMNIST, CIFAR-10 and CIFAR-100 over torchvision's datasets.

One base class, ``ImageDataModule``, holds all the logic; each dataset is a subclass that only sets
class attributes. ``prepare_data`` is the one place that may download; ``setup`` reads files already
on disk, so every rank builds the same datasets without touching the network.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from normbench.errors import DatasetNotFoundError, first_line
from normbench.loaders import InMemoryLoader


class TransformedSubset(Dataset):
    """The items of ``dataset`` at ``indices``, with ``transform`` applied to the image.

    Train and validation views of one training set need different transforms (only training is
    augmented); views over one untransformed dataset share a single copy of the images.

    Args:
        dataset: a dataset of (image, target) pairs.
        indices: positions in ``dataset``, in the order this view yields them.
        transform: applied to each image.
    """

    def __init__(self, dataset: Dataset, indices: list[int], transform: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[self.indices[index]]
        return self.transform(image), target

    def __len__(self) -> int:
        return len(self.indices)


class ImageDataModule(LightningDataModule):
    """Train, validation and test loaders for one torchvision image-classification dataset.

    Subclasses set the class attributes below and nothing else.

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

    name: str
    dataset_cls: type[datasets.VisionDataset]
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Whether ``augment=True`` applies random crop and flip to this dataset.
    augmentable: bool = False

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_split: float = 0.0,
        split_seed: int = 0,
        num_workers: int = 2,
        normalization: Literal["half", "dataset", "none"] = "half",
        augment: bool = False,
        train_subset: int | None = None,
        test_subset: int | None = None,
        in_memory: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}; set --data.batch_size to a positive integer")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(
                f"eval_batch_size must be >= 1 or null, got {eval_batch_size}; "
                "set --data.eval_batch_size to a positive integer or null"
            )
        if not 0.0 <= val_split < 1.0:
            raise ValueError(
                f"val_split must be in [0, 1), got {val_split}; "
                "use 0 to validate on the test split or a fraction such as 0.1 of the training set"
            )
        if train_subset is not None and train_subset < 1:
            raise ValueError(
                f"train_subset must be >= 1 or null, got {train_subset}; "
                "set --data.train_subset to a positive integer or null for the whole training set"
            )
        if test_subset is not None and test_subset < 1:
            raise ValueError(
                f"test_subset must be >= 1 or null, got {test_subset}; "
                "set --data.test_subset to a positive integer or null for the whole test split"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}; use 0 to load data in the main process")
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

    def _mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the chosen normalization."""
        if self.normalization == "half":
            return (0.5,) * self.in_channels, (0.5,) * self.in_channels
        if self.normalization == "none":
            return (0.0,) * self.in_channels, (1.0,) * self.in_channels
        return self.mean, self.std

    def _normalize(self) -> list[Callable[[Any], Any]]:
        return [] if self.normalization == "none" else [transforms.Normalize(*self._mean_std())]

    def eval_transform(self) -> transforms.Compose:
        """PIL image -> normalized float tensor (C, H, W)."""
        return transforms.Compose([transforms.ToTensor(), *self._normalize()])

    def train_transform(self) -> transforms.Compose:
        """``eval_transform``, preceded by random crop and flip when augmenting this dataset."""
        steps: list[Callable[[Any], Any]] = []
        if self.augment and self.augmentable:
            steps += [transforms.RandomCrop(self.image_size, padding=4), transforms.RandomHorizontalFlip()]
        return transforms.Compose([*steps, transforms.ToTensor(), *self._normalize()])

    # -- files -------------------------------------------------------------------------------

    def _expected_files(self) -> tuple[str, list[str], str]:
        """(folder, the file names torchvision reads there, how to put them there)."""
        cls = self.dataset_cls
        if issubclass(cls, datasets.MNIST):
            # torchvision reads the extracted files; the .gz archives are only a download cache.
            folder = os.path.join(self.data_dir, cls.__name__, "raw")
            files = [os.path.splitext(name)[0] for name, _ in cls.resources]
            return folder, files, f"gunzip {cls.resources[0][0]} and the other .gz archives there"
        folder = os.path.join(self.data_dir, cls.base_folder)
        files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return folder, files, f"extract {cls.filename} into {self.data_dir}"

    def _not_found(self, reason: str) -> DatasetNotFoundError:
        folder, files, fix = self._expected_files()
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        subfolder = os.path.relpath(folder, self.data_dir)
        if not missing:
            return DatasetNotFoundError(
                f"{self.dataset_cls.__name__} files in {folder} are corrupted or truncated ({reason}); delete "
                f"{subfolder} and run again with --data.download true, or copy intact files there"
            )
        return DatasetNotFoundError(
            f"{self.dataset_cls.__name__} not found: missing {', '.join(missing)} in {folder} ({reason}); {fix}, "
            f"set --data.data_dir to a folder that holds {subfolder}, or set --data.download true on a machine "
            "with network"
        )

    def _check_archives(self) -> None:
        """The MNIST family's .gz archives against their md5, where torchvision would extract them."""
        if not issubclass(self.dataset_cls, datasets.MNIST):
            return
        folder, files, _ = self._expected_files()
        if all(os.path.isfile(os.path.join(folder, name)) for name in files):
            return  # torchvision reads the extracted files, not the archives
        for name, md5 in self.dataset_cls.resources:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not check_integrity(path, md5):
                raise DatasetNotFoundError(
                    f"{self.dataset_cls.__name__} archive {path} fails its md5 check (corrupted or truncated); "
                    "delete it and run again with --data.download true, or copy an intact copy there"
                )

    def _open(self, train: bool, download: bool, transform: Callable[[Any], Any] | None) -> Dataset:
        if download:
            self._check_archives()
        try:
            return self.dataset_cls(self.data_dir, train=train, transform=transform, download=download)
        # torchvision raises RuntimeError for missing or corrupted files and URLError/OSError for a
        # failed download; both become one short message that says which files and where. Reading a
        # truncated file fails with a RuntimeError or ValueError from the decoder.
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
            line = first_line(err)
            if not download:
                reason = f"download=False; {line}" if "not found" not in line.lower() else "download=False"
            else:
                reason = f"download failed: {line}"
            raise self._not_found(reason) from None

    # -- LightningDataModule hooks -----------------------------------------------------------

    def prepare_data(self) -> None:
        """Download the train and test splits if allowed and missing; the only method that downloads."""
        for train in (True, False):
            self._open(train, download=self.download, transform=None)

    def setup(self, stage: str | None = None) -> None:
        """Build ``train_set``, ``val_set`` and ``test_set`` from files on disk (never downloads).

        Args:
            stage: Lightning's stage; the training and validation sets are built for fit,
                validate and None, the test set always.
        """
        if self.test_set is None:
            if self.test_subset is None:
                self.test_set = self._open(False, download=False, transform=self.eval_transform())
            else:
                test = self._open(False, download=False, transform=None)
                if self.test_subset > len(test):
                    raise ValueError(
                        f"test_subset={self.test_subset} exceeds the {len(test)} test images of "
                        f"{self.dataset_cls.__name__}; use at most {len(test)} or null"
                    )
                self.test_set = TransformedSubset(test, list(range(self.test_subset)), self.eval_transform())
        if stage not in (None, "fit", "validate") or self.train_set is not None:
            return
        full = self._open(True, download=False, transform=None)
        n = len(full)
        if self.train_subset is not None and self.train_subset > n:
            raise ValueError(
                f"train_subset={self.train_subset} exceeds the {n} training images of "
                f"{self.dataset_cls.__name__}; use at most {n} or null"
            )
        indices = list(range(n if self.train_subset is None else self.train_subset))
        if self.val_split == 0:
            self.train_set = TransformedSubset(full, indices, self.train_transform())
            self.val_set = self.test_set
            return
        n_val = round(self.val_split * len(indices))
        if not 0 < n_val < len(indices):
            raise ValueError(
                f"val_split={self.val_split} of {len(indices)} training images leaves {n_val} for validation; "
                "choose a val_split that holds out at least one image and keeps at least one for training"
            )
        # A seeded generator, not the global RNG, so every rank and every run draws the same split.
        generator = torch.Generator().manual_seed(self.split_seed)
        train_part, val_part = random_split(indices, [len(indices) - n_val, n_val], generator=generator)
        self.train_set = TransformedSubset(full, [indices[i] for i in train_part.indices], self.train_transform())
        self.val_set = TransformedSubset(full, [indices[i] for i in val_part.indices], self.eval_transform())

    def _shard(self, sharded: bool) -> tuple[int, int]:
        """(rank, world size) a loader takes its share for: the trainer's, or (0, 1) unsharded."""
        trainer = self.trainer
        if not sharded or trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(
        self, dataset: Dataset | None, batch_size: int, shuffle: bool, sharded: bool = True
    ) -> DataLoader | InMemoryLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        if self.in_memory:
            return self._memory_loader(dataset, batch_size, shuffle, sharded)
        rank, world_size = self._shard(sharded)
        sampler = None
        if not shuffle and world_size > 1:
            # Lightning's own DistributedSampler would pad the shards to equal length and count
            # some images twice; this one gives each rank every world_size-th image, no padding.
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=shuffle and self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _as_tensors(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 (N, C, H, W), int64 (N,)) of a torchvision dataset, read once from its arrays."""
        if id(dataset) not in self._tensors:
            data = torch.as_tensor(dataset.data)
            data = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # MNIST (N,H,W), CIFAR (N,H,W,C)
            self._tensors[id(dataset)] = data.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long)
        return self._tensors[id(dataset)]

    def _memory_loader(self, dataset: Dataset, batch_size: int, train: bool, sharded: bool = True) -> InMemoryLoader:
        base, indices = (
            (dataset.dataset, dataset.indices) if isinstance(dataset, TransformedSubset) else (dataset, None)
        )
        images, targets = self._as_tensors(base)
        if indices is not None:
            index = torch.as_tensor(indices, dtype=torch.long)
            images, targets = images[index], targets[index]
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        mean, std = self._mean_std()
        rank, world_size = self._shard(sharded)
        return InMemoryLoader(
            images.to(device),
            targets.to(device),
            batch_size,
            shuffle=train,
            mean=mean,
            std=std,
            augment=train and self.augment and self.augmentable,
            seed=torch.initial_seed(),
            rank=rank,
            world_size=world_size,
            drop_last=train and self.drop_last,
        )

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

    name = "mnist"
    dataset_cls = datasets.MNIST
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.1307,)
    std = (0.3081,)


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST garments: 1 x 28 x 28, 10 classes, 60k train / 10k test."""

    name = "fashion_mnist"
    dataset_cls = datasets.FashionMNIST
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 3 x 32 x 32, 10 classes, 50k train / 10k test."""

    name = "cifar10"
    dataset_cls = datasets.CIFAR10
    num_classes = 10
    in_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    augmentable = True


class CIFAR100DataModule(ImageDataModule):
    """CIFAR-100 with its 100 fine labels: 3 x 32 x 32, 50k train / 10k test."""

    name = "cifar100"
    dataset_cls = datasets.CIFAR100
    num_classes = 100
    in_channels = 3
    image_size = 32
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    augmentable = True


DATAMODULES: dict[str, type[ImageDataModule]] = {
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
}


# The data modules' class names, as ``--data`` takes them; errors list them for a bad one.
DATA_MODULE_NAMES = tuple(cls.__name__ for cls in DATAMODULES.values())


def dataset_name(class_path: str) -> str:
    """The registry name (``mnist``) of a data module's class path or class name, or the
    input itself when it names none of them."""
    name = str(class_path).rsplit(".", 1)[-1]
    return next((k for k, v in DATAMODULES.items() if v.__name__ == name), str(class_path))
