"""Runs stopped in the middle (killed with SIGKILL, or failed) resume exactly: same weights,
running statistics, optimizer state, metrics and TensorBoard run as the same run left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from quick_configs import mnist_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from normbench.main import main
from normbench.results import read_record

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# 128 fake training images at batch size 8: 16 steps per epoch, 2 epochs, last.ckpt every 5 steps.
STEPS_PER_EPOCH, EPOCHS, EVERY = 16, 2, 5


def args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", mnist_config("brn", 16), "--data.data_dir", str(data_dir),
        "--data.download", "false", "--data.batch_size", "8", "--trainer.max_epochs", str(EPOCHS),
        "--trainer.deterministic", "true", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root), "--name", "run",
        "--checkpoint_every_n_steps", str(EVERY),
        # BRN with its limits moving during these few steps, so a resumed step count would show.
        "--model.norm_kwargs", "{warmup_steps: 4, r_max_ramp_steps: 10, d_max_ramp_steps: 10}",
        *extra,
    ]  # fmt: skip


# Step-level TensorBoard scalars, so that what the killed attempt logged after its checkpoint shows.
DIAGNOSTICS = (
    "{class_path: normbench.callbacks.NormDiagnostics, init_args: {every_n_steps: 1, histograms: false, "
    "batch_stats_eval: false, precise_bn_images: 0}}"
)


def killer(step: int, marker: Path) -> list[str]:
    kill = f"{{class_path: killer.KillAtStep, init_args: {{step: {step}, marker: {marker}}}}}"
    return ["--trainer.callbacks", f"[{DIAGNOSTICS}, {kill}]"]


def tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint structure, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def scalar_steps(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def alone(fake_data, tmp_path_factory) -> Path:
    """The run left uninterrupted: its run directory."""
    root = tmp_path_factory.mktemp("alone")
    main(args(fake_data, root, "--trainer.callbacks", f"[{DIAGNOSTICS}]"))
    return root / "lightning_logs" / "run" / "version_0"


def _resumed_equals_alone(run_dir: Path, alone: Path) -> None:
    """The resumed run ``run_dir`` is the run left alone: record, checkpoint, TensorBoard."""
    # The same run directory and TensorBoard run, not a new version: the logger's version 0
    # (an int, which the progress bar shows as v_num=0; the folder's name, it showed "on_0").
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["version"] == 0
    ours, theirs = read_record(run_dir), read_record(alone)
    assert ours["status"] == theirs["status"] == "finished"
    assert ours["global_step"] == theirs["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert ours["resumed_from"].endswith("last.ckpt")
    # Per-epoch metrics, including the epoch that was cut: every figure, exactly.
    assert ours["epochs"] == theirs["epochs"] and len(ours["epochs"]) == EPOCHS
    assert ours["val_acc_best"] == theirs["val_acc_best"]

    a = torch.load(alone / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for part in ("state_dict", "optimizer_states"):
        ta, tb = dict(tensors(a[part])), dict(tensors(b[part]))
        assert ta.keys() == tb.keys() and ta
        for key, value in ta.items():
            assert torch.equal(value, tb[key]), f"{part}{key} differs after the resume"
    assert any("running_var" in k for k in dict(tensors(a["state_dict"])))
    assert (
        a["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        == b["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    )

    # TensorBoard: the values of the run left alone, each step once; the steps the killed attempt
    # logged after its checkpoint (purge_step) are not doubled.
    for tag in ("val/acc", "train/loss", "running_stats/blocks.0.norm/var", "grad/block_0"):
        ours_tb, theirs_tb = scalar_steps(run_dir, tag), scalar_steps(alone, tag)
        assert [s for s, _ in ours_tb] == [s for s, _ in theirs_tb], tag
        assert [v for _, v in ours_tb] == pytest.approx([v for _, v in theirs_tb], rel=1e-6), tag
    assert len(scalar_steps(run_dir, "grad/block_0")) == EPOCHS * STEPS_PER_EPOCH


def test_a_run_that_failed_mid_epoch_resumes_as_the_run_left_alone(fake_data, tmp_path, alone):
    # In this process: a callback raises after step 23 (epoch 1), the run fails with its newest
    # checkpoint at step 20, and the same command with --ckpt_path last finishes it. The
    # SIGKILL of a whole process (no cleanup at all) is checked the same way with -m slow.
    fail = f"{{class_path: killer.RaiseOnceAtStep, init_args: {{step: 23, marker: {tmp_path / 'raised'}}}}}"
    callbacks = ["--trainer.callbacks", f"[{DIAGNOSTICS}, {fail}]"]
    with pytest.raises(RuntimeError, match="raised once at step 23"):
        main(args(fake_data, tmp_path, *callbacks))
    run_dir = tmp_path / "lightning_logs" / "run" / "version_0"
    assert read_record(run_dir)["status"] == "failed"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20

    main(args(fake_data, tmp_path, *callbacks, "--ckpt_path", "last"))
    _resumed_equals_alone(run_dir, alone)


# Both kills start a process that imports torch and Lightning (10 s on 2 cores): with -m slow.
# The kill in epoch 1 crosses an epoch end on resume too. The failed run above checks in the
# default suite that a resumed run equals the run left alone.
@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [12, 23], ids=["epoch0", "epoch1"])
def test_sigkill_mid_epoch_then_resume_equals_the_run_left_alone(fake_data, tmp_path, alone, kill_at):
    marker = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "normbench", *args(fake_data, tmp_path, *killer(kill_at, marker))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = tmp_path / "lightning_logs" / "run" / "version_0"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # The newest checkpoint is the periodic one before the kill, in the middle of an epoch.
    assert ckpt["global_step"] == kill_at // EVERY * EVERY and ckpt["global_step"] % STEPS_PER_EPOCH
    assert read_record(run_dir)["status"] == "running"

    main(args(fake_data, tmp_path, *killer(kill_at, marker), "--ckpt_path", "last"))

    _resumed_equals_alone(run_dir, alone)


# A killed process and its resume, 6 s on 2 cores; with -m slow. The failed run above checks in
# the default suite that a resumed run equals the run left alone.
@pytest.mark.slow
def test_sigkill_right_after_a_checkpoint_loses_no_scalar_logged_before_it(fake_data, tmp_path):
    # A slow disk keeps TensorBoard's queue full, so the kill always finds events in it: only a
    # flush when the checkpoint is saved puts those logged before the checkpoint on disk.
    marker = tmp_path / "killed"
    slow = "{class_path: killer.SlowEventFile, init_args: {seconds: 0.01}}"
    kill = f"{{class_path: killer.KillAfterCheckpoint, init_args: {{step: {EVERY}, marker: {marker}}}}}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "normbench",
           *args(fake_data, tmp_path, "--trainer.callbacks", f"[{DIAGNOSTICS}, {slow}, {kill}]")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = tmp_path / "lightning_logs" / "run" / "version_0"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == EVERY
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith(("running_stats/", "batch_vs_running/", "brn/", "grad/"))]
    assert len(tags) > 30
    for tag in tags:
        assert [e.step for e in acc.Scalars(tag)] == list(range(EVERY)), tag


def test_ckpt_path_last_without_a_checkpoint_starts_fresh(fake_data, tmp_path, capsys):
    main(args(fake_data, tmp_path, "--trainer.callbacks", "[]", "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "2", "--ckpt_path", "last"))  # fmt: skip
    assert "no last checkpoint" in capsys.readouterr().err
    record = read_record(tmp_path / "lightning_logs" / "run" / "version_0")
    assert record["status"] == "finished" and "resumed_from" not in record


def test_resuming_a_finished_run_with_more_epochs_continues_its_record(fake_data, tmp_path):
    short = ["--trainer.callbacks", "[]", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]
    main(args(fake_data, tmp_path, *short, "--trainer.max_epochs", "1"))
    main(args(fake_data, tmp_path, *short, "--trainer.max_epochs", "3", "--ckpt_path", "last"))
    run_dir = tmp_path / "lightning_logs" / "run" / "version_0"
    record = read_record(run_dir)
    assert [e["epoch"] for e in record["epochs"]] == [0, 1, 2] and record["global_step"] == 9
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]


# Two processes, 6 s on 2 cores; with -m slow (study 1's iteration runs resumed).
@pytest.mark.slow
def test_iteration_run_resumed_at_a_validation_step_has_the_curves_of_the_run_left_alone(fake_data, tmp_path):
    """Study 1's config as it ships (max_steps, val_check_interval, the loss every n steps),
    SIGKILLed after step 12; its last checkpoint is from step 10, a validation step that Lightning
    skips on resume. The record's evaluations and loss curve equal the uninterrupted run's."""

    def study1(root, *extra):
        return ["fit", "--config", str(ROOT / "configs" / "mnist_brn_bs16.yaml"), "--data.data_dir", str(fake_data),
                "--data.download", "false", "--data.batch_size", "8", "--trainer.max_steps", "20",
                "--trainer.val_check_interval", "5", "--trainer.log_every_n_steps", "3", "--checkpoint_every_n_steps",
                "5", "--trainer.deterministic", "true", "--trainer.accelerator", "cpu",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), "--name", "run",
                *extra]  # fmt: skip

    start = "{class_path: normbench.callbacks.ValidateAtStart}"
    main(study1(tmp_path / "alone", "--trainer.callbacks", f"[{start}]"))
    marker = tmp_path / "killed"
    kill = f"{{class_path: killer.KillAtStep, init_args: {{step: 12, marker: {marker}}}}}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "normbench", *study1(tmp_path, "--trainer.callbacks", f"[{start}, {kill}]")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = tmp_path / "lightning_logs" / "run" / "version_0"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    main(study1(tmp_path, "--trainer.callbacks", f"[{start}, {kill}]", "--ckpt_path", "last"))

    ours, theirs = read_record(run_dir), read_record(tmp_path / "alone" / "lightning_logs" / "run" / "version_0")
    assert ours["status"] == theirs["status"] == "finished" and ours["global_step"] == 20
    # 128 fake images at batch size 8: 16 steps an epoch, so the 20 steps cross an epoch end.
    assert [e["step"] for e in theirs["evals"]] == [0, 5, 10, 15, 20]
    assert ours["evals"] == theirs["evals"]
    assert [s for s, _ in theirs["train_loss_steps"]] == list(range(0, 20, 3))
    assert ours["train_loss_steps"] == theirs["train_loss_steps"]
    # TensorBoard: every validation of the run left alone, with its value. The killed attempt's
    # own validation at the checkpoint's step may also be on disk (Lightning logs it at step 9,
    # before the purge step 10), beside the same point logged again by the resumed run.
    alone_tb = scalar_steps(tmp_path / "alone" / "lightning_logs" / "run" / "version_0", "val/acc")
    assert sorted(set(scalar_steps(run_dir, "val/acc"))) == alone_tb and len(alone_tb) == 5


def test_a_checkpoint_holds_every_process_training_metrics_once():
    # Two ranks' training metrics at a mid-epoch checkpoint, then the rest of the epoch on each:
    # after the resume the epoch's sync (a sum of the ranks' states) equals one metric fed every
    # image. torchmetrics' state_dict holds one rank's part, and Lightning writes rank zero's.
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    from normbench.steps import summed_metric_states, zero_other_ranks

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 10, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(8)]
    losses = [torch.rand(4, generator=g) for _ in range(8)]

    def make():  # in the state_dict, as the module keeps its training metrics
        metrics = {"loss": MeanMetric(), "acc": MulticlassAccuracy(10, average="micro")}
        for m in metrics.values():
            m.persistent(True)
        return metrics

    ranks = [make() for _ in range(2)]
    for i in range(4):  # before the checkpoint: batches 0, 2 on rank 0 and 1, 3 on rank 1
        ranks[i % 2]["loss"].update(losses[i])
        ranks[i % 2]["acc"].update(*batches[i])

    def metrics_state(metrics):
        return {f"{p}.{k}": v.clone() for p, m in metrics.items() for k, v in m.state_dict().items()}

    def all_reduce_on(rank):  # the sum with the other rank's state, visited in the same order
        other = iter([getattr(m, name) for m in ranks[1 - rank].values() for name in m._defaults])
        return lambda t: t + next(other)

    checkpoints = []
    for rank, metrics in enumerate(ranks):
        ck = {"state_dict": metrics_state(metrics)}
        summed_metric_states(ck, metrics, all_reduce_on(rank))
        checkpoints.append(ck)
    assert checkpoints[0]["state_dict"].keys() == {"loss.mean_value", "loss.weight", "acc.tp", "acc.fp", "acc.tn",
                                                   "acc.fn"}  # fmt: skip
    resumed = []
    for rank in range(2):  # Lightning writes rank zero's checkpoint, and every rank loads it
        ck = {"state_dict": {k: v.clone() for k, v in checkpoints[0]["state_dict"].items()}}
        zero_other_ranks(ck, ("loss", "acc"), rank)
        metrics = make()
        for p, m in metrics.items():
            m.load_state_dict(
                {k.removeprefix(f"{p}."): v for k, v in ck["state_dict"].items() if k.startswith(f"{p}.")}
            )
        resumed.append(metrics)
    for i in range(4, 8):
        resumed[i % 2]["loss"].update(losses[i])
        resumed[i % 2]["acc"].update(*batches[i])
    one = make()
    for i in range(8):
        one["loss"].update(losses[i])
        one["acc"].update(*batches[i])
    for p, m in one.items():
        for name in m._defaults:
            synced = sum(getattr(r[p], name) for r in resumed)
            torch.testing.assert_close(synced, getattr(m, name), msg=f"{p}.{name}")
    assert float(torch.cat(losses).mean()) == pytest.approx(float(one["loss"].compute()))


# Two processes killed and resumed, 50 s on 2 cores; with -m slow. The test above checks the
# checkpoint's sums in the default suite.
@pytest.mark.slow
@pytest.mark.xdist_group("ports")  # a TCP port per process group: one at a time (pyproject.toml)
def test_a_ddp_run_killed_mid_epoch_resumes_with_the_epochs_metrics(fake_data, tmp_path):
    common = ["--data.batch_size", "2", "--trainer.max_epochs", "1", "--trainer.devices", "2", "--trainer.strategy",
              "ddp", "--checkpoint_every_n_steps", "3", "--trainer.num_sanity_val_steps", "0",
              "--data.train_subset", "24"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def fit(root, *extra, check=True):
        base = [a for a in args(fake_data, root) if a not in ("--checkpoint_every_n_steps", str(EVERY))]
        base = base[: base.index("--data.batch_size")] + base[base.index("--data.batch_size") + 2 :]
        cmd = [sys.executable, "-m", "normbench", *base, *common, *extra]
        done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300, check=False)
        assert not check or done.returncode == 0, done.stderr[-3000:]
        return done

    alone, cut = tmp_path / "alone", tmp_path / "cut"
    alone.mkdir(), cut.mkdir()
    fit(alone)
    kill = "{class_path: killer.KillEveryRankAtStep, init_args: {step: 4}}"
    assert fit(cut, "--trainer.callbacks+", kill, check=False).returncode == -signal.SIGKILL
    fit(cut, "--ckpt_path", "last")
    a = read_record(alone / "lightning_logs" / "run" / "version_0")
    b = read_record(cut / "lightning_logs" / "run" / "version_0")
    assert b["resumed_from"].endswith("last.ckpt") and a["global_step"] == b["global_step"] == 6
    # Every figure of the cut epoch, training metrics included (rank 1's part of the first 3
    # steps was lost before: train/loss 2.2442 against 2.3243 on the review's run).
    assert a["epochs"] == b["epochs"]


def test_a_float64_run_resumes_with_its_float64_weights(fake_data, tmp_path):
    """Lightning loads a checkpoint's weights before the precision plugin converts the module:
    a 64-true run's would go into float32 parameters, rounded there (1e-7 apart), and only then
    to float64, so the resumed run left its uninterrupted self from the first step."""
    common = ["--trainer.precision", "64-true"]
    main(args(fake_data, tmp_path, *common, "--trainer.max_steps", "3", "--trainer.callbacks", f"[{DIAGNOSTICS}]"))
    ckpt = tmp_path / "lightning_logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    start = tmp_path / "start.pt"
    probe = f"[{DIAGNOSTICS}, {{class_path: killer.SaveWeightsAtStart, init_args: {{path: {start}}}}}]"
    main(args(fake_data, tmp_path, *common, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt), "--version", "0",
              "--trainer.callbacks", probe))  # fmt: skip
    loaded = torch.load(start, weights_only=True)
    for key, value in saved.items():
        if key.startswith("net.") and value.is_floating_point():
            assert value.dtype == loaded[key].dtype == torch.float64, key
            diff = (loaded[key] - value).abs().max().item()
            assert diff == 0, (key, diff)


def test_ckpt_path_last_continues_the_newest_version_that_has_a_last_checkpoint(tmp_path):
    # Guards against _versions_newest_first `reverse=True` -> `reverse=False` (`--ckpt_path
    # last` resumed the oldest version). version_0, version_1 and version_2 exist; only 0 and 1
    # hold a last.ckpt, so the run continued is version_1, whatever order the folders were made.
    from jsonargparse import Namespace

    from normbench.checkpoints import resolve_resume

    run_dir = tmp_path / "lightning_logs" / "run"
    for v in (1, 0, 2):
        (run_dir / f"version_{v}" / "checkpoints").mkdir(parents=True)
        if v != 2:
            torch.save({"global_step": v}, run_dir / f"version_{v}" / "checkpoints" / "last.ckpt")
    config = Namespace(ckpt_path="last", version=None, name=None, trainer=Namespace(default_root_dir=str(tmp_path)))
    assert resolve_resume(config, "fit", "run") == str(run_dir / "version_1" / "checkpoints" / "last.ckpt")
    assert config.version == 1
    # --version picks another.
    config = Namespace(ckpt_path="last", version=0, name=None, trainer=Namespace(default_root_dir=str(tmp_path)))
    assert resolve_resume(config, "fit", "run") == str(run_dir / "version_0" / "checkpoints" / "last.ckpt")
