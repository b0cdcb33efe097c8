"""Diagnostics: the tags they write, the numbers behind them, and that training is untouched."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from quick_configs import mnist_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from normbench.callbacks import NormDiagnostics
from normbench.main import main
from normbench.module import NormBenchModule

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
LAYERS = [f"blocks.{i}.norm" for i in range(4)]


def run_args(data_dir, root, norm, *extra):
    """``normbench fit`` of study 2's quick MNIST config, half as wide (the figures checked do not
    depend on the width), 2 epochs of 3 steps."""
    return [
        "fit", "--config", mnist_config("brn", 16), "--model.norm", norm, "--model.width", "32",
        "--data.data_dir", str(data_dir), "--data.download", "false", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "2", "--trainer.accelerator", "cpu", *QUIET, *extra,
    ]  # fmt: skip


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


EXPECTED = {
    "bn": {"running", "gap", "grad", "train_eval"},
    "brn": {"running", "gap", "grad", "train_eval", "brn"},
    "bnrs": {"running", "gap", "grad", "train_eval"},
    "ghost_bn": {"running", "gap", "grad", "train_eval"},
    "evonorm_b0": {"running", "gap", "grad", "train_eval"},
    "gn": {"grad"},
    "frn": {"grad"},
    "none": {"grad"},
}


@pytest.mark.parametrize("norm", sorted(EXPECTED))
def test_each_norm_family_writes_its_tags(norm, norm_run):
    run = norm_run(norm)  # one fit per norm, shared with test_cli
    acc = events(run)
    scalars, hists = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    families = {
        "running": {f"running_stats/{n}/{s}" for n in LAYERS for s in ("mean", "var")},
        "gap": {f"batch_vs_running/{n}/{s}" for n in LAYERS for s in ("mean_gap", "std_ratio")},
        "brn": {f"brn/{n}/{s}" for n in LAYERS for s in ("r_max", "d_max", "r_clip_fraction", "d_clip_fraction")},
        "grad": {f"grad/block_{i}" for i in range(4)} | {"grad/last_over_first"},
        "train_eval": {"train_eval/val_acc_batch_stats", "train_eval/val_acc_precise_bn"},
    }
    for family, tags in families.items():
        if family in EXPECTED[norm]:
            assert tags <= scalars, (family, tags - scalars)
        else:
            assert not tags & scalars, (family, tags & scalars)
    if "running" in EXPECTED[norm]:
        assert {f"running_stats/{n}/running_mean" for n in LAYERS} <= hists
    # The HParams tab has this run with its figures.
    assert "hparams" in acc.PluginTagToContent("hparams") or acc.PluginTagToContent("hparams")
    assert {"hparams/val_acc_final", "hparams/val_acc_best"} <= scalars
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "finished" and [e["epoch"] for e in record["epochs"]] == [0, 1]
    assert record["val_acc_best"] == max(e["val/acc"] for e in record["epochs"])
    assert record["val_acc_final"] == record["epochs"][-1]["val/acc"]
    assert ("val_acc_precise_bn" in record) == ("train_eval" in EXPECTED[norm])


# brn, whose diagnostics touch the most (its r/d clip figures besides the running statistics), in
# the default suite; bn and ghost_bn with -m slow (3 s each on 2 cores).
@pytest.mark.parametrize("norm", [pytest.param("bn", marks=pytest.mark.slow), "brn",
                                  pytest.param("ghost_bn", marks=pytest.mark.slow)])  # fmt: skip
def test_diagnostics_do_not_change_training(norm, fake_data, tmp_path):
    # Every step logged, batch-statistics evaluation and PreciseBN on: the most they can touch.
    loud = ["--trainer.callbacks.init_args.every_n_steps", "1"]
    main(run_args(fake_data, tmp_path / "with", norm, *loud, "--name", "run"))
    main(run_args(fake_data, tmp_path / "without", norm, "--trainer.callbacks", "[]", "--name", "run"))
    with_ = torch.load(tmp_path / "with/lightning_logs/run/version_0/checkpoints/last.ckpt", weights_only=False)
    without = torch.load(tmp_path / "without/lightning_logs/run/version_0/checkpoints/last.ckpt", weights_only=False)
    logged = {
        k: set(events(tmp_path / k / "lightning_logs/run/version_0").Tags()["scalars"]) for k in ("with", "without")
    }
    assert "grad/block_0" in logged["with"] and "train_eval/val_acc_batch_stats" in logged["with"]
    assert not any(t.startswith(("grad/", "train_eval/")) for t in logged["without"])
    assert with_["state_dict"].keys() == without["state_dict"].keys()
    for key, value in with_["state_dict"].items():
        assert torch.equal(value, without["state_dict"][key]), key
    for a, b in zip(with_["optimizer_states"][0]["state"].values(), without["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_logged_figures_equal_an_independent_computation(tmp_path):
    torch.manual_seed(0)
    brn = {"r_max": 1.5, "d_max": 0.05, "warmup_steps": 0, "r_max_ramp_steps": 0, "d_max_ramp_steps": 0}
    module = NormBenchModule(norm="brn", norm_kwargs=brn, width=8, num_blocks=3, num_classes=10, in_channels=1)
    x, y = torch.randn(16, 1, 12, 12) * 2 + 0.5, torch.randint(0, 10, (16,))
    twin = copy.deepcopy(module)

    trainer = L.Trainer(
        max_steps=1, logger=TensorBoardLogger(tmp_path, name="fixed"), accelerator="cpu", limit_val_batches=0,
        callbacks=[NormDiagnostics(every_n_steps=1, batch_stats_eval=False, precise_bn_images=0)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    logged = {
        t: events(tmp_path / "fixed" / "version_0").Scalars(t)[0].value
        for t in events(tmp_path / "fixed" / "version_0").Tags()["scalars"]
    }

    # Independent: the same model by hand, the norms' inputs stored, formulas in plain torch.
    inputs = {}
    for i, block in enumerate(twin.net.blocks):
        block.norm.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach().clone()))
    running = {i: (b.norm.running_mean.clone(), b.norm.running_var.clone()) for i, b in enumerate(twin.net.blocks)}
    F.cross_entropy(twin(x), y).backward()
    for i, block in enumerate(twin.net.blocks):
        h, (mu, var) = inputs[i], running[i]
        mu_b, var_b = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        sigma = (var + 1e-5).sqrt()
        d, r = (mu_b - mu) / sigma, (var_b + 1e-5).sqrt() / sigma
        name = f"blocks.{i}.norm"
        assert logged[f"batch_vs_running/{name}/mean_gap"] == pytest.approx(d.abs().mean().item(), rel=1e-5)
        assert logged[f"batch_vs_running/{name}/std_ratio"] == pytest.approx(r.mean().item(), rel=1e-5)
        clipped_r = sum(1 for v in r.tolist() if v > 1.5 or v < 1 / 1.5) / len(r)
        clipped_d = sum(1 for v in d.tolist() if abs(v) > 0.05) / len(d)
        assert logged[f"brn/{name}/r_clip_fraction"] == pytest.approx(clipped_r)
        assert logged[f"brn/{name}/d_clip_fraction"] == pytest.approx(clipped_d)
        assert logged[f"brn/{name}/r_max"] == 1.5 and logged[f"brn/{name}/d_max"] == pytest.approx(0.05)
    # Clipping really happened, so the fractions are not trivially 0.
    assert 0 < sum(logged[f"brn/blocks.{i}.norm/d_clip_fraction"] for i in range(3)) < 3
    assert 0 < sum(logged[f"brn/blocks.{i}.norm/r_clip_fraction"] for i in range(3)) < 3
    grads = [b.conv.weight.grad.abs().mean().item() for b in twin.net.blocks]
    for i, g in enumerate(grads):
        assert logged[f"grad/block_{i}"] == pytest.approx(g, rel=1e-5)
    assert logged["grad/last_over_first"] == pytest.approx(grads[-1] / grads[0], rel=1e-5)


def test_hooks_are_removed_after_fit(fake_data, tmp_path):
    from normbench.cli import NormBenchCLI

    cli = NormBenchCLI(args=run_args(fake_data, tmp_path, "bn")[1:], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not any(m._forward_pre_hooks for m in cli.model.modules())
    assert all(m.training for m in cli.model.modules())  # modes as Lightning left them


# --------------------------------------------------------------------------- the subset they measure on


class _Fixed(L.LightningDataModule):
    """Unshuffled in-memory batches, so a test can redo exactly what the callback sees."""

    def __init__(self, train, val, batch_size: int, eval_batch_size: int) -> None:
        super().__init__()
        self.train, self.val, self.batch_size, self.eval_batch_size = train, val, batch_size, eval_batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(*self.train), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.val), batch_size=self.eval_batch_size)


def _fit_with(diagnostics: NormDiagnostics, tmp_path, epochs: int = 1, precision: str = "32-true", dtypes=None):
    """A fit with ``diagnostics``; ``dtypes`` (a list) collects the dtype of the first conv's
    output at every forward of the network or of a copy of it, diagnostics' own included."""
    torch.manual_seed(0)
    module = NormBenchModule(norm="bn", width=8, num_blocks=2, num_classes=3, in_channels=1)
    if dtypes is not None:
        module.net.conv1.register_forward_hook(lambda _, __, out: dtypes.append(out.dtype))
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g))
    val = (torch.randn(40, 1, 8, 8, generator=g) * 3, torch.randint(0, 3, (40,), generator=g))
    dm = _Fixed(train, val, batch_size=8, eval_batch_size=4)
    trainer = L.Trainer(
        max_epochs=epochs, logger=TensorBoardLogger(tmp_path, name="subset"), accelerator="cpu",
        callbacks=[diagnostics], num_sanity_val_steps=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, precision=precision,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    if dtypes is not None:
        module.net.conv1._forward_hooks.clear()
    return trainer, module, dm


# Each precision: the dtype the network computes in, and whether under autocast (-mixed).
PRECISIONS = {"32-true": (torch.float32, False), "bf16-mixed": (torch.bfloat16, True),
              "bf16-true": (torch.bfloat16, False), "64-true": (torch.float64, False)}  # fmt: skip


def _accuracy(net, batches, precision: str = "32-true") -> float:
    dtype, mixed = PRECISIONS[precision]
    correct = total = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        for x, y in batches:
            correct += (net(x if mixed else x.to(dtype)).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


# The diagnostics run in the run's precision, as its validation does (bf16-mixed: under
# autocast; bf16-true, 64-true: their inputs in the weights' dtype), so that their accuracies
# compare with val/acc; every forward of the network, theirs included, puts out that dtype.
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_batch_statistics_accuracy_is_on_the_first_eval_images(precision, tmp_path):
    dtypes: list[torch.dtype] = []
    diagnostics = NormDiagnostics(eval_images=10, precise_bn_images=0)
    trainer, module, dm = _fit_with(diagnostics, tmp_path, precision=precision, dtypes=dtypes)
    assert set(dtypes) == {PRECISIONS[precision][0]}, dtypes
    logged = trainer.callback_metrics["train_eval/val_acc_batch_stats"].item()
    # By hand: the network in training mode, each evaluation batch normalized by its own
    # statistics; 10 images in batches of 4 are the first 3 batches (12 images).
    net = copy.deepcopy(module.net).train()
    x, y = dm.val
    first = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    every = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 40, 4)]
    assert logged == pytest.approx(_accuracy(net, first, precision), abs=1e-6)
    # The subset is not the whole set.
    assert _accuracy(net, first, precision) != pytest.approx(_accuracy(net, every, precision))
    assert trainer.callback_metrics["val/acc"].item() == pytest.approx(_accuracy(module.net.eval(), every, precision))


def test_batch_statistics_accuracy_every_kth_validation(tmp_path):
    _fit_with(NormDiagnostics(batch_stats_every=2, precise_bn_images=0), tmp_path, epochs=3)
    acc = events(tmp_path / "subset" / "version_0")
    every = [e.step for e in acc.Scalars("val/acc")]
    assert len(every) == 3
    assert [e.step for e in acc.Scalars("train_eval/val_acc_batch_stats")] == [every[0], every[2]]


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_precise_bn_accuracy_is_exact_on_its_stated_subsets(precision, tmp_path):
    dtypes: list[torch.dtype] = []
    diagnostics = NormDiagnostics(eval_images=6, precise_bn_images=12, batch_stats_eval=False)
    trainer, module, dm = _fit_with(diagnostics, tmp_path, precision=precision, dtypes=dtypes)
    assert set(dtypes) == {PRECISIONS[precision][0]}, dtypes
    logged = trainer.callback_metrics["train_eval/val_acc_precise_bn"].item()
    # By hand: the population mean and unbiased variance of every norm's inputs over the first
    # 12 training images in training batches of 8 (2 batches: 16 images), then the first 6
    # validation images in batches of 4 (8 images) with those statistics.
    assert logged == pytest.approx(_precise_bn_by_hand(module, dm, 16, precision), abs=1e-6)


def _precise_bn_by_hand(module, dm, images: int, precision: str = "32-true", val_images: int = 8, stats=None) -> float:
    """Accuracy on the first ``val_images`` validation images (batches of 4) of a copy of
    ``module.net`` whose norms hold the population mean and unbiased variance of their inputs
    over the first ``images`` training images, fed in training batches of 8; ``stats`` (a list)
    gets each norm's running mean."""
    net = copy.deepcopy(module.net).train()
    norms = [b.norm for b in net.blocks]
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(norms))}
    for i, m in enumerate(norms):
        m.register_forward_pre_hook(lambda _, a, i=i: seen[i].append(a[0].detach().double()))
    x = dm.train[0]
    dtype, mixed = PRECISIONS[precision]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        for j in range(0, images, 8):
            net(x[j : j + 8] if mixed else x[j : j + 8].to(dtype))
    for i, m in enumerate(norms):
        h = torch.cat(seen[i]).transpose(0, 1).reshape(m.num_features, -1)
        m.running_mean.copy_(h.mean(1))
        m.running_var.copy_(h.var(1, unbiased=True))
    if stats is not None:
        stats += [m.running_mean.clone() for m in norms]
    xv, yv = dm.val
    return _accuracy(net.eval(), [(xv[j : j + 4], yv[j : j + 4]) for j in range(0, val_images, 4)], precision)


def test_precise_bn_at_several_image_counts_recalibrates_a_fresh_copy_for_each(tmp_path, monkeypatch):
    import normbench.diagnostics.train_eval as callbacks

    recalibrated = []  # each PreciseBN pass's running means, as it left its copy of the network

    def spy(net, *args, **kwargs):
        used = update_bn_stats(net, *args, **kwargs)
        recalibrated.append([m.running_mean.clone() for m in net.modules() if hasattr(m, "running_mean")])
        return used

    update_bn_stats = callbacks.update_bn_stats
    monkeypatch.setattr(callbacks, "update_bn_stats", spy)
    diagnostics = NormDiagnostics(eval_images=None, precise_bn_images=[24, 8], batch_stats_eval=False)
    trainer, module, dm = _fit_with(diagnostics, tmp_path)
    metrics = trainer.callback_metrics
    stats = {8: [], 24: []}
    by_hand = {n: _precise_bn_by_hand(module, dm, n, val_images=40, stats=stats[n]) for n in (8, 24)}
    # Smallest count first, each on a fresh copy: its statistics are those of its own images alone.
    assert len(recalibrated) == 2
    for got, n in zip(recalibrated, (8, 24)):
        for a, b in zip(got, stats[n], strict=True):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stats[8][0], stats[24][0])  # the two counts' statistics differ
    for count, acc in by_hand.items():
        assert metrics[f"train_eval/val_acc_precise_bn_{count}"].item() == pytest.approx(acc, abs=1e-6)
        assert diagnostics.precise_bn_by_images[count] == pytest.approx(acc, abs=1e-6)
    # The largest count is the run's PreciseBN figure; the record keeps every count.
    assert metrics["train_eval/val_acc_precise_bn"].item() == pytest.approx(by_hand[24], abs=1e-6)
    assert diagnostics.record()["precise_bn_by_images"] == {"8": pytest.approx(by_hand[8], abs=1e-6),
                                                            "24": pytest.approx(by_hand[24], abs=1e-6)}  # fmt: skip
    acc = events(tmp_path / "subset" / "version_0")
    assert {"train_eval/val_acc_precise_bn_8", "train_eval/val_acc_precise_bn_24"} <= set(acc.Tags()["scalars"])


def test_diagnostics_state_their_time_and_subset_in_the_run_record(fake_data, tmp_path):
    main(run_args(fake_data, tmp_path, "bn", "--trainer.callbacks.init_args.eval_images", "64"))
    record = json.loads((tmp_path / "lightning_logs/mnist_bn_bs16/version_0/metrics.json").read_text())
    diagnostics = record["diagnostics"]
    assert diagnostics["eval_images"] == 64 and diagnostics["precise_bn_images"] == 512
    assert 0 < diagnostics["seconds"] < record["wall_time_s"]


@pytest.mark.parametrize("option", ["every_n_steps=0", "batch_stats_every=0", "eval_images=0", "precise_bn_images=-1",
                                    "precise_bn_images=[256, 0]", "precise_bn_images=[]"])  # fmt: skip
def test_bad_diagnostics_options_are_one_line_errors(option):
    name, value = option.split("=")
    bad = yaml.safe_load(value)
    shown = f"0 in {bad}" if bad and isinstance(bad, list) else value
    with pytest.raises(ValueError) as info:
        NormDiagnostics(**{name: bad})
    # The option, the value given, and what it takes, where the command line sets it.
    assert str(info.value).startswith(f"{name} must be "), info.value
    assert f", got {shown}; set --trainer.callbacks.init_args.{name} to " in str(info.value), info.value
    assert "\n" not in str(info.value)


def test_end_of_run_figures_are_means_over_the_last_epochs_steps(tmp_path):
    # 3 epochs of 3 steps, a capture at every step: the record's figures are the means of the
    # logged figures of the last epoch's steps (6, 7, 8), not of the whole run.
    torch.manual_seed(0)
    module = NormBenchModule(norm="bn", width=8, num_blocks=3, num_classes=3, in_channels=1)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g))
    diagnostics = NormDiagnostics(every_n_steps=1, batch_stats_eval=False, precise_bn_images=0)
    trainer = L.Trainer(
        max_epochs=3, logger=TensorBoardLogger(tmp_path, name="end"), accelerator="cpu", limit_val_batches=0,
        callbacks=[diagnostics], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8))
    acc = events(tmp_path / "end" / "version_0")

    def last_epoch_mean(tag: str) -> float:
        values = [e.value for e in acc.Scalars(tag) if e.step >= 6]
        assert len(values) == 3, tag
        return sum(values) / 3

    end = diagnostics.record()["end_of_run"]
    assert end["epoch"] == 2 and end["captures"] == 3
    assert list(end["batch_vs_running"]) == ["blocks.0.norm", "blocks.1.norm", "blocks.2.norm"]
    for name, figures in end["batch_vs_running"].items():
        for key in ("mean_gap", "std_ratio"):
            assert figures[key] == pytest.approx(last_epoch_mean(f"batch_vs_running/{name}/{key}"), rel=1e-5)
    grads = [last_epoch_mean(f"grad/block_{i}") for i in range(3)]
    assert end["grad_per_block"] == pytest.approx(grads, rel=1e-5)
    assert end["grad_last_over_first"] == pytest.approx(grads[2] / grads[0], rel=1e-5)
    whole_run = [e.value for e in acc.Scalars("grad/block_0")]
    assert sum(whole_run) / len(whole_run) != pytest.approx(grads[0], rel=1e-3)  # the last epoch, not all
