"""Bad input: one line that names the bad value and the fix, exit status 2, no traceback."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import fakedata
import pytest
import yaml
from quick_configs import mnist_config

from normbench.main import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = mnist_config("bn", 16)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Fake MNIST and CIFAR-10, broken copies of them, bad configs and a checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    fakedata.write_mnist(root / "data")
    fakedata.write_cifar(root / "data", "cifar10")
    # Truncated MNIST: the extracted training images cut in half.
    shutil.copytree(root / "data" / "MNIST", root / "truncated" / "MNIST")
    images = root / "truncated" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    # A corrupted MNIST archive where torchvision would extract it: the .gz only, wrong bytes.
    raw = root / "badgz" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"not the MNIST file")
    (root / "broken.yaml").write_text("model: [unclosed\n  norm: bn\n")
    (root / "unknown_key.yaml").write_text(yaml.safe_dump({"model": {"nrom": "bn"}}))
    (root / "empty_grid.yaml").write_text(yaml.safe_dump({"base": CONFIG, "grid": {}}))
    bad_axis = {"base": CONFIG, "overrides": {"data.data_dir": str(root / "data")}, "grid": {"model.nrom": ["bn"]}}
    (root / "bad_axis.yaml").write_text(yaml.safe_dump(bad_axis))
    good = {"base": CONFIG, "overrides": {"data.data_dir": str(root / "data")}, "grid": {"model.norm": ["bn"]}}
    (root / "sweep.yaml").write_text(yaml.safe_dump(good))
    no_data = {**good, "overrides": {"data.data_dir": str(root / "nodata"), "data.download": False}}
    (root / "no_data_sweep.yaml").write_text(yaml.safe_dump(no_data))
    main([*fit(root), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
          "--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]", "--name", "ckpt", "--version", "0"])  # fmt: skip
    return root


def fit(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", CONFIG, "--data.data_dir", str(root / "data"), "--data.download", "false",
            "--trainer.default_root_dir", str(root / "out"), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]  # fmt: skip


def ckpt(root: Path) -> str:
    return str(root / "out" / "lightning_logs" / "ckpt" / "version_0" / "checkpoints" / "last.ckpt")


# name -> (arguments, given the workspace; what the one line must contain)
CASES = {
    "unknown norm": (lambda r: fit(r, "--model.norm", "batchnorm"), ["'batchnorm'", "not one of bn, bnrs, brn"]),
    "unknown dataset": (
        lambda r: fit(r, "--data", "ImageNetDataModule"),
        ["'ImageNetDataModule'", "use one of MNISTDataModule"],
    ),
    "unknown activation": (lambda r: fit(r, "--model.activation", "swishy"), ["'swishy'", "relu, sigmoid"]),
    "batch_size 0": (
        lambda r: fit(r, "--data.batch_size", "0"),
        ["data.batch_size", "'0' is not a positive integer"],
    ),
    "batch_size not a number": (
        lambda r: fit(r, "--data.batch_size", "two"),
        ["data.batch_size", "'two'", "a positive integer"],
    ),
    "num_groups not dividing": (
        lambda r: fit(r, "--model.norm", "gn", "--model.norm_kwargs", "{num_groups: 5}"),
        ["num_groups=5 does not divide num_features=64", "one of [1, 2, 4"],
    ),
    "unknown norm option": (
        lambda r: fit(r, "--model.norm", "gn", "--model.norm_kwargs", "{groups: 4}"),
        ["no option 'groups'", "num_groups"],
    ),
    "r_max below 1": (
        lambda r: fit(r, "--model.norm", "brn", "--model.norm_kwargs", "{r_max: 0.5}"),
        ["r_max=0.5 must be >= 1", "uses 3"],
    ),
    "d_max below 0": (
        lambda r: fit(r, "--model.norm", "brn", "--model.norm_kwargs", "{d_max: -1}"),
        ["d_max=-1", "must be >= 0", "uses 5"],
    ),
    "val_split 1": (lambda r: fit(r, "--data.val_split", "1.0"), ["val_split must be in [0, 1), got 1.0", "use 0"]),
    "val_split negative": (lambda r: fit(r, "--data.val_split", "-0.1"), ["got -0.1"]),
    "train_subset too large": (
        lambda r: fit(r, "--data.train_subset", "100000"),
        ["train_subset=100000 exceeds the 128 training images", "at most 128"],
    ),
    "files missing offline": (
        lambda r: fit(r, "--data.data_dir", str(r / "nothing")),
        ["missing train-images-idx3-ubyte", "download=False", "--data.data_dir"],
    ),
    "truncated files": (
        lambda r: fit(r, "--data.data_dir", str(r / "truncated")),
        ["corrupted or truncated", "delete MNIST/raw"],
    ),
    "archive fails md5": (
        lambda r: fit(r, "--data.data_dir", str(r / "badgz"), "--data.download", "true"),
        ["train-images-idx3-ubyte.gz fails its md5 check", "delete it"],
    ),
    "cifar fails md5": (
        lambda r: fit(r, "--data", "CIFAR10DataModule", "--data.data_dir", str(r / "data")),
        ["cifar-10-batches-py are corrupted", "--data.download true"],
    ),
    "config YAML broken": (
        lambda r: ["fit", "--config", str(r / "broken.yaml")],
        ["broken.yaml is not valid YAML at line 2", "fix it there"],
    ),
    "config file missing": (lambda r: ["fit", "--config", str(r / "nope.yaml")], ["nope.yaml does not exist"]),
    "sweep config missing": (
        lambda r: ["sweep", "--config", str(r / "nope.yaml")],
        ["nope.yaml does not exist", "e.g. configs/sweeps/study2_fashion_cpu.yaml"],
    ),
    "config before the command": (
        lambda r: ["-c", CONFIG, "fit", "--print_config"],
        [f"--config goes after the command: normbench fit --config {CONFIG}"],
    ),
    # The other kind of config: which it is, and the command that takes it.
    "sweep config to fit": (
        lambda r: ["fit", "--config", str(r / "sweep.yaml")],
        ["sweep.yaml is a sweep config (it has a grid)", "normbench sweep --config"],
    ),
    "experiment config to sweep": (
        lambda r: ["sweep", "--config", CONFIG],
        ["is an experiment config, not a sweep config (it has no grid)", f"normbench fit --config {CONFIG}"],
    ),
    "unknown key in config": (lambda r: [*fit(r), "--config", str(r / "unknown_key.yaml")], ["nrom", "--help"]),
    "unknown key on the command line": (lambda r: fit(r, "--model.nrom", "bn"), ["--model.nrom", "--help"]),
    "sweep axis that is no key": (
        lambda r: ["sweep", "--config", str(r / "bad_axis.yaml"), "--output", str(r / "sw")],
        ["model.nrom", "fix the sweep's grid"],
    ),
    "sweep with an empty grid": (
        lambda r: ["sweep", "--config", str(r / "empty_grid.yaml"), "--output", str(r / "sw")],
        ["grid is empty", "list of values"],
    ),
    "sweep threads_per_run 0": (
        lambda r: ["sweep", "--config", str(r / "sweep.yaml"), "--output", str(r / "sw"), "--threads_per_run", "0"],
        ["threads_per_run: '0' is not a positive integer or null"],
    ),
    "sweep threads_per_run negative": (
        lambda r: ["sweep", "--config", str(r / "sweep.yaml"), "--output", str(r / "sw"), "--threads_per_run", "-3"],
        ["threads_per_run: '-3' is not a positive integer or null"],
    ),
    "sweep workers 0": (
        lambda r: ["sweep", "--config", str(r / "sweep.yaml"), "--output", str(r / "sw"), "--workers", "0"],
        ["workers: '0' is not a positive integer or one of auto"],
    ),
    "sweep cell outside the grid": (
        lambda r: ["sweep", "--config", str(r / "sweep.yaml"), "--output", str(r / "sw"), "--cell", "99"],
        ["--cell 99 is not in the grid; use 0 to "],
    ),
    # Checked before the first run: a sweep whose dataset is missing starts none of its runs.
    "sweep without its dataset": (
        lambda r: ["sweep", "--config", str(r / "no_data_sweep.yaml"), "--output", str(r / "sw_no_data")],
        ["MNIST not found", str(Path("nodata") / "MNIST" / "raw"), "--data.download true"],
    ),
    "sweep runs_per_worker 0": (
        lambda r: ["sweep", "--config", str(r / "sweep.yaml"), "--output", str(r / "sw"), "--runs_per_worker", "0"],
        ["runs_per_worker: '0' is not a positive integer or null"],
    ),
    "checkpoint of another norm": (
        lambda r: fit(r, "--model.norm", "gn", "--ckpt_path", ckpt(r)),
        ["is of another model", "norm='bn'", "this run norm='gn'", "drop --model.norm"],
    ),
    "checkpoint of another width": (
        lambda r: [
            "test",
            "--config",
            CONFIG,
            "--data.data_dir",
            str(r / "data"),
            "--model.width",
            "32",
            "--ckpt_path",
            ckpt(r),
        ],
        ["width=64", "width=32"],
    ),
    "checkpoint not a checkpoint": (
        lambda r: fit(r, "--ckpt_path", str(r / "broken.yaml")),
        ["broken.yaml cannot be read", "saved by normbench fit"],
    ),
    "checkpoint missing": (lambda r: fit(r, "--ckpt_path", str(r / "gone.ckpt")), ["gone.ckpt not found", "last"]),
    # A command typed without what it cannot run without: what to give, not only what is missing.
    "fit alone": (
        lambda r: ["fit"],
        ["fit.data not given", "--config configs/mnist_bn_bs16.yaml", "--data MNISTDataModule"],
    ),
    "sweep alone": (lambda r: ["sweep"], ["base not given", "--config configs/sweeps/"]),
    "report alone": (lambda r: ["report"], ["paths not given", "the sweep or run directories"]),
    "no command": (lambda r: [], ["no command given; use one of fit, validate, test, predict, sweep, report, bench"]),
    # Lightning's own refusals (MisconfigurationException) and values only building can judge.
    "max_epochs -1 with no max_steps": (
        lambda r: fit(r, "--trainer.max_epochs", "-1", "--trainer.max_steps", "-1"),
        ["max_epochs=-1", "trains forever", "--trainer.max_epochs"],
    ),
    "max_epochs -2": (lambda r: fit(r, "--trainer.max_epochs", "-2"), ["max_epochs", "-2"]),
    "barebones": (
        lambda r: fit(r, "--trainer.barebones", "true"),
        ["trainer.barebones=true", "logging, checkpoints and metrics", "drop it"],
    ),
    # The optimizer step's batch is the run's: accumulation would split it unseen by its name,
    # budget and norms.
    "accumulate_grad_batches": (
        lambda r: fit(r, "--trainer.accumulate_grad_batches", "2"),
        ["trainer.accumulate_grad_batches=2", "as data.batch_size", "model.norm_batch", "drop the option"],
    ),
    # Lightning would sync torch's BatchNorm alone, the record saying per device.
    "sync_batchnorm without sync_norms": (
        lambda r: fit(r, "--trainer.sync_batchnorm", "true", "--model.sync_norms", "false"),
        ["trainer.sync_batchnorm=true with model.sync_norms=false", "drop --trainer.sync_batchnorm"],
    ),
    "gpu on a machine without one": (
        lambda r: fit(r, "--trainer.accelerator", "gpu"),
        ["trainer.accelerator", "no usable GPU", "use cpu or auto"],
    ),
    "norm option of the wrong type": (
        lambda r: fit(r, "--model.norm", "brn", "--model.norm_kwargs", "{r_max: abc}"),
        ["brn", "r_max='abc'", "str", "expected float"],
    ),
    "norm option int for bool": (
        lambda r: fit(r, "--model.norm", "gn", "--model.norm_kwargs", "{affine: 1}"),
        ["gn", "affine=1", "expected bool"],
    ),
    "width 0": (lambda r: fit(r, "--model.width", "0"), ["model.width", "'0' is not a positive integer"]),
    "eps 0": (
        lambda r: fit(r, "--model.norm", "bn", "--model.norm_kwargs", "{eps: 0}"),
        ["bn: eps=0 must be > 0"],
    ),
    "momentum above 1": (
        lambda r: fit(r, "--model.norm", "bnrs", "--model.norm_kwargs", "{momentum: 2}"),
        ["bnrs: momentum=2 must be in [0, 1]"],
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_gets_one_line_and_exit_status_2(case, workspace, capsys, monkeypatch):
    if case == "gpu on a machine without one":
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    if case == "cifar fails md5":
        monkeypatch.undo()  # put torchvision's md5 check back: the fake files are not the real ones
    make_args, expected = CASES[case]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(make_args(workspace))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("normbench: error:")]
    assert len(lines) == 1, err
    for part in expected:
        assert part in lines[0], lines[0]


def test_a_sweep_without_its_dataset_leaves_nothing_behind(workspace, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--config", str(workspace / "no_data_sweep.yaml"), "--output", str(workspace / "sw_gone")])
    assert not (workspace / "sw_gone").exists() and not (workspace / "nodata").exists()


def test_the_console_script_exits_2_with_only_the_line(workspace):
    # -X importtime: every module the command imported, one line each on stderr.
    cmd = [sys.executable, "-X", "importtime", "-m", "normbench", *fit(workspace, "--data.batch_size", "0")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    imported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    assert proc.returncode == 2
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if "error" in line.lower()] == [
        "normbench: error: data.batch_size: '0' is not a positive integer"
    ]
    assert stderr.strip().splitlines()[-1].startswith("normbench: error:")
    # The fit path's fixed cost: it imports no sweep, report or bench machinery, statistics or
    # Ray (Lightning itself brings scipy.signal and matplotlib, through torchmetrics).
    assert "normbench.cli" in imported and "normbench.module" in imported and "normbench.recorder" in imported
    unused = ("normbench.report", "normbench.sweep", "normbench.backends", "normbench.runner", "normbench.grid", "normbench.bench",
              "normbench.pack", "normbench.workers", "statsmodels", "ray", "pandas")  # fmt: skip
    assert [m for m in imported if m.split(".")[0] in unused or m.startswith(unused)] == []


def test_the_commands_a_bare_normbench_names_are_the_command_tables():
    from normbench.cli import SUBCOMMANDS
    from normbench.errors import COMMANDS
    from normbench.main import COMMANDS as OWN

    assert COMMANDS == (*SUBCOMMANDS, *OWN)
