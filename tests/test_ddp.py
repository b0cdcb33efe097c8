"""Several devices mean the same experiment as one: two gloo processes on CPU against one
process and against independent computations on the same images and weights.

One run trains on 2 processes of 4 images (a global batch of 8, norms synced) on fake MNIST
with 501 test images, which do not split evenly over 2 ranks. Its validation figures, its
diagnostics and a ``normbench test`` on 2 processes are compared with the same figures
computed on one device from its checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import fakedata
import pytest
import torch
import torch.nn.functional as F
import yaml
from quick_configs import mnist_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torchvision import datasets

from normbench.data import MNISTDataModule
from normbench.main import main
from normbench.module import NormBenchModule

TESTS = Path(__file__).resolve().parent
# Each fit opens a TCP port for its process group: one at a time in a parallel run (pyproject.toml).
pytestmark = pytest.mark.xdist_group("ports")
N_TRAIN, N_TEST = 96, 501
PER_DEVICE, WORLD = 4, 2
EVAL_IMAGES, PRECISE_IMAGES = 100, 40
EVAL_BATCH = 32  # the CPU's evaluation batch size
WIDTH = 8  # study 2's network, narrower: the processes' start dominates, not their arithmetic
LOG_EVERY = 4  # the fit's train_loss_steps: steps 0, 4 and 8
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    return ["--config", mnist_config("bn", 16), "--data.data_dir", str(data_dir), "--data.download", "false",
            "--data.num_workers", "0", "--data.batch_size", str(PER_DEVICE), "--trainer.accelerator", "cpu",
            "--model.width", str(WIDTH), "--trainer.default_root_dir", str(root), *QUIET, *extra]  # fmt: skip


def _ddp(sub: str, data_dir: Path, root: Path, *extra: str) -> None:
    """``normbench SUB`` on 2 processes; what it printed is left in ``root/SUB.out``."""
    # ddp_fork: the second rank is a fork of the first, which imports torch and Lightning once
    # (5 s less); the sweep above runs Lightning's default launcher.
    cmd = [sys.executable, "-m", "normbench", sub, *_args(data_dir, root, "--trainer.devices", str(WORLD),
           "--trainer.strategy", "ddp_fork", *extra)]  # fmt: skip
    done = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    (root / f"{sub}.out").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_data")
    fakedata.write_mnist(root, "MNIST", n_train=N_TRAIN, n_test=N_TEST, seed=3)
    return root


def _diagnostics(root: Path) -> list[dict]:
    """The runs' callbacks: NormDiagnostics on a subset, and each rank's norm buffers saved."""
    return [{"class_path": "normbench.callbacks.NormDiagnostics",
             "init_args": {"eval_images": EVAL_IMAGES, "precise_bn_images": PRECISE_IMAGES}},
            {"class_path": "ddp_probe.SaveNormBuffers", "init_args": {"out_dir": str(root)}}]  # fmt: skip


def _ddp_sweep(data_dir: Path, root: Path, seeds: tuple[int, ...]) -> Path:
    """A sweep over ``seeds``, run as a user runs it (``normbench sweep`` in a shell), each run
    one epoch on 2 processes of 4 images with norms synced, with Lightning's own DDP launcher
    (``strategy: ddp``), which starts the other rank by running the run's command again.
    Returns the sweep's directory."""
    overrides = {
        "data.data_dir": str(data_dir), "data.download": False, "data.num_workers": 0, "data.batch_size": PER_DEVICE,
        "model.width": WIDTH,
        "trainer.accelerator": "cpu", "trainer.devices": WORLD, "trainer.strategy": "ddp", "trainer.max_epochs": 1,
        "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
        "trainer.callbacks": _diagnostics(root),
    }  # fmt: skip
    config = root / "ddp.yaml"
    config.write_text(yaml.safe_dump({"base": mnist_config("bn", 16), "overrides": overrides,
                                      "grid": {"seed_everything": list(seeds)}}))  # fmt: skip
    cmd = [sys.executable, "-m", "normbench", "sweep", "--config", str(config), "--output", str(root)]
    done = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "sweep.err").write_text(done.stderr)
    return root / "ddp"


def _check_every_run_once(sweep_dir: Path, seeds: tuple[int, ...]) -> None:
    runs = sorted((sweep_dir / "lightning_logs").glob("*/*"))
    # Nothing else ran: no rank of a run re-ran the sweep and took another run (or a new version).
    assert [f"{r.parent.name}/{r.name}" for r in runs] == [f"seed{s}/version_0" for s in seeds]
    for seed, run in zip(seeds, runs, strict=True):
        record = _record(run)
        assert record["status"] == "finished", (seed, record.get("error"))
        assert len(record["attempts"]) == 1 and not record["attempts"][0]["resumed"], record["attempts"]
        assert record["seed"] == record["config"]["seed_everything"] == seed
        assert record["layout"]["world_size"] == WORLD and record["layout"]["global_batch_size"] == PER_DEVICE * WORLD
        # One epoch of 96 images in global batches of 8.
        assert record["global_step"] == N_TRAIN // (PER_DEVICE * WORLD) and len(record["epochs"]) == 1
    _same_norm_statistics_on_every_rank(sweep_dir.parent)


def _same_norm_statistics_on_every_rank(root: Path) -> None:
    """The synced ranks ended with the same norm statistics (the last run's, saved per rank)."""
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0] and ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], msg=key)


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory) -> Path:
    """One fit on 2 processes, one epoch of 4 images each, norms synced, with NormDiagnostics;
    the tests below check it. ``ddp_fork`` (one interpreter, 7 s less than Lightning's launcher
    of a process per rank); the sweeps' runs with that launcher are checked with -m slow.
    Returns the run's directory."""
    root = tmp_path_factory.mktemp("ddp_run")
    losses = {"class_path": "ddp_probe.SaveStepLosses", "init_args": {"out_dir": str(root)}}
    _ddp("fit", data_dir, root, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", str(LOG_EVERY),
         "--trainer.callbacks", json.dumps([*_diagnostics(root), losses]))  # fmt: skip
    (run,) = (root / "lightning_logs").glob("*/version_0")
    return run


def test_a_fit_on_two_processes_trains_one_devices_steps_with_synced_statistics(ddp_run):
    record = _record(ddp_run)
    assert record["status"] == "finished" and record["config"]["trainer"]["strategy"] == "ddp_fork"
    # One epoch of 96 images in global batches of 8.
    assert record["global_step"] == N_TRAIN // (PER_DEVICE * WORLD) and len(record["epochs"]) == 1
    _same_norm_statistics_on_every_rank(ddp_run.parents[2])


def test_the_recorded_training_losses_are_the_global_batchs(ddp_run):
    """train_loss_steps (study 1's training-loss curve, and TensorBoard's train/loss_step) holds
    the loss one device takes on the global batch: the mean of the ranks' losses on their
    shares, not rank zero's share alone (a batch half as large, twice as noisy)."""
    root = ddp_run.parents[2]
    ranks = [dict(json.loads((root / f"losses_rank{r}.json").read_text())) for r in range(WORLD)]
    recorded = _record(ddp_run)["train_loss_steps"]
    assert [s for s, _ in recorded] == list(range(0, N_TRAIN // (PER_DEVICE * WORLD), LOG_EVERY))
    for step, loss in recorded:
        shares = [r[step] for r in ranks]
        assert loss == pytest.approx(sum(shares) / WORLD, abs=1e-6), (step, shares)
    assert any(abs(loss - ranks[0][step]) > 1e-3 for step, loss in recorded)


def test_a_run_diverges_at_the_step_one_device_does(data_dir, tmp_path):
    """A loss that becomes NaN on one rank's share of a global batch makes that batch's loss
    NaN: the run is recorded as diverged at that step, as one device records it, whichever rank
    saw it and whenever the ranks compare (every 3 steps here), not at the step rank zero's own
    share became NaN (the next one, once the NaN gradients were averaged into the weights)."""
    nan = ["--trainer.callbacks+=ddp_probe.NaNInSecondHalf", "--trainer.callbacks.step=2", "--model.norm", "gn",
           "--model.norm_kwargs", '{"num_groups": 4}', "--model.check_finite_every_n_steps", "3"]  # fmt: skip
    (tmp_path / "two").mkdir()
    _ddp("fit", data_dir, tmp_path / "two", *nan)
    main(["fit", *_args(data_dir, tmp_path / "one", "--data.batch_size", str(PER_DEVICE * WORLD), *nan)])
    two, one = (_record(next((tmp_path / n / "lightning_logs").glob("*/version_0"))) for n in ("two", "one"))
    assert one["status"] == two["status"] == "diverged"
    assert one["diverged_at_step"] == two["diverged_at_step"] == 2


def test_a_fit_on_two_processes_prints_no_advice_to_reduce_what_one_rank_measures(ddp_run):
    """The diagnostics that rank zero alone measures (on one device's images, the figure of
    every rank) are logged without Lightning's warning to reduce epoch-level figures over the
    processes, which users would read as a figure left unreduced."""
    printed = (ddp_run.parents[2] / "fit.out").read_text()
    assert "train_eval/val_acc_batch_stats" in json.dumps(_record(ddp_run)["epochs"])
    assert "when logging on epoch level in distributed setting" not in printed, printed[-2000:]


def test_a_fit_prints_no_warning_from_inside_lightning(ddp_run):
    """A fit as typed in a shell (``python -m normbench fit``, its second rank forked from the
    first) prints none of the warnings Lightning raises about torch API it calls itself."""
    printed = (ddp_run.parents[2] / "fit.out").read_text()
    assert "`Trainer.fit` stopped" in printed  # the output is the fit's
    assert "LeafSpec" not in printed, printed[-2000:]


# Slow (40 s: each run starts two processes that import torch and Lightning). The fit above
# checks a multi-device run's training and record in the default suite.
@pytest.mark.slow
def test_a_sweep_of_three_multi_device_runs_runs_each_once(data_dir, tmp_path):
    seeds = (0, 1, 2)
    sweep_dir = _ddp_sweep(data_dir, tmp_path, seeds)
    _check_every_run_once(sweep_dir, seeds)
    # What each run's process group printed is in the run's log, not among the sweep's lines.
    said = (tmp_path / "sweep.err").read_text()
    assert [line.split("] ")[1].split(":")[0] for line in said.splitlines() if line.startswith("sweep: [")] == [
        f"seed{s} finished" for s in seeds
    ]
    assert "`Trainer.fit` stopped" not in said, said[-2000:]
    for seed in seeds:
        log = (sweep_dir / "logs" / f"seed{seed}.log").read_text()
        assert log.count("`Trainer.fit` stopped") == 1 and "LeafSpec" not in log, log[-2000:]


def test_run_names_say_the_global_batch_and_the_layout(data_dir, tmp_path):
    from normbench.cli import NormBenchCLI

    for devices, name in ((1, "mnist_bn_bs4"), (WORLD, "mnist_bn_bs8_2x4")):
        cli = NormBenchCLI(args=_args(data_dir, tmp_path, "--trainer.devices", str(devices), "--trainer.strategy",
                                      "ddp"), run=False)  # fmt: skip
        assert cli.trainer.logger.name == name


def _record(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _trained(run: Path) -> NormBenchModule:
    """The run's network at its end, from its last checkpoint, on one process."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}  # LightningCLI's own
    model = NormBenchModule(**hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model


def _test_images(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as torchvision reads it, Normalize(0.5, 0.5) as study 2's configs."""
    test = datasets.MNIST(str(data_dir), train=False, download=False)
    return (test.data.unsqueeze(1).float() / 255 - 0.5) / 0.5, test.targets


def test_validation_on_two_processes_equals_one_device_on_the_same_images(ddp_run, data_dir):
    last = _record(ddp_run)["epochs"][-1]
    net = _trained(ddp_run).net.eval()
    x, y = _test_images(data_dir)
    with torch.no_grad():
        logits = net(x)
    # Every one of the 501 images exactly once: no padded duplicate on the shorter shard.
    assert last["val/acc"] * N_TEST == pytest.approx(round(last["val/acc"] * N_TEST), abs=1e-4)
    assert last["val/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert last["val/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)


# `normbench test` on 2 processes (5 s: two more interpreters); with -m slow. The validation on
# two processes above checks the same unpadded sharding in the default suite.
@pytest.mark.slow
def test_test_on_two_processes_equals_one_process(ddp_run, data_dir, tmp_path):
    ckpt = str(ddp_run / "checkpoints" / "last.ckpt")
    probe = ["--trainer.callbacks+=ddp_probe.SaveTestMetrics", f"--trainer.callbacks.out_dir={tmp_path}"]
    _ddp("test", data_dir, tmp_path, "--ckpt_path", ckpt, *probe)
    main(["test", *_args(data_dir, tmp_path, "--ckpt_path", ckpt, *probe)])
    two, one = (json.loads((tmp_path / f"test_metrics_{n}.json").read_text()) for n in (WORLD, 1))
    assert two["test/acc"] == pytest.approx(one["test/acc"], abs=1e-6)
    assert two["test/loss"] == pytest.approx(one["test/loss"], abs=1e-6)
    x, y = _test_images(data_dir)
    with torch.no_grad():
        logits = _trained(ddp_run).net.eval()(x)
    assert one["test/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)


def _pooled_statistics(net, batches) -> None:
    """PreciseBN by hand: each norm's running statistics become the mean and unbiased variance
    of all its inputs over ``batches``, the network in training mode."""
    norms = [b.norm for b in net.blocks]
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(norms))}
    hooks = [m.register_forward_pre_hook(lambda _, a, i=i: seen[i].append(a[0].detach().double()))
             for i, m in enumerate(norms)]  # fmt: skip
    net.train()
    with torch.no_grad():
        for x, _ in batches:
            net(x)
    for h in hooks:
        h.remove()
    for i, m in enumerate(norms):
        h = torch.cat(seen[i]).transpose(0, 1).reshape(m.num_features, -1)
        m.running_mean.copy_(h.mean(1))
        m.running_var.copy_(h.var(1, unbiased=True))


def test_diagnostics_on_two_processes_use_one_devices_subsets(ddp_run, data_dir):
    record = _record(ddp_run)
    # Whole evaluation batches of 32 cover the first 100 images; PreciseBN's batches are the 8
    # images one synced batch statistic covered in training: 5 of them for 40 images.
    assert record["diagnostics"]["measured"] == {
        "batch_stats_images": 128, "precise_bn_train_images": 40, "precise_bn_batch_size": 8,
        "precise_bn_val_images": 128, "val_images": N_TEST,
    }  # fmt: skip
    x, y = _test_images(data_dir)
    first = [(x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH]) for i in range(0, 128, EVAL_BATCH)]
    trained = _trained(ddp_run).net

    # Batch statistics: each evaluation batch normalized by its own moments, from the trained state.
    correct = 0
    with torch.no_grad():
        for xb, yb in first:
            correct += int((copy.deepcopy(trained).train()(xb).argmax(1) == yb).sum())
    assert record["evals"][-1]["train_eval/val_acc_batch_stats"] == pytest.approx(correct / 128, abs=1e-6)

    # PreciseBN: the first 40 training images of one device's order (a loader with no trainer,
    # the run's seed), in batches of 8, then the first 128 test images.
    torch.manual_seed(record["seed"])
    dm = MNISTDataModule(str(data_dir), download=False, batch_size=8, num_workers=0)
    dm.setup("fit")
    train = list(dm.train_dataloader())[:5]
    net = copy.deepcopy(trained)
    _pooled_statistics(net, train)
    with torch.no_grad():
        correct = sum(int((net.eval()(xb).argmax(1) == yb).sum()) for xb, yb in first)
    assert record["val_acc_precise_bn"] == pytest.approx(correct / 128, abs=1e-6)


def test_the_record_and_the_hparams_say_what_the_batch_was(ddp_run):
    layout = {"devices": 2, "num_nodes": 1, "world_size": 2, "batch_size_per_device": 4, "global_batch_size": 8,
              "accumulate_grad_batches": 1, "norm_stats_images": 8, "norm_stats_scope": "all devices",
              "train_images_padded": 0}  # fmt: skip
    assert _record(ddp_run)["layout"] == layout
    assert _hparams(ddp_run)["layout/global_batch_size"] == 8 and _hparams(ddp_run)["layout/world_size"] == 2


def _hparams(run: Path) -> dict:
    """The HPARAMS tab's settings of a run, read from its event file."""
    acc = EventAccumulator(str(run))
    acc.Reload()
    values = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = HParamsPluginData.FromString(content)
        for name, value in data.session_start_info.hparams.items():
            values[name] = value.number_value if value.HasField("number_value") else value.string_value
    return values
