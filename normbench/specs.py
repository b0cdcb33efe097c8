"""What each dataset normbench trains on is, as data (``DatasetSpec``), and the names that refer
to it: its registry name (``dataset:`` in configs, run directories), its torchvision class and its
data module's class (``--data``).

Plain Python, without torch: the report reads a run's class count (its chance level) and the
command table its data modules' names without loading torch or Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetSpec:
    """One torchvision image-classification dataset.

    Args:
        name: the registry name (``dataset:`` in configs).
        torchvision_name: its class in ``torchvision.datasets``, which lists the files and their md5.
        num_classes: classes.
        in_channels: image channels.
        image_size: image height and width.
        mean: the per-channel mean of its training images (``normalization: dataset``).
        std: their per-channel standard deviation.
        augmentable: whether ``augment: true`` applies random crop and flip to it.
    """

    name: str
    torchvision_name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentable: bool = False

    @property
    def dataset_cls(self) -> Any:
        """The torchvision dataset class (imported here, when a dataset is opened)."""
        from torchvision import datasets

        return getattr(datasets, self.torchvision_name)

    @property
    def module_name(self) -> str:
        """Its data module's class name in ``normbench.data`` (``--data MNISTDataModule``)."""
        return f"{self.torchvision_name}DataModule"


SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("mnist", "MNIST", 10, 1, 28, (0.1307,), (0.3081,)),
        DatasetSpec("fashion_mnist", "FashionMNIST", 10, 1, 28, (0.2860,), (0.3530,)),
        DatasetSpec("cifar10", "CIFAR10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
        DatasetSpec("cifar100", "CIFAR100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    )
}


# The data modules' class names, as ``--data`` takes them; errors list them for a bad one.
DATA_MODULE_NAMES = tuple(spec.module_name for spec in SPECS.values())


def dataset_name(class_path: str) -> str:
    """The registry name (``mnist``) of a data module's class path or class name, or the
    input itself when it names none of them."""
    name = str(class_path).rsplit(".", 1)[-1]
    return next((k for k, spec in SPECS.items() if spec.module_name == name), str(class_path))
