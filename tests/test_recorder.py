"""The run record in every Lightning mode a user may set: each run ends with its true status,
in its own directory, and writes nothing outside it; the sweep says which runs failed or
diverged and exits 1. Run from the console script, as users run it.

Ctrl-C (status ``interrupted``, exit 130) is test_sweep.py's
test_ctrl_c_stops_the_sweep_and_the_next_run_of_it_resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import killer
import pytest
import torch
import yaml
from quick_configs import mnist_config
from test_sweep import quick_overrides

from normbench.main import main
from normbench.results import hardware

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BASE = mnist_config("bn", 16)

# name -> (its settings, the status it ends with, its optimizer steps). Every run has 8 batches
# of 16 fake images per epoch, limited to 2 (limit_train_batches), and 2 epochs.
MODES = {
    "fast_dev_run": ({"trainer.fast_dev_run": True}, "finished", 1),
    "limit_fraction": ({"trainer.limit_train_batches": 0.25, "trainer.limit_val_batches": 0}, "finished", 4),
    "overfit_batches": ({"trainer.overfit_batches": 1}, "finished", 2),
    "max_steps": ({"trainer.max_steps": 3}, "finished", 3),
    "max_time": ({"trainer.max_time": "00:00:00:00"}, "finished", 0),
    "no_logger": ({"trainer.logger": False}, "finished", 4),
    "callback_raises": ({"trainer.callbacks": [{"class_path": "killer.RaiseAtStep", "init_args": {"step": 1}}]},
                        "failed", 1),
    "diverges": ({"model.norm": "none", "model.optimizer.init_args.lr": 1.0e30}, "diverged", None),
}  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _normbench(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "normbench", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300, check=False,
                          preexec_fn=killer.terminal_job)  # fmt: skip


def _in_process(cwd: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``normbench ARGS`` run in this process from ``cwd``: its exit status and its stderr (a
    process of its own costs 5 s of imports; the tests that need one, for signals, use
    ``_normbench``)."""
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    return code, capsys.readouterr().err


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_fast_dev_run_alone_records_its_run_in_its_own_directory(fake_data, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    code, err = _in_process(work, monkeypatch, capsys, "fit", "--config", BASE, "--data.data_dir", str(fake_data),
                            "--data.download", "false", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                            "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false",
                            "--trainer.enable_model_summary", "false")  # fmt: skip
    assert code == 0, err[-2000:]
    # The record and nothing else: no checkpoints/ in the working directory, none in the run's.
    assert _files(work) == ["lightning_logs/mnist_bn_bs16/version_0/metrics.json"]
    record = json.loads((work / "lightning_logs/mnist_bn_bs16/version_0/metrics.json").read_text())
    assert record["status"] == "finished" and record["global_step"] == 1
    assert record["config"]["model"]["norm"] == "bn" and record["config"]["trainer"]["fast_dev_run"] is True


# What Lightning says of the modes themselves (no validation to monitor, overfit_batches turning
# shuffling off), in this process now that the sweep runs here.
@pytest.mark.filterwarnings("ignore:`ModelCheckpoint\\(monitor='val/acc'\\)` could not find the monitored key")
@pytest.mark.filterwarnings("ignore:You requested to overfit but enabled")
def test_every_lightning_mode_ends_with_its_true_status_and_the_sweep_exit_says_so(
    fake_data, tmp_path, monkeypatch, capsys
):
    grid = {"mode": {name: settings for name, (settings, _, _) in MODES.items()}}
    config = tmp_path / "modes.yaml"
    config.write_text(yaml.safe_dump({"base": BASE, "overrides": quick_overrides(fake_data), "grid": grid}))
    args = ["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--workers", "1"]
    code, err = _in_process(tmp_path / "cwd", monkeypatch, capsys, *args)
    assert code == 1, err[-3000:]
    sweep_dir = tmp_path / "out" / "modes"
    for name, (_, status, steps) in MODES.items():
        record = json.loads((sweep_dir / "lightning_logs" / name / "version_0" / "metrics.json").read_text())
        assert record["status"] == status, (name, record.get("error"))
        assert record["attempts"][-1]["ended"] >= record["attempts"][-1]["started"], name
        if steps is not None:
            assert record["global_step"] == steps, name
        assert record["config"]["model"]["net"] == "seed_cnn", name  # its config, also without config.yaml
    diverged = json.loads((sweep_dir / "lightning_logs/diverges/version_0/metrics.json").read_text())
    # A line as each run ends; at the end one per run that failed or diverged, then the summary,
    # which counts them truly.
    lines = err.splitlines()
    ended = [x.split("] ", 1)[1] for x in lines if x.startswith("sweep: [")]
    assert len(ended) == len(MODES) and f"diverges diverged at step {diverged['diverged_at_step']}" in ended
    log = sweep_dir / "logs" / "callback_raises.log"
    assert f"callback_raises failed: RuntimeError: callback bug at step 1 (its output: {log})" in ended
    summary = [x for x in lines if x.startswith("sweep: ") and not x.startswith("sweep: [")]
    assert [x for x in summary if "failed" in x or "diverged" in x] == [
        "sweep: callback_raises failed: RuntimeError: callback bug at step 1",
        f"sweep: diverges diverged at step {diverged['diverged_at_step']}",
    ]
    assert json.loads(lines[-1]) == {"diverged": 1, "failed": 1, "finished": 6}
    # Nothing outside the runs' own directories but the sweep's metadata, its claims, the runs'
    # logs and its HParams summary at the logs' root; no checkpoints/ or config.yaml shared by the runs.
    assert sorted(f for f in _files(sweep_dir) if f.startswith("logs/")) == sorted(f"logs/{n}.log" for n in MODES)
    outside = [
        f for f in _files(sweep_dir) if not f.startswith(("lightning_logs/", "claims/", "logs/")) and f != "sweep.json"
    ]
    outside += [f for f in _files(sweep_dir / "lightning_logs") if "/version_0/" not in f and "tfevents" not in f]
    assert outside == [] and _files(tmp_path / "cwd") == []
    assert not (sweep_dir / "lightning_logs" / "fast_dev_run" / "version_0" / "checkpoints").exists()
    assert (sweep_dir / "lightning_logs" / "no_logger" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    # An exploratory sweep accepts its failures: the failed run runs again, fails again, and is
    # said; the exit status is 0.
    code, err = _in_process(tmp_path / "cwd", monkeypatch, capsys, *args, "--allow_failures", "true")
    assert code == 0, err[-3000:]
    assert "sweep: callback_raises failed: RuntimeError: callback bug at step 1" in err.splitlines()


@pytest.mark.parametrize(("every", "said"), [
    # A checkpoint at step 2 before Ctrl-C at step 3: --ckpt_path last continues from it.
    (2, "add --ckpt_path last to the same command to continue from the last checkpoint"),
    # Ctrl-C at step 3, the first checkpoint due at 1,000: nothing to continue from.
    (1000, ("no checkpoint was saved yet (the first comes at checkpoint_every_n_steps or the epoch's end); run the "
           "same command again to start over")),
])  # fmt: skip
def test_ctrl_c_of_a_fit_records_it_interrupted_and_exits_130(fake_data, tmp_path, every, said):
    work = tmp_path / "work"
    callback = {"class_path": "killer.InterruptAtStep", "init_args": {"step": 3, "marker": str(tmp_path / "hit")}}
    done = _normbench(work, "fit", "--config", BASE, "--data.data_dir", str(fake_data), "--data.download", "false",
                      "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
                      "--trainer.callbacks+", json.dumps(callback), "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false", "--checkpoint_every_n_steps", str(every))  # fmt: skip
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"normbench: interrupted; {said}"
    (record,) = [json.loads(p.read_text()) for p in (work / "lightning_logs").rglob("metrics.json")]
    assert record["status"] == "interrupted"
    assert [p.name for p in (work / "lightning_logs").rglob("*.ckpt")] == (["last.ckpt"] if every == 2 else [])


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["fit", "--config", "c.yaml"], "add --ckpt_path last to the same command"),
        (["fit", "--config", "c.yaml", "--ckpt_path", "last"], "run the same command again to continue"),
        (["fit", "--ckpt_path=last"], "run the same command again to continue"),
        (["fit", "--ckpt_path", "run/checkpoints/last.ckpt"], "add --ckpt_path last to the same command"),
        (["sweep", "--config", "s.yaml"], "run the same command again to resume: finished runs are kept"),
        (["test", "--config", "c.yaml"], "nothing was saved that a run would resume from"),
    ],
)
def test_what_ctrl_c_says_fits_the_command(argv, said):
    from normbench.main import how_to_resume

    assert how_to_resume(argv).startswith(said)
    assert how_to_resume(argv, resumable=True) == how_to_resume(argv)  # a checkpoint: as without knowing
    if argv[0] == "fit":  # no checkpoint yet: --ckpt_path last would start over anyway
        assert how_to_resume(argv, resumable=False).startswith("no checkpoint was saved yet")


@pytest.mark.parametrize("threads, said", [(1, "1 thread"), (3, "3 threads")])
def test_a_cpu_runs_hardware_names_the_cpu_model_and_its_threads(threads, said, monkeypatch):
    # The model as lscpu, another reader of the kernel's CPU description, names it.
    lscpu = shutil.which("lscpu")
    if lscpu is None or not Path("/proc/cpuinfo").is_file():
        pytest.skip("no lscpu or /proc/cpuinfo here: the model comes from platform.processor()")
    out = subprocess.run([lscpu], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"}).stdout
    model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert hardware(torch.device("cpu")) == f"CPU {model} ({os.uname().machine}), {said}"


def test_a_record_gets_the_mode_of_any_new_file_not_the_temporary_files_0600(tmp_path):
    # Written through a temporary file (mkstemp: the owner's alone) and a rename; others who can
    # read the run's config.yaml and events can read its record too.
    import os
    import stat

    from normbench.results import write_json_atomic

    (tmp_path / "plain").write_text("x")
    write_json_atomic(tmp_path / "metrics.json", {"status": "running"})
    mode = stat.S_IMODE(os.stat(tmp_path / "metrics.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) and mode & stat.S_IROTH


def test_a_fit_that_diverges_says_so_in_one_line_and_exits_1(fake_data, tmp_path):
    # As a sweep with a diverged run exits 1; the line names the step the record gives.
    work = tmp_path / "work"
    done = _normbench(work, "fit", "--config", BASE, "--data.data_dir", str(fake_data), "--data.download", "false",
                      "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
                      "--model.norm", "none", "--model.optimizer.init_args.lr", "1e30",
                      "--trainer.enable_model_summary", "false")  # fmt: skip
    (record,) = [json.loads(p.read_text()) for p in (work / "lightning_logs").rglob("metrics.json")]
    assert done.returncode == 1 and record["status"] == "diverged", done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if "became NaN or inf" in line]
    assert said == [
        (
            f"normbench: the training loss became NaN or inf at step {record['diverged_at_step']}; the run stops here "
            "and is recorded as diverged (try a smaller learning rate or another norm)"
        )
    ]
    assert "UserWarning" not in done.stderr and "rank_zero_warn(" not in done.stderr
    assert "💡" not in done.stdout + done.stderr  # nor Lightning's advertisement of its cloud logger
