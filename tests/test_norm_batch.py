"""The normalization batch apart from the SGD batch (``model.norm_batch``): each norm against
an independent computation on its groups, the loader's shards against one device's batch, the
one-line errors, and 2 gloo processes against one process."""

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
from quick_configs import mnist_config
from torch import nn

from normbench.loaders import InMemoryLoader
from normbench.main import main
from normbench.norms import NormBatch, create_norm, update_bn_stats

C = 5


def sample(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2 + 0.7


def _affine(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    return layer


def _step(layer, x, up):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * up).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("norm_batch", [2, 3, 4])
def test_bn_in_norm_batches_is_ghost_batchnorm(norm_batch):
    # Hoffer et al.'s ghost batches (ghost_bn, its own implementation) are BN over groups of
    # virtual_batch_size, with one running-statistics update per group.
    ours = NormBatch(_affine(create_norm("bn", C)), norm_batch).train()
    ghost = _affine(create_norm("ghost_bn", C, virtual_batch_size=norm_batch)).train()
    for step in range(3):
        x, up = sample(12, C, 3, 3, seed=step), sample(12, C, 3, 3, seed=10 + step)
        (y1, g1), (y2, g2) = _step(ours, x, up), _step(ghost, x, up)
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(ours.norm.weight.grad, ghost.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours.norm, name), getattr(ghost, name), msg=name)


def test_bnrs_in_norm_batches_normalizes_each_group_by_the_statistics_before_it():
    layer = NormBatch(_affine(create_norm("bnrs", C)), 4).train()
    x = sample(8, C, 2, 2)
    mean, var = torch.zeros(C), torch.ones(C)
    w, b = layer.norm.weight.detach(), layer.norm.bias.detach()
    expected = []
    for part in x.split(4):
        # By hand: normalize by the running statistics as they stand, then update them with the
        # group's mean and unbiased variance (momentum 0.1).
        expected.append((part - mean.view(1, C, 1, 1)) / (var.view(1, C, 1, 1) + 1e-5).sqrt() * w.view(1, C, 1, 1)
                        + b.view(1, C, 1, 1))  # fmt: skip
        dims = (0, 2, 3)
        mean = 0.9 * mean + 0.1 * part.mean(dims)
        var = 0.9 * var + 0.1 * part.var(dims, unbiased=True)
    torch.testing.assert_close(layer(x).detach(), torch.cat(expected))
    torch.testing.assert_close(layer.norm.running_mean, mean)
    torch.testing.assert_close(layer.norm.running_var, var)


def test_brn_in_norm_batches_opens_its_limits_by_training_steps_not_groups():
    # Ioffe 2017, Algorithm 1 per group of 2 images, by hand, with r_max and d_max scheduled by
    # the training step (Sec. 4): 1 and 0 for 2 steps, then linear ramps to 2 over 4 steps and
    # to 1 over 2. Counted per group (4 a step), the limits would be open from step 1.
    warmup, r_ramp, d_ramp, r_final, d_final = 2, 4, 2, 2.0, 1.0
    layer = NormBatch(_affine(create_norm("brn", C, r_max=r_final, d_max=d_final, warmup_steps=warmup,
                                          r_max_ramp_steps=r_ramp, d_max_ramp_steps=d_ramp)), 2).train()  # fmt: skip
    w, b = (p.detach().double().view(1, C, 1, 1) for p in (layer.norm.weight, layer.norm.bias))
    mean, var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    clipped = 0
    for step in range(8):
        r_max = 1 + (r_final - 1) * min(max((step - warmup) / r_ramp, 0), 1)
        d_max = d_final * min(max((step - warmup) / d_ramp, 0), 1)
        x = sample(8, C, 3, 3, seed=step) * (1 + step) + step  # statistics that outrun the averages
        expected = []
        for part in x.double().split(2):
            mu_b, var_b = part.mean((0, 2, 3)), part.var((0, 2, 3), unbiased=False)
            sigma_b, sigma = (var_b + 1e-5).sqrt(), (var + 1e-5).sqrt()
            r = (sigma_b / sigma).clamp(1 / r_max, r_max)
            d = ((mu_b - mean) / sigma).clamp(-d_max, d_max)
            clipped += int(((sigma_b / sigma - r).abs() > 1e-9).any())
            x_hat = (part - mu_b.view(1, C, 1, 1)) / sigma_b.view(1, C, 1, 1) * r.view(1, C, 1, 1) + d.view(1, C, 1, 1)
            expected.append(x_hat * w + b)
            mean, var = 0.9 * mean + 0.1 * mu_b, 0.9 * var + 0.1 * part.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(layer(x).detach().double(), torch.cat(expected), rtol=1e-4, atol=1e-4)
    assert clipped > 0  # the limits bound r on some steps: the schedule is what was compared
    assert layer.steps.item() == 8 and layer.norm.num_batches_tracked.item() == 32
    # PreciseBN's recalibration holds the schedule's step count where training left it.
    update_bn_stats(nn.Sequential(layer), [sample(2, C, 3, 3, seed=s) for s in range(3)], 3)
    assert layer.steps.item() == 8 and layer.norm.num_batches_tracked.item() == 32


@pytest.mark.parametrize("norm", ["bn", "bnrs", "brn"])
def test_out_of_training_the_whole_batch_goes_through_at_once(norm):
    layer = _affine(create_norm(norm, C))
    wrapped = NormBatch(copy.deepcopy(layer), 2).eval()
    x = sample(8, C, 3, 3)
    torch.testing.assert_close(wrapped(x), layer.eval()(x))
    # A diagnostic that switches the norm alone to training: the statistics of the whole batch.
    wrapped.norm.train()
    torch.testing.assert_close(wrapped(x), copy.deepcopy(layer).train()(x))


def test_a_training_step_on_two_ranks_holds_one_devices_batch_in_order():
    n, per_device, world = 22, 4, 2
    images, targets = torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n)
    one = InMemoryLoader(images, targets, per_device * world, True, (0.0,), (1.0,), seed=3)
    ranks = [InMemoryLoader(images, targets, per_device, True, (0.0,), (1.0,), seed=3, rank=r, world_size=world)
             for r in range(world)]  # fmt: skip
    steps = list(zip(*(list(r) for r in ranks), strict=True))
    assert len(steps) == len(one)
    for (_, y_one), parts in zip(one, steps, strict=True):
        assert torch.equal(torch.cat([y for _, y in parts]), y_one)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_augment_and_drop_the_last_batch_as_one_device(drop_last):
    # 23 images, global batches of 8 on 2 ranks of 4: with drop_last one device's 2 steps, not 3
    # (no padded image); the crops and flips of each image those of one device's, none shared
    # between the ranks. Without drop_last the last global batch holds one image twice.
    n, per_device, world = 23, 4, 2
    g = torch.Generator().manual_seed(0)
    images, targets = torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8), torch.arange(n)
    kw = {"shuffle": True, "mean": (0.0,), "std": (1.0,), "seed": 3, "augment": True, "padding": 2,
          "drop_last": drop_last}  # fmt: skip
    one = InMemoryLoader(images, targets, per_device * world, **kw)
    ranks = [InMemoryLoader(images, targets, per_device, rank=r, world_size=world, **kw) for r in range(world)]
    steps = list(zip(*(list(r) for r in ranks), strict=True))
    assert len(steps) == len(one) == (n // 8 if drop_last else -(-n // 8))
    for (x_one, y_one), parts in list(zip(one, steps, strict=True))[: n // 8]:
        assert torch.equal(torch.cat([y for _, y in parts]), y_one)
        torch.testing.assert_close(torch.cat([x for x, _ in parts]), x_one, rtol=0, atol=0)
    assert [r.epoch_order.padded_images() for r in ranks] == [0 if drop_last else 1] * world
    seen = torch.cat([y for parts in steps for _, y in parts]).tolist()
    if drop_last:
        assert len(seen) == len(set(seen)) == 16
    else:  # the 7 images left and one of the epoch's first again
        assert len(seen) == 24 and len(set(seen)) == 23 and len(torch.cat([y for _, y in steps[-1]])) == 8


def _one_line_error(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def test_a_norm_batch_that_does_not_divide_the_batch_or_fit_the_norm_is_one_line(capsys, fake_data, tmp_path):
    base = ["fit", "--config", mnist_config("bn", 16), "--data.data_dir", str(fake_data),
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    line = _one_line_error(capsys, [*base, "--model.norm_batch", "3"])
    assert "model.norm_batch=3 does not divide data.batch_size=16" in line and "use one of 1, 2, 4, 8, 16" in line
    line = _one_line_error(capsys, [*base, "--model.norm", "gn", "--model.norm_batch", "2"])
    assert "applies to the norms that normalize over the batch (bn, bnrs, brn), not to gn" in line
    # brn's groups on 2 processes would each update their own rank's statistics: refused.
    line = _one_line_error(capsys, [*base, "--model.norm", "brn", "--model.norm_batch", "2", "--trainer.devices", "2",
                                    "--trainer.accelerator", "cpu"])  # fmt: skip
    assert "model.norm_batch with brn trains on one device only (2 processes asked)" in line


def test_a_norm_batch_on_several_processes_keeps_its_statistics_synced(fake_data, tmp_path):
    # bn's ghost batches with sync_norms false on 2 processes: training normalizes as on one
    # device, but each rank's groups update only its own running statistics and DDP keeps rank
    # zero's, so the evaluations differ from one device's (val/acc 0.060 against 0.139 after 8
    # steps of the review's MNIST run) under the same record layout: refused, as for bnrs and brn.
    from normbench.cli import NormBenchCLI

    base = ["--config", mnist_config("bn", 16), "--data.data_dir", str(fake_data), "--data.batch_size", "8",
            "--model.norm_batch", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(ValueError, match="model.norm_batch with model.sync_norms=false on 2 processes"):
        NormBenchCLI(args=[*base, "--model.sync_norms", "false"], run=False)
    assert NormBenchCLI(args=base, run=False).trainer.world_size == 2  # synced: as one device


TESTS = Path(__file__).resolve().parent


def _fit(data_dir, root, per_device, devices, norm):
    cmd = [sys.executable, "-m", "normbench", "fit", "--config", mnist_config("bn", 16), "--model.norm", norm,
           "--data.data_dir", str(data_dir), "--data.download", "false", "--data.num_workers", "0",
           "--data.batch_size", str(per_device), "--model.norm_batch", "2", "--model.width", "8",
           "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.max_epochs", "2",
           "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
           "--trainer.precision", "64-true", "--name", "run", "--version", "0"]  # fmt: skip
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp_fork"]
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run = root / "lightning_logs" / "run" / "version_0"
    return json.loads((run / "metrics.json").read_text()), torch.load(run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.xdist_group("ports")  # a TCP port per process group: one at a time (pyproject.toml)
@pytest.mark.parametrize("norm", ["bn"])
def test_two_processes_with_a_norm_batch_train_and_score_as_one(norm, tmp_path):
    # A global batch of 8 with norm batch 2: one process of 8 images, and 2 gloo processes of 4,
    # in float64 (64-true). In float32 the two runs differ by the rounding of a sum over 8
    # images taken in two halves, which Adam scales up where a gradient is zero but for rounding
    # (the conv biases just before a norm, whose effect the norm subtracts): their normalized
    # steps of +-lr left the weights 1e-3 apart with two threads and further with one. In
    # float64 that rounding stays below Adam's eps, and every weight and statistic agrees.
    data = tmp_path / "data"
    fakedata.write_mnist(data, "MNIST", n_train=96, n_test=64, seed=5)
    (one, ckpt1), (two, ckpt2) = (_fit(data, tmp_path / f"w{d}", 8 // d, d, norm) for d in (1, 2))
    assert two["layout"]["world_size"] == 2 and two["layout"]["global_batch_size"] == 8
    assert one["layout"]["norm_stats_images"] == two["layout"]["norm_stats_images"] == 2
    assert one["global_step"] == two["global_step"] == 24
    for e1, e2 in zip(one["epochs"], two["epochs"], strict=True):
        for key in ("val/loss", "train/loss", "train/acc", "val/acc"):
            assert e1[key] == pytest.approx(e2[key], rel=1e-6, abs=1e-9), (key, e1, e2)
    for key, value in ckpt1["state_dict"].items():
        if key.startswith("net."):
            assert value.dtype in (torch.float64, torch.int64), key
            torch.testing.assert_close(ckpt2["state_dict"][key], value, rtol=1e-7, atol=1e-9, msg=key)


def layout(world, norm, drop_last=False, batch=4, **norm_kwargs):
    """The run record's layout of a run of ``norm`` on ``world`` processes, 23 training images."""
    from types import SimpleNamespace

    from normbench.layout import batch_layout
    from normbench.module import NormBenchModule

    trainer = SimpleNamespace(world_size=world, num_devices=world, num_nodes=1, accumulate_grad_batches=1)
    dm = SimpleNamespace(batch_size=batch, train_set=list(range(23)), drop_last=drop_last, in_memory=True)
    module = NormBenchModule(norm=norm, norm_kwargs=norm_kwargs, in_channels=1, width=8, num_blocks=2)
    return batch_layout(trainer, module, dm)


def test_the_record_says_what_each_statistic_covers_and_what_was_padded():
    # BatchNorm without running statistics normalizes over the batch all the same.
    for kwargs in ({}, {"track_running_stats": False}):
        got = layout(1, "bn", **kwargs)
        assert (got["norm_stats_images"], got["norm_stats_scope"]) == (4, "per device"), kwargs
    assert (layout(1, "gn", num_groups=4)["norm_stats_scope"]) == "per image"
    # 23 images on 2 processes: one image twice per epoch, unless drop_last leaves the remainder out.
    assert [layout(w, "gn", d, num_groups=4)["train_images_padded"] for w, d in ((1, False), (2, False), (2, True))] == [
        0, 1, 0]  # fmt: skip


def test_a_ghost_batch_norms_statistics_cover_its_virtual_batch_in_the_record():
    # Guards against batch_layout `images = min(images, *ghost)` -> `images = images`
    # (norm_stats_images of ghost_bn said the whole batch). Ghost BN normalizes over
    # virtual_batch_size images (Hoffer et al. 2017), whatever the larger SGD batch.
    for batch, virtual, expected in ((16, 4, 4), (16, 32, 16), (8, 8, 8)):
        got = layout(1, "ghost_bn", batch=batch, virtual_batch_size=virtual)
        assert (got["norm_stats_images"], got["norm_stats_scope"]) == (expected, "per device"), (batch, virtual)
