"""The budget a run holds (normbench.budget): the optimizer steps and learning rate a tiny run
actually took, read back from its record and its optimizer, for each protocol."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from quick_configs import mnist_config

from normbench.budget import scaled_lr
from normbench.main import main

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip


def _fit(fake_data, root, batch_size, *budget):
    main(["fit", "--config", mnist_config("bn", batch_size), "--data.data_dir", str(fake_data),
          "--data.download", "false", "--data.num_workers", "0", "--trainer.default_root_dir", str(root),
          "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.callbacks", "[]",
          "--name", "run", "--version", "0", *QUIET, *budget])  # fmt: skip
    run = root / "lightning_logs" / "run" / "version_0"
    return json.loads((run / "metrics.json").read_text()), yaml.safe_load((run / "config.yaml").read_text())


def test_the_study_protocol_takes_the_configs_epochs_and_lr(fake_data, tmp_path):
    record, config = _fit(fake_data, tmp_path, 16)
    # 128 fake training images, one epoch of batches of 16.
    assert record["global_step"] == math.ceil(128 / 16) and record["lr"] == pytest.approx(1e-3)
    assert config["budget"]["protocol"] == "study"


# Batch size 32 (3 s: 8 passes over the fake set) with -m slow.
@pytest.mark.parametrize("batch_size", [4, pytest.param(32, marks=pytest.mark.slow)])
def test_held_steps_take_the_same_optimizer_steps_at_any_batch_and_evaluate_evenly(fake_data, tmp_path, batch_size):
    record, config = _fit(fake_data, tmp_path, batch_size, "--budget.protocol", "steps", "--budget.steps", "12",
                          "--budget.evaluations", "3")  # fmt: skip
    assert record["status"] == "finished" and record["global_step"] == 12
    # Evaluated after steps 4, 8 and 12, across epoch ends (batch 32: 4 steps an epoch).
    assert [e["step"] for e in record["evals"]] == [4, 8, 12]
    assert config["trainer"]["max_steps"] == 12 and record["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("rule, batch_size", [("sqrt", 64), ("linear", 4)])
def test_scaled_lr_is_what_the_optimizer_used(fake_data, tmp_path, rule, batch_size):
    record, config = _fit(fake_data, tmp_path, batch_size, "--budget.protocol", "scaled_lr",
                          "--budget.reference_batch_size", "16", "--budget.rule", rule)  # fmt: skip
    expected = 1e-3 * (batch_size / 16 if rule == "linear" else math.sqrt(batch_size / 16))
    assert record["lr"] == pytest.approx(expected, rel=1e-12)
    assert config["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(expected, rel=1e-12)
    # The saved config scales from the reference figure: run again, it trains at the same lr.
    assert config["budget"]["reference_lr"] == pytest.approx(1e-3)
    assert record["global_step"] == math.ceil(128 / batch_size)


def test_scaled_lr_by_hand():
    assert scaled_lr(1e-3, 128, 2, "sqrt") == pytest.approx(8e-3)
    assert scaled_lr(0.1, 1024, 256, "linear") == pytest.approx(0.4)  # Goyal et al. 2017's rule
    assert scaled_lr(1e-3, 16, 16, "sqrt") == 1e-3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget.protocol", "steps"], "budget.protocol=steps needs budget.steps"),
        (["--budget.protocol", "steps", "--budget.steps", "10", "--budget.evaluations", "3"],
         "budget.evaluations=3 does not divide budget.steps=10; give one of 1, 2, 5, 10"),
        (["--budget.protocol", "scaled_lr"], "needs budget.reference_batch_size"),
    ],
)  # fmt: skip
def test_a_budget_missing_its_figures_is_one_line(fake_data, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        _fit(fake_data, tmp_path, 16, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_run_whose_steps_end_before_its_first_evaluation_is_told_so(fake_data, tmp_path, capsys):
    # Study 1 evaluates every 500 steps; a run shortened to 3 steps would end with no test
    # accuracy after training, and a record whose last accuracy is the one before it.
    every = ["--trainer.val_check_interval", "500", "--trainer.check_val_every_n_epoch", "null"]
    record, _ = _fit(fake_data, tmp_path, 16, "--trainer.max_steps", "3", *every)
    assert record["global_step"] == 3 and not record.get("evals")
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("normbench: ")]
    assert said == [
        (
            "normbench: trainer.max_steps=3 ends before the first evaluation, at step 500 (trainer.val_check_interval): "
            "no test accuracy after training; give --trainer.val_check_interval 3 to evaluate at the end"
        )
    ]
    # As told: the run is evaluated at its end, and nothing is said.
    record, _ = _fit(fake_data, tmp_path / "told", 16, "--trainer.max_steps", "3", *every[:1], "3", *every[2:])
    assert [e["step"] for e in record["evals"]] == [3]
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("normbench: ")]


def test_a_runs_processes_are_devices_times_nodes_as_lightnings_trainer_counts_them(fake_data, tmp_path):
    # Guards against devices.world_size `device_count(...) * int(trainer.num_nodes or 1)` ->
    # `device_count(...)`: no test sets num_nodes > 1. Independent: Lightning's own Trainer's
    # world_size for the same settings; and the scaled learning rate of a 2-device x 2-node run
    # of batch 16 per device: global batch 64, lr 1e-3 x sqrt(64 / 16).
    import math

    import lightning as L
    from jsonargparse import Namespace
    from quick_configs import mnist_config

    from normbench.cli import NormBenchCLI
    from normbench.devices import world_size

    for devices, nodes in ((2, 3), (1, 2), (3, 1)):
        trainer = L.Trainer(
            accelerator="cpu",
            devices=devices,
            num_nodes=nodes,
            strategy="ddp",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        assert world_size(Namespace(accelerator="cpu", devices=devices, num_nodes=nodes)) == trainer.world_size
    cli = NormBenchCLI(
        args=[
            "--config",
            mnist_config("bn", 16),
            "--data.data_dir",
            str(fake_data),
            "--data.download",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.num_nodes",
            "2",
            "--trainer.strategy",
            "ddp",
            "--budget.protocol",
            "scaled_lr",
            "--budget.reference_batch_size",
            "16",
        ],
        run=False,
    )
    assert cli.config.model.optimizer.init_args.lr == pytest.approx(1e-3 * math.sqrt(16 * 2 * 2 / 16), rel=1e-12)
