"""Shared fixtures: fake datasets in the real on-disk formats, and the real MNIST files."""

from __future__ import annotations

import shutil
from pathlib import Path

import fakedata
import pytest

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


@pytest.fixture(autouse=True)
def _cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    fakedata.skip_cifar_md5(monkeypatch)


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding small fake MNIST, FashionMNIST, CIFAR-10 and CIFAR-100."""
    root = tmp_path_factory.mktemp("fake_data")
    fakedata.write_all(root, n_train=128, n_test=64, seed=0)
    return root


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with the real MNIST files copied from ../shared/data (never written into)."""
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"real MNIST is not at {SHARED_MNIST}; copy the four .gz files there to run this test")
    root = tmp_path_factory.mktemp("mnist")
    shutil.copytree(SHARED_MNIST, root / "MNIST" / "raw")
    return root
