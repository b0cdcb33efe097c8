"""Shared fixtures: fake datasets in the real on-disk formats, and the real MNIST files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# A parallel run (pytest-xdist, pyproject.toml's addopts): each worker process gets its share of
# the cores for torch, and the processes its tests start inherit it, so that two workers do not
# each spin a thread per core on the same cores. Set before torch is imported; a user's own
# OMP_NUM_THREADS stands. The cores as normbench.results.cpu_cores counts them (the affinity
# mask), written out here: that module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import fakedata
import pytest

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


@pytest.fixture(autouse=True)
def _cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    fakedata.skip_cifar_md5(monkeypatch)


@pytest.fixture(autouse=True)
def _seed_environment():
    """Each test leaves the seed variables of the environment as it found them: Lightning's
    seed_everything writes the seed into os.environ (PL_GLOBAL_SEED), and every process a later
    test of the same worker starts would inherit it (a 64-bit seed made DDP fits fail there)."""
    names = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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


@pytest.fixture(scope="session")
def norm_run(fake_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """``norm_run(norm)``: the run directory of one short fit of that norm through the CLI (study
    2's quick MNIST config with its NormDiagnostics, 2 epochs of 3 steps, 2 validation batches),
    trained on first use and shared by the tests that check what such a run writes."""
    from quick_configs import mnist_config

    from normbench.main import main

    root = tmp_path_factory.mktemp("norm_runs")
    runs: dict[str, Path] = {}

    def run(norm: str) -> Path:
        if norm not in runs:
            main(["fit", "--config", mnist_config("bn", 16), "--model.norm", norm, "--model.width", "32",
                  "--data.data_dir", str(fake_data), "--data.download", "false", "--data.num_workers", "0",
                  "--trainer.default_root_dir", str(root / norm), "--trainer.max_epochs", "2",
                  "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
                  "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                  "--trainer.enable_model_summary", "false"])  # fmt: skip
            runs[norm] = root / norm / "lightning_logs" / f"mnist_{norm}_bs16" / "version_0"
        return runs[norm]

    return run
