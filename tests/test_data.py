"""Tests of normbench.data on fake datasets in the real on-disk formats; CPU only, no downloads."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import fakedata
import numpy as np
import pytest
import torch
from torchvision.datasets import cifar, mnist

from normbench.data import DATAMODULES, ImageDataModule, torch_loader
from normbench.errors import DatasetNotFoundError
from normbench.orders import EpochSampler
from normbench.specs import DATA_MODULE_NAMES, SPECS, dataset_name

N_TRAIN, N_TEST = 128, 64
NAMES = list(DATAMODULES)
EXPECTED = {  # name: (num_classes, in_channels, image size), from the datasets' documentation
    "mnist": (10, 1, 28),
    "fashion_mnist": (10, 1, 28),
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, fakedata.FakeData]]:
    root = tmp_path_factory.mktemp("data")
    return root, fakedata.write_all(root, N_TRAIN, N_TEST, seed=0)


@pytest.fixture(autouse=True)
def _cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    fakedata.skip_cifar_md5(monkeypatch)


def make(name: str, root: Path, **kwargs) -> ImageDataModule:
    kwargs = {"download": False, "num_workers": 0, "batch_size": 32, **kwargs}
    dm = DATAMODULES[name](data_dir=str(root), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def collect(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def expected(split: fakedata.FakeSplit, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x / 255 - mean) / std from the written bytes, independent of torchvision's transforms."""
    x = torch.from_numpy(split.images).double() / 255
    return ((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)).float()


def ids(images: torch.Tensor, dm: ImageDataModule) -> list[tuple[int, int]]:
    mean, std = ((0.5,), (0.5,)) if dm.normalization == "half" else (dm.mean, dm.std)
    return fakedata.decode_ids(images, mean, std)


TORCHVISION = {"mnist": mnist.MNIST, "fashion_mnist": mnist.FashionMNIST, "cifar10": cifar.CIFAR10,
               "cifar100": cifar.CIFAR100}  # fmt: skip


def test_registry_names_match_classes() -> None:
    assert set(DATAMODULES) == set(EXPECTED) == set(SPECS)
    for name, cls in DATAMODULES.items():
        assert cls.name == name
        assert (cls.num_classes, cls.in_channels, cls.image_size) == EXPECTED[name]
        assert cls.dataset_cls is TORCHVISION[name]
        # --data names the class, a run directory and a report the registry name: one from the other
        assert dataset_name(f"normbench.data.{cls.__name__}") == dataset_name(cls.__name__) == name
    assert DATA_MODULE_NAMES == tuple(cls.__name__ for cls in DATAMODULES.values())
    assert dataset_name("normbench.data.SVHNDataModule") == "normbench.data.SVHNDataModule"


@pytest.mark.parametrize("name", NAMES)
def test_half_normalization_matches_written_bytes(name: str, written) -> None:
    root, data = written
    dm = make(name, root)
    num_classes, channels, size = EXPECTED[name]
    assert (dm.num_classes, dm.in_channels, dm.name) == (num_classes, channels, name)

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, channels, size, size) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64

    x, y = collect(dm.test_dataloader())
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, expected(data[name].test, (0.5,) * channels, (0.5,) * channels))
    assert torch.equal(y, torch.from_numpy(data[name].test.labels))
    assert int(y.max()) < num_classes


@pytest.mark.parametrize("name", NAMES)
def test_dataset_normalization_matches_written_bytes(name: str, written) -> None:
    root, data = written
    dm = make(name, root, normalization="dataset")
    x, _ = collect(dm.test_dataloader())
    torch.testing.assert_close(x, expected(data[name].test, dm.mean, dm.std))
    # Unshuffled view of the training set: the same formula, in file order.
    train = torch.stack([dm.train_set[i][0] for i in range(N_TRAIN)])
    torch.testing.assert_close(train, expected(data[name].train, dm.mean, dm.std))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_val_split_zero_validates_on_test_split(name: str, written) -> None:
    root, data = written
    dm = make(name, root, eval_batch_size=50)
    x, y = collect(dm.val_dataloader())
    assert x.shape[0] == N_TEST
    torch.testing.assert_close(x, expected(data[name].test, (0.5,) * dm.in_channels, (0.5,) * dm.in_channels))
    assert torch.equal(y, torch.from_numpy(data[name].test.labels))
    assert next(iter(dm.val_dataloader()))[0].shape[0] == 50


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar100"])
@pytest.mark.parametrize("train_subset", [None, 100])
def test_val_split_carves_disjoint_part_of_train(name: str, train_subset: int | None, written) -> None:
    root, _ = written
    dm = make(name, root, val_split=0.25, split_seed=3, train_subset=train_subset)
    n = N_TRAIN if train_subset is None else train_subset
    train_ids = ids(collect(dm.train_dataloader())[0], dm)
    val_ids = ids(collect(dm.val_dataloader())[0], dm)
    test_ids = ids(collect(dm.test_dataloader())[0], dm)

    assert len(val_ids) == round(0.25 * n) and len(train_ids) == n - len(val_ids)
    assert not set(train_ids) & set(val_ids)
    assert set(train_ids) | set(val_ids) == {(fakedata.TRAIN, i) for i in range(n)}
    assert {split for split, _ in train_ids + val_ids} == {fakedata.TRAIN}
    assert set(test_ids) == {(fakedata.TEST, i) for i in range(N_TEST)}

    again = make(name, root, val_split=0.25, split_seed=3, train_subset=train_subset)
    assert again.val_set.indices == dm.val_set.indices and again.train_set.indices == dm.train_set.indices
    other = make(name, root, val_split=0.25, split_seed=4, train_subset=train_subset)
    assert other.val_set.indices != dm.val_set.indices


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_train_subset_takes_first_images(name: str, written) -> None:
    root, data = written
    dm = make(name, root, train_subset=40)
    x, y = collect(dm.train_dataloader())
    assert x.shape[0] == 40
    assert sorted(ids(x, dm)) == [(fakedata.TRAIN, i) for i in range(40)]
    assert sorted(y.tolist()) == sorted(data[name].train.labels[:40].tolist())

    too_big = DATAMODULES[name](data_dir=str(root), download=False, train_subset=N_TRAIN + 1)
    with pytest.raises(ValueError, match=rf"train_subset={N_TRAIN + 1}.*{N_TRAIN} training images"):
        too_big.setup("fit")


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_test_subset_takes_first_test_images_for_validation_and_test(name: str, written) -> None:
    root, data = written
    dm = make(name, root, test_subset=7, eval_batch_size=4)
    half = (0.5,) * dm.in_channels
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        x, y = collect(loader)
        assert ids(x, dm) == [(fakedata.TEST, i) for i in range(7)]
        torch.testing.assert_close(x, expected(data[name].test, half, half)[:7])
        assert torch.equal(y, torch.from_numpy(data[name].test.labels[:7]))
    too_big = DATAMODULES[name](data_dir=str(root), download=False, test_subset=N_TEST + 1)
    with pytest.raises(ValueError, match=rf"test_subset={N_TEST + 1}.*{N_TEST} test images"):
        too_big.setup("fit")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_augment_changes_train_images_only(name: str, written) -> None:
    root, data = written
    torch.manual_seed(0)
    dm = make(name, root, augment=True)
    train = torch.stack([dm.train_set[i][0] for i in range(16)])
    plain = expected(data[name].train, (0.5,) * 3, (0.5,) * 3)[:16]
    changed = [not torch.allclose(a, b) for a, b in zip(train, plain)]
    assert sum(changed) >= 8  # each image stays unchanged with probability 1/162
    x, _ = collect(dm.test_dataloader())
    torch.testing.assert_close(x, expected(data[name].test, (0.5,) * 3, (0.5,) * 3))


def test_augment_leaves_mnist_family_alone(written) -> None:
    root, data = written
    dm = make("mnist", root, augment=True)
    train = torch.stack([dm.train_set[i][0] for i in range(16)])
    torch.testing.assert_close(train, expected(data["mnist"].train, (0.5,), (0.5,))[:16])


@pytest.mark.parametrize(
    ("name", "folder", "file"),
    [
        ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw", "t10k-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py", "data_batch_1"),
        ("cifar100", "cifar-100-python", "train"),
    ],
)
def test_missing_files_without_download(name: str, folder: str, file: str, tmp_path: Path) -> None:
    dm = DATAMODULES[name](data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / folder) in message and file in message and "--data.data_dir" in message
    assert "\n" not in message and info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(DatasetNotFoundError):
        dm.setup("fit")


@pytest.mark.parametrize(("name", "module"), [("mnist", mnist), ("cifar10", cifar), ("cifar100", cifar)])
def test_failed_download_raises_our_error(name: str, module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url, *args, **kwargs):
        raise URLError("offline in tests")

    # The name each torchvision class calls to download, so no test touches the network.
    monkeypatch.setattr(module, "download_and_extract_archive", offline)
    dm = DATAMODULES[name](data_dir=str(tmp_path), download=True)
    with pytest.raises(DatasetNotFoundError, match="download failed") as info:
        dm.prepare_data()
    assert "--data.download" in str(info.value) and "\n" not in str(info.value)


def test_message_names_only_the_missing_file(tmp_path: Path) -> None:
    fakedata.write_mnist(tmp_path, "MNIST", n_train=8, n_test=8)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").unlink()
    dm = DATAMODULES["mnist"](data_dir=str(tmp_path), download=False)
    with pytest.raises(
        DatasetNotFoundError, match=r"missing t10k-images-idx3-ubyte in \S*MNIST.raw \(download=False\)"
    ):
        dm.prepare_data()


def test_real_md5_check_rejects_fake_cifar(written, monkeypatch: pytest.MonkeyPatch) -> None:
    # Why skip_cifar_md5 exists: with torchvision's md5 check in place, the fake files count as corrupted.
    monkeypatch.undo()
    root, _ = written
    dm = DATAMODULES["cifar10"](data_dir=str(root), download=False)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py are corrupted"):
        dm.prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0; set --data.batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size must be a positive integer or null, got 0"),
        ({"batch_size": True}, "batch_size must be a positive integer, got True"),
        ({"val_split": 1.0}, "got 1.0"),
        ({"val_split": -0.1}, "got -0.1"),
        ({"train_subset": 0}, "train_subset must be a positive integer or null, got 0"),
        ({"test_subset": 0}, "test_subset must be a positive integer or null, got 0"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs: dict, shown: str) -> None:
    with pytest.raises(ValueError, match=shown):
        DATAMODULES["mnist"](**kwargs)


def test_val_split_too_small_for_subset(written) -> None:
    root, _ = written
    dm = DATAMODULES["mnist"](data_dir=str(root), download=False, val_split=0.01, train_subset=10)
    with pytest.raises(ValueError, match="val_split=0.01 of 10 training images leaves 0"):
        dm.setup("fit")


def test_loader_settings(written) -> None:
    root, _ = written
    dm = make("mnist", root, batch_size=16, eval_batch_size=None, in_memory=False)
    assert dm.val_dataloader().batch_size == 32  # None on CPU: 32, which stays in cache
    assert make("mnist", root, batch_size=512, eval_batch_size=100).val_dataloader().batch_size == 100
    loader = dm.train_dataloader()
    assert loader.batch_size == 16 and not loader.drop_last
    assert isinstance(loader.sampler, EpochSampler)  # the in-memory path's order
    assert isinstance(dm.val_dataloader().sampler, torch.utils.data.SequentialSampler)
    assert dm.predict_dataloader().dataset is dm.test_set
    assert loader.pin_memory == torch.cuda.is_available()
    workers = DATAMODULES["mnist"](data_dir=str(root), download=False, num_workers=1, in_memory=False)
    workers.setup("test")
    assert workers.test_dataloader().persistent_workers and workers.train_set is None


def test_setup_for_test_stage_skips_training_set(written) -> None:
    root, data = written
    dm = DATAMODULES["cifar10"](data_dir=str(root), download=False, num_workers=0)
    dm.setup("test")
    assert dm.train_set is None and len(dm.test_set) == N_TEST
    np.testing.assert_array_equal(np.asarray(dm.test_set.targets), data["cifar10"].test.labels)


# --------------------------------------------------------------------------- the in-memory path


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("normalization", ["half", "dataset"])
def test_in_memory_batches_equal_the_torchvision_path(name, normalization, written) -> None:
    root, _ = written
    fast = make(name, root, normalization=normalization, eval_batch_size=20)
    slow = make(name, root, normalization=normalization, eval_batch_size=20, in_memory=False)
    for a, b in zip(_batches(fast.val_dataloader()), _batches(slow.val_dataloader()), strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
        assert torch.equal(a[1], b[1])
    assert len(fast.val_dataloader()) == len(slow.val_dataloader())


def test_in_memory_order_is_seeded_per_epoch_and_covers_the_set(written) -> None:
    root, _ = written
    torch.manual_seed(7)
    loader = make("cifar10", root, batch_size=10, val_split=0.25).train_dataloader()
    ids = lambda batches: [i for x, _ in batches for i in fakedata.decode_ids(x, (0.5,) * 3, (0.5,) * 3)]
    first = ids(_batches(loader))
    assert sorted(first) == sorted(set(first)) and len(first) == 96  # each of the 96 training images once
    assert ids(_batches(loader)) == first  # same epoch, same order
    loader.set_epoch(1)
    second = ids(_batches(loader))
    assert second != first and sorted(second) == sorted(first)
    torch.manual_seed(7)
    again = make("cifar10", root, batch_size=10, val_split=0.25).train_dataloader()
    again.set_epoch(1)
    assert ids(_batches(again)) == second  # the same seed gives the same order


def test_in_memory_augmentation_is_a_crop_of_the_padded_image_and_a_flip(written) -> None:
    root, _ = written
    dm = make("cifar10", root, batch_size=16, augment=True)
    loader = dm.train_dataloader()
    order = loader.order()[:16]
    x, _ = next(iter(loader))
    originals = loader.images[order].float() / 255
    padded = torch.nn.functional.pad(originals, (4, 4, 4, 4))
    unnormalized = x * 0.5 + 0.5
    moved = 0
    for b in range(16):
        windows = [padded[b, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        matches = [w for w in windows for v in (w, w.flip(2)) if torch.allclose(v, unnormalized[b], atol=1e-6)]
        assert matches, f"sample {b} is no crop of its padded image"
        moved += not torch.allclose(unnormalized[b], originals[b], atol=1e-6)
    assert moved > 8  # most samples really were cropped or flipped
    val = dm.val_dataloader()  # evaluation images are never augmented
    test_x, _ = next(iter(val))
    assert torch.allclose(test_x * 0.5 + 0.5, val.images[: len(test_x)].float() / 255, atol=1e-6)


def test_in_memory_shards_across_ranks(written) -> None:
    root, _ = written
    loader = make("mnist", root, batch_size=8).train_dataloader()
    orders = []
    for rank in range(3):
        loader.rank, loader.world_size = rank, 3
        orders.append(loader.order())
    n = len(loader.targets)
    assert all(len(o) == -(-n // 3) for o in orders)  # equal shares, padded as DistributedSampler pads
    assert set(torch.cat(orders).tolist()) == set(range(n))


def test_in_memory_evaluation_shards_are_uneven_and_never_repeat_an_image(written) -> None:
    # N_TEST test images over 3 ranks: every image on exactly one rank, none twice (a padded
    # shard would count an image twice in the metrics).
    root, _ = written
    dm = make("mnist", root, eval_batch_size=8)
    n = len(dm.val_dataloader().targets)
    shards = []
    for rank in range(3):
        loader = dm.val_dataloader()
        loader.rank, loader.world_size = rank, 3
        shards.append(loader.order().tolist())
        assert len(loader) == -(-len(shards[-1]) // 8) and sum(len(y) for _, y in loader) == len(shards[-1])
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert {len(s) for s in shards} == {n // 3, -(-n // 3)} or n % 3 == 0


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_torchvision_path_trains_on_the_in_memory_batches(world_size, written) -> None:
    # The same images in the same batches whichever data path, per rank too.
    root, _ = written
    orders = {}
    for in_memory in (True, False):
        torch.manual_seed(5)
        dm = make("mnist", root, batch_size=8, in_memory=in_memory, drop_last=True)
        per_rank = []
        for rank in range(world_size):
            if in_memory:
                loader = dm.train_dataloader()
                loader.rank, loader.world_size = rank, world_size
                loader.set_epoch(1)
            else:  # the DataLoader the data module builds on rank ``rank`` of ``world_size``
                loader = torch_loader(dm.train_set, 8, True, rank, world_size, 0, True)
                loader.sampler.set_epoch(1)
            per_rank.append([ids(x, dm) for x, _ in loader])
        orders[in_memory] = per_rank
    assert orders[True] == orders[False]
    assert [len(o) for o in orders[False]] == [N_TRAIN // (8 * world_size)] * world_size


def test_the_torchvision_path_resumes_in_the_middle_of_an_epoch(written) -> None:
    # Stopped after 3 batches of epoch 1, resumed from the loader's state in a new process (the
    # same seed): the batches after those 3, then whole epochs again.
    root, _ = written

    def loader():
        torch.manual_seed(5)
        dm = make("mnist", root, batch_size=8, in_memory=False)
        return dm, dm.train_dataloader()

    dm, first = loader()
    first.sampler.set_epoch(1)
    whole = [ids(x, dm) for x, _ in first]
    for i, _ in enumerate(first):
        if i == 2:
            break
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    _, resumed = loader()
    resumed.load_state_dict(state)
    assert len(resumed) == len(whole)  # the epoch's length, as Lightning counts it
    assert [ids(x, dm) for x, _ in resumed] == whole[3:]
    assert resumed.state_dict()["position"] == len(whole)
    assert [ids(x, dm) for x, _ in resumed] == whole  # the next pass of the epoch: all of it


@pytest.mark.parametrize("seed", [0, 9_300_000, 2**31 + 5, 2**63 - 1])
def test_any_seed_up_to_2_63_orders_and_augments(seed, written) -> None:
    # Seeds above about 9.2 million overflowed the 64-bit generator seed of the augmentation.
    root, _ = written
    torch.manual_seed(seed)
    loader = make("cifar10", root, batch_size=16, augment=True).train_dataloader()
    assert loader.seed == seed
    x, _ = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and torch.isfinite(x).all()


@pytest.mark.parametrize("n, world", [(23, 3), (23, 4), (22, 4), (24, 4)])
def test_padded_images_counts_the_repeats_of_the_ranks_orders(n, world):
    # Guards against EpochOrder.padded_images `-self.n % world_size` -> `self.n % world_size`
    # (the same for world_size 2 and odd n, the only case tested). Independent count: every
    # rank's indices of one epoch, their total minus the distinct images.
    from normbench.orders import EpochOrder

    orders = [EpochOrder(n, 4, True, seed=3, rank=r, world_size=world) for r in range(world)]
    taken = torch.cat([o.indices(0) for o in orders]).tolist()
    repeats = len(taken) - len(set(taken))
    assert set(taken) == set(range(n))
    assert [o.padded_images() for o in orders] == [repeats] * world


@pytest.mark.parametrize("in_memory", [True, False])
def test_drop_last_drops_training_batches_only_never_evaluation_images(fake_data, in_memory):
    # Guards against ImageDataModule._loader `drop_last = shuffle and self.drop_last` ->
    # `drop_last = self.drop_last` (study 1's drop_last: true would then score validation and
    # test on fewer images). The 64 fake test images in batches of 10 (6 full + 4): all 64, in
    # file order, must be evaluated; training drops its short batch (128 = 8 x 15 + 8).
    from normbench.data import MNISTDataModule

    dm = MNISTDataModule(
        data_dir=str(fake_data),
        download=False,
        num_workers=0,
        batch_size=15,
        eval_batch_size=10,
        drop_last=True,
        in_memory=in_memory,
    )
    dm.setup("fit")
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        labels = torch.cat([y for _, y in loader])
        assert labels.tolist() == [int(dm.test_set[i][1]) for i in range(len(dm.test_set))]
        assert len(labels) == 64
    assert [len(y) for _, y in dm.train_dataloader()] == [15] * (128 // 15)
