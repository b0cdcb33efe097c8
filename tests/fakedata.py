"""Small fake datasets written in the real on-disk formats, so torchvision's own loading code runs.

MNIST and FashionMNIST: IDX files (gzipped, and extracted as torchvision's download leaves them) in
``<root>/<name>/raw``. CIFAR-10 and CIFAR-100: the pickled batches of ``cifar-10-batches-py`` and
``cifar-100-python``.

Every image carries its id in the first three pixels of row 0 (channel 0): a split byte (0 train,
255 test) and the index as two bytes, so a test can tell which stored image a batch element is
and prove the test split stays out of training. Labels are learnable: each label draws a bright
bar whose position depends on the label, over dim noise.

The plain functions at the end are meant to be wrapped as pytest fixtures in a conftest.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import cifar
from torchvision.datasets.utils import check_integrity

TRAIN, TEST = 0, 255  # value of the split byte, pixel (0, 0)
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class FakeSplit:
    """What was written for one split.

    Args:
        images: uint8 (N, C, H, W), channel-first like ``ToTensor``'s output.
        labels: int64 (N,).
    """

    images: np.ndarray
    labels: np.ndarray


@dataclass
class FakeData:
    """The train and test splits written for one dataset."""

    train: FakeSplit
    test: FakeSplit


def make_images(n: int, split: int, num_classes: int, channels: int, size: int, seed: int) -> FakeSplit:
    """Deterministic uint8 images (N, C, H, W) with learnable labels and ids in row 0.

    Args:
        n: number of images (at most 65536, the ids are two bytes).
        split: ``TRAIN`` or ``TEST``, stored in pixel (0, 0).
        num_classes: labels are drawn from range(num_classes).
        channels: C.
        size: H = W (at least 26, so every bar fits).
        seed: with ``split``, fixes labels and noise.
    """
    if not 0 < n <= 1 << 16:
        raise ValueError(f"n must be in [1, 65536], got {n}")
    rng = np.random.default_rng([seed, split])
    labels = rng.integers(0, num_classes, size=n)
    images = rng.integers(0, 64, size=(n, channels, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        # Row band from the last digit, column band from the tens, so CIFAR-100's labels differ too.
        row, col = 4 + 2 * (label % 10), 4 + 2 * (label // 10 % 10)
        images[i, :, row : row + 2, 4 : size - 2] = 200
        images[i, label % channels, 4 : size - 2, col : col + 2] = 255
    images[:, 0, 0, 0] = split
    images[:, 0, 0, 1] = np.arange(n) >> 8
    images[:, 0, 0, 2] = np.arange(n) & 0xFF
    return FakeSplit(images=images, labels=labels.astype(np.int64))


def decode_ids(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> list[tuple[int, int]]:
    """(split byte, index) of each normalized image in a batch (N, C, H, W).

    Args:
        images: as a datamodule yields them, not augmented.
        mean: the normalization's per-channel mean.
        std: the normalization's per-channel std.
    """
    pixels = ((images[:, 0, 0, :3] * std[0] + mean[0]) * 255).round().long()
    return [(int(s), int(hi) << 8 | int(lo)) for s, hi, lo in pixels.tolist()]


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    # IDX: big-endian int32 magic, one big-endian int32 per dimension, then the raw bytes.
    payload = struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(payload)
    with gzip.open(f"{path}.gz", "wb") as f:
        f.write(payload)


def write_mnist(
    root: str | os.PathLike, name: str = "MNIST", n_train: int = 128, n_test: int = 64, seed: int = 0
) -> FakeData:
    """Write a fake MNIST or FashionMNIST in ``<root>/<name>/raw``; both use the same file names.

    torchvision reads the extracted files and checks no checksum for them, so no patch is needed.

    Args:
        root: the datamodule's ``data_dir``.
        name: ``MNIST`` or ``FashionMNIST``, the torchvision class name.
        n_train: training images.
        n_test: test images.
        seed: fixes labels and pixels.
    """
    if name not in ("MNIST", "FashionMNIST"):
        raise ValueError(f"name must be 'MNIST' or 'FashionMNIST', got {name!r}")
    raw = Path(root, name, "raw")
    raw.mkdir(parents=True, exist_ok=True)
    train = make_images(n_train, TRAIN, 10, 1, 28, seed)
    test = make_images(n_test, TEST, 10, 1, 28, seed)
    for prefix, split in (("train", train), ("t10k", test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", IDX_IMAGES_MAGIC, split.images[:, 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", IDX_LABELS_MAGIC, split.labels)
    return FakeData(train=train, test=test)


def _pickle(path: Path, obj: dict) -> None:
    # The real files are Python 2 pickles whose str keys torchvision reads with encoding="latin1";
    # protocol 2 with str keys loads the same way.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(
    root: str | os.PathLike, variant: str = "cifar10", n_train: int = 128, n_test: int = 64, seed: int = 0
) -> FakeData:
    """Write a fake CIFAR-10 (``<root>/cifar-10-batches-py``) or CIFAR-100 (``<root>/cifar-100-python``).

    torchvision checks each file's md5 against the real dataset's; tests must apply
    ``skip_cifar_md5`` before loading these files.

    Args:
        root: the datamodule's ``data_dir``.
        variant: ``cifar10`` or ``cifar100``.
        n_train: training images (CIFAR-10 spreads them over its five batches).
        n_test: test images.
        seed: fixes labels and pixels.
    """
    if variant not in ("cifar10", "cifar100"):
        raise ValueError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")
    num_classes = 10 if variant == "cifar10" else 100
    train = make_images(n_train, TRAIN, num_classes, 3, 32, seed)
    test = make_images(n_test, TEST, num_classes, 3, 32, seed)

    def batch(split: FakeSplit, rows: slice, label: str) -> dict:
        # Rows of 3072 bytes: the 1024 red, then green, then blue values, each 32 x 32 row-major.
        data = split.images[rows].reshape(-1, 3 * 32 * 32)
        entry = {"batch_label": label, "data": data, "filenames": [f"fake_{i}.png" for i in range(len(data))]}
        labels = split.labels[rows].tolist()
        if variant == "cifar10":
            entry["labels"] = labels
        else:
            entry["fine_labels"] = labels
            entry["coarse_labels"] = [label // 5 for label in labels]
        return entry

    if variant == "cifar10":
        folder = Path(root, "cifar-10-batches-py")
        folder.mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, n_train, 6).astype(int)
        for k in range(5):
            _pickle(
                folder / f"data_batch_{k + 1}",
                batch(train, slice(bounds[k], bounds[k + 1]), f"training batch {k + 1} of 5"),
            )
        _pickle(folder / "test_batch", batch(test, slice(None), "testing batch 1 of 1"))
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        _pickle(folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072})
    else:
        folder = Path(root, "cifar-100-python")
        folder.mkdir(parents=True, exist_ok=True)
        _pickle(folder / "train", batch(train, slice(None), "training batch 1 of 1"))
        _pickle(folder / "test", batch(test, slice(None), "testing batch 1 of 1"))
        meta = {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        }
        _pickle(folder / "meta", meta)
    return FakeData(train=train, test=test)


def write_all(root: str | os.PathLike, n_train: int = 128, n_test: int = 64, seed: int = 0) -> dict[str, FakeData]:
    """Write all four fake datasets under ``root``, keyed by ``normbench.data.DATAMODULES`` name.

    Args:
        root: the datamodules' ``data_dir``.
        n_train: training images per dataset.
        n_test: test images per dataset.
        seed: fixes labels and pixels.
    """
    return {
        "mnist": write_mnist(root, "MNIST", n_train, n_test, seed),
        "fashion_mnist": write_mnist(root, "FashionMNIST", n_train, n_test, seed),
        "cifar10": write_cifar(root, "cifar10", n_train, n_test, seed),
        "cifar100": write_cifar(root, "cifar100", n_train, n_test, seed),
    }


# -- fixture bodies: wrap with @pytest.fixture in a conftest ---------------------------------


def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let torchvision's CIFAR classes load the fake files.

    ``CIFAR10._check_integrity`` and ``CIFAR10._load_meta`` compare each file's md5 with the real
    dataset's, so fake files cannot pass. This keeps torchvision's existence check and drops only the
    md5 comparison, in the one name both methods call; missing files still fail as they would.
    """
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: check_integrity(fpath))


def fake_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide folder holding all four fake datasets (128 train, 64 test images each).

    Args:
        tmp_path_factory: pytest's session temp-path factory.
    """
    root = tmp_path_factory.mktemp("data")
    write_all(root)
    return root
