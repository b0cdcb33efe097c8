"""The datasets normbench trains on: the files torchvision reads for each (its facts are
``normbench.specs``), and opening it with a one-line error that says which files are
missing where and how to put them there."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset, random_split
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from normbench.errors import DatasetNotFoundError, first_line
from normbench.specs import DatasetSpec


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


def expected_files(spec: DatasetSpec, data_dir: str) -> tuple[str, list[str], str]:
    """(folder, the file names torchvision reads there, how to put them there)."""
    cls = spec.dataset_cls
    if issubclass(cls, datasets.MNIST):
        # torchvision reads the extracted files; the .gz archives are only a download cache.
        folder = os.path.join(data_dir, cls.__name__, "raw")
        files = [os.path.splitext(name)[0] for name, _ in cls.resources]
        return folder, files, f"gunzip {cls.resources[0][0]} and the other .gz archives there"
    folder = os.path.join(data_dir, cls.base_folder)
    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return folder, files, f"extract {cls.filename} into {data_dir}"


def not_found(spec: DatasetSpec, data_dir: str, reason: str) -> DatasetNotFoundError:
    """The error for files that are missing, or present and unreadable."""
    folder, files, fix = expected_files(spec, data_dir)
    missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
    subfolder = os.path.relpath(folder, data_dir)
    name = spec.dataset_cls.__name__
    if not missing:
        return DatasetNotFoundError(
            f"{name} files in {folder} are corrupted or truncated ({reason}); delete "
            f"{subfolder} and run again with --data.download true, or copy intact files there"
        )
    return DatasetNotFoundError(
        f"{name} not found: missing {', '.join(missing)} in {folder} ({reason}); {fix}, "
        f"set --data.data_dir to a folder that holds {subfolder}, or set --data.download true on a machine "
        "with network"
    )


def check_archives(spec: DatasetSpec, data_dir: str) -> None:
    """The MNIST family's .gz archives against their md5, where torchvision would extract them."""
    if not issubclass(spec.dataset_cls, datasets.MNIST):
        return
    folder, files, _ = expected_files(spec, data_dir)
    if all(os.path.isfile(os.path.join(folder, name)) for name in files):
        return  # torchvision reads the extracted files, not the archives
    for name, md5 in spec.dataset_cls.resources:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not check_integrity(path, md5):
            raise DatasetNotFoundError(
                f"{spec.dataset_cls.__name__} archive {path} fails its md5 check (corrupted or truncated); "
                "delete it and run again with --data.download true, or copy an intact copy there"
            )


def open_dataset(
    spec: DatasetSpec, data_dir: str, train: bool, download: bool, transform: Callable[[Any], Any] | None
) -> Dataset:
    """torchvision's dataset of one split; missing or broken files are one ``DatasetNotFoundError``."""
    if download:
        check_archives(spec, data_dir)
    try:
        return spec.dataset_cls(data_dir, train=train, transform=transform, download=download)
    # torchvision raises RuntimeError for missing or corrupted files and URLError/OSError for a
    # failed download; both become one short message that says which files and where. Reading a
    # truncated file fails with a RuntimeError or ValueError from the decoder.
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        line = first_line(err)
        if not download:
            reason = f"download=False; {line}" if "not found" not in line.lower() else "download=False"
        else:
            reason = f"download failed: {line}"
        raise not_found(spec, data_dir, reason) from None


def first_images(dataset: Dataset, count: int | None, option: str, transform: Callable[[Any], Any] | None,
                 kind: str) -> Dataset:  # fmt: skip
    """The first ``count`` images of ``dataset`` (None: all of it, as it is), with ``transform``;
    more than it has is a one-line error naming ``option`` and the split (``kind``: training or
    test)."""
    if count is None:
        return dataset
    if count > len(dataset):
        raise ValueError(
            f"{option}={count} exceeds the {len(dataset)} {kind} images of {type(dataset).__name__}; "
            f"use at most {len(dataset)} or null"
        )
    return TransformedSubset(dataset, list(range(count)), transform or (lambda image: image))


def split_off(indices: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) parts of ``indices``: ``fraction`` of them held out at random, by a
    seeded generator, not the global RNG, so that every rank and every run draws the same split."""
    n_val = round(fraction * len(indices))
    if not 0 < n_val < len(indices):
        raise ValueError(
            f"val_split={fraction} of {len(indices)} training images leaves {n_val} for validation; "
            "choose a val_split that holds out at least one image and keeps at least one for training"
        )
    generator = torch.Generator().manual_seed(seed)
    train_part, val_part = random_split(indices, [len(indices) - n_val, n_val], generator=generator)
    return [indices[i] for i in train_part.indices], [indices[i] for i in val_part.indices]


def mean_std(spec: DatasetSpec, normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of a normalization: ``half`` maps [0, 1] to [-1, 1], ``none``
    leaves it, ``dataset`` uses the dataset's own."""
    if normalization == "half":
        return (0.5,) * spec.in_channels, (0.5,) * spec.in_channels
    if normalization == "none":
        return (0.0,) * spec.in_channels, (1.0,) * spec.in_channels
    return spec.mean, spec.std


def image_transform(spec: DatasetSpec, normalization: str, augment: bool) -> transforms.Compose:
    """PIL image -> normalized float tensor (C, H, W), preceded by random crop (padding 4) and
    horizontal flip when ``augment`` and the dataset takes them."""
    steps: list[Callable[[Any], Any]] = []
    if augment and spec.augmentable:
        steps += [transforms.RandomCrop(spec.image_size, padding=4), transforms.RandomHorizontalFlip()]
    normalize = [] if normalization == "none" else [transforms.Normalize(*mean_std(spec, normalization))]
    return transforms.Compose([*steps, transforms.ToTensor(), *normalize])
