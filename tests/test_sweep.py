"""normbench sweep: grid expansion, stable names, failures, resuming after a kill, Ray."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import killer
import pytest
import torch
import yaml
from quick_configs import mnist_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from normbench.grid import expand, validate
from normbench.main import main
from normbench.norms import NORMS
from normbench.results import cpu_cores

ROOT = Path(__file__).resolve().parents[1]
BASE = mnist_config("bn", 16)


def threads_said(n: int) -> str:
    """How a run record's hardware ends for a run on n CPU threads."""
    return f", {n} thread" if n == 1 else f", {n} threads"


def quick_overrides(data_dir) -> dict:
    """Every run of a test sweep: 2 epochs of 2 steps on fake data, the network half as wide."""
    return {
        "data.data_dir": str(data_dir), "data.download": False, "data.num_workers": 0, "model.width": 32,
        "trainer.max_epochs": 2, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 1,
        "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False, "trainer.callbacks": [],
        "trainer.accelerator": "cpu",
    }  # fmt: skip


def write_sweep(path: Path, data_dir, grid: dict, **extra) -> Path:
    path.write_text(
        yaml.safe_dump({"base": BASE, "overrides": quick_overrides(data_dir), "grid": grid, **extra}, sort_keys=False)
    )
    return path


def scalar_steps(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def records(sweep_dir: Path) -> dict[str, list[dict]]:
    """Run name -> the records found for it (one per version folder)."""
    out: dict[str, list[dict]] = {}
    for f in sorted((sweep_dir / "lightning_logs").glob("*/*/metrics.json")):
        out.setdefault(f.parent.parent.name, []).append(json.loads(f.read_text()))
    return out


# --------------------------------------------------------------------------- the grid


def test_grid_expands_in_order_with_stable_readable_names(tmp_path):
    grid = {
        "dataset": ["mnist", "cifar10"],
        "norm": {"bn": {"model.norm": "bn"}, "gn": {"model.norm": "gn", "model.norm_kwargs": {"num_groups": 4}}},
        "data.batch_size": [2, 128],
        "seed_everything": [0],
    }
    cells = expand(grid, BASE, {"trainer.max_epochs": 3}, tmp_path)
    assert [c.name for c in cells] == [
        "mnist_bn_bs2_seed0", "mnist_bn_bs128_seed0", "mnist_gn_bs2_seed0", "mnist_gn_bs128_seed0",
        "cifar10_bn_bs2_seed0", "cifar10_bn_bs128_seed0", "cifar10_gn_bs2_seed0", "cifar10_gn_bs128_seed0",
    ]  # fmt: skip
    gn = cells[2]
    assert gn.values == {"dataset": "mnist", "model.norm": "gn", "model.norm_kwargs": {"num_groups": 4},
                         "data.batch_size": 2, "seed_everything": 0}  # fmt: skip
    args = gn.args
    assert args[:3] == ["fit", "--config", BASE] and args[3:5] == ["--trainer.max_epochs", "3"]
    assert args[args.index("--data") + 1] == "normbench.data.MNISTDataModule"
    assert args[args.index("--model.norm_kwargs") + 1] == "{num_groups: 4}"
    assert args[-6:] == ["--trainer.default_root_dir", str(tmp_path.resolve()), "--name", gn.name, "--version", "0"]
    assert gn.run_dir == str(tmp_path.resolve() / "lightning_logs" / "mnist_gn_bs2_seed0" / "version_0")
    # The same grid gives the same cells, every time.
    assert [c.args for c in expand(grid, BASE, {"trainer.max_epochs": 3}, tmp_path)] == [c.args for c in cells]
    assert [c.name for c in expand({"data": ["FashionMNISTDataModule", "normbench.data.MNISTDataModule"]}, BASE, {},
                                   tmp_path)] == ["fashion_mnist", "mnist"]  # fmt: skip
    assert [c.name for c in expand({"model.num_blocks": [1, 8], "model.activation": ["sigmoid"]}, BASE, {}, tmp_path)] == [
        "blocks1_sigmoid", "blocks8_sigmoid"]  # fmt: skip


@pytest.mark.parametrize(
    "grid, message",
    [
        ({}, "the sweep grid is empty"),
        ({"model.norm": []}, "empty at model.norm"),
        ({"dataset": ["svhn"]}, "unknown dataset 'svhn'"),
    ],
)
def test_bad_grids_are_refused(grid, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        expand(grid, BASE, {}, tmp_path)


def test_every_cell_is_checked_though_seeds_of_one_setting_parse_once(fake_data, tmp_path):
    # Cells that differ only in their seed parse once per setting, and each seed once: a bad
    # seed met first in a later setting's cell, and a bad setting met with a seed already seen,
    # are refused all the same, naming their cell; every cell gets its own layout.
    overrides = {"data.data_dir": str(fake_data), "trainer.accelerator": "cpu", "trainer.strategy": "ddp"}
    cells = expand({"trainer.devices": [1, 2], "seed_everything": [0, 1]}, BASE, overrides, tmp_path)
    validate(cells)
    assert [(c.name, c.world_size) for c in cells] == [
        ("devices1_seed0", 1), ("devices1_seed1", 1), ("devices2_seed0", 2), ("devices2_seed1", 2)]  # fmt: skip
    bad_seed = expand({"model.norm": ["bn", "gn"], "seed_everything": {"s0": {"seed_everything": 0},
                       "sx": {"seed_everything": "x"}}}, BASE, overrides, tmp_path)  # fmt: skip
    bad_seed.insert(0, bad_seed.pop(2))  # gn_s0 first: bn_sx is the first cell with seed x
    with pytest.raises(ValueError, match=r"^sweep run bn_sx \(model.norm=bn, seed_everything=x\): .*seed_everything"):
        validate(bad_seed)
    bad_width = expand({"model.width": [8, 0], "seed_everything": [0, 1]}, BASE, overrides, tmp_path)
    with pytest.raises(ValueError, match=r"^sweep run width0_seed0 \(model.width=0, seed_everything=0\)"):
        validate(bad_width)


def test_dry_run_lists_runs_without_running(fake_data, tmp_path, capsys):
    config = write_sweep(tmp_path / "s.yaml", fake_data, {"model.norm": ["bn", "gn"], "data.batch_size": [4, 8]})
    spec = yaml.safe_load(config.read_text())  # a value whose YAML is longer than a line (80 columns)
    spec["overrides"]["trainer.callbacks"] = [{"class_path": "normbench.callbacks.NormDiagnostics",
                                               "init_args": {"eval_images": None, "every_n_steps": 50}}]  # fmt: skip
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    # Lightning's lines of a run's start ("Seed set to 0", "GPU available: ..."), from the first
    # cell's check, are no part of a dry run's output; its loggers' levels are restored after.
    lightning = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels, said = [lg.getEffectiveLevel() for lg in lightning], []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    for lg in lightning:
        lg.addHandler(handler)
    try:
        main(["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--dry-run"])
    finally:
        for lg in lightning:
            lg.removeHandler(handler)
    assert said == [] and [lg.getEffectiveLevel() for lg in lightning] == levels == [logging.INFO] * 2
    out = capsys.readouterr().out
    assert out.count("pending") == 4 and "bn_bs4" in out and "4 runs, 0 done, 4 to run" in out
    assert not (tmp_path / "out" / "s").exists()  # a preview writes nothing
    # The arguments every run shares, once, as a shell reads them (the callbacks' YAML on one
    # line, quoted), then each run's own: together, with the run directory, the run's command.
    lines = out.splitlines()
    shared = shlex.split(lines[0].removeprefix("every run: normbench ").split(" ... ")[0])
    from normbench import sweep

    cells = {c.name: c for c in sweep.sweep(["--config", str(config), "--output", str(tmp_path / "out"), "--dry_run"])}
    capsys.readouterr()
    callbacks = shared[shared.index("--trainer.callbacks") + 1]
    assert yaml.safe_load(callbacks) == spec["overrides"]["trainer.callbacks"] and len(lines) == 1 + 4 + 1
    for line in lines[1:5]:
        _, status, name, *own = shlex.split(line)
        tail = ["--trainer.default_root_dir", str(tmp_path / "out" / "s"), "--name", name, "--version", "0"]
        assert [*shared, *own, *tail] == cells[name].args and status == "pending"
    # Over a sweep that ran, a dry run of an edited grid leaves the sweep's own metadata (which
    # the report states) as it was.
    meta = tmp_path / "out" / "s" / "sweep.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"name": "s", "command": "normbench sweep --config s.yaml"}')
    write_sweep(tmp_path / "s.yaml", fake_data, {"model.norm": ["bn"], "data.batch_size": [4]})
    main(["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--dry-run"])
    assert "1 run, 0 done, 1 to run" in capsys.readouterr().out
    assert meta.read_text() == '{"name": "s", "command": "normbench sweep --config s.yaml"}'
    assert sorted(p.name for p in meta.parent.iterdir()) == ["sweep.json"]


# --------------------------------------------------------------------------- running


def test_tiny_sweep_end_to_end_records_failures_and_goes_on(fake_data, tmp_path, capsys):
    grid = {"norm": {"bn": {"model.norm": "bn"}, "gn5": {"model.norm": "gn", "model.norm_kwargs": {"num_groups": 5}}},
            "data.batch_size": [4, 8]}  # fmt: skip
    config = write_sweep(tmp_path / "tiny.yaml", fake_data, grid)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--workers", "1"])
    assert exit_info.value.code == 1  # runs failed: a script can tell
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if line.startswith("sweep: gn5")]
    assert [line.split(" failed: ")[0] for line in said] == ["sweep: gn5_bs4", "sweep: gn5_bs8"], err
    assert all("num_groups=5 does not divide" in line for line in said) and err[-1] == '{"failed": 2, "finished": 2}'
    # As each run ends, a line on it; what the runs print (Lightning's start lines, the model
    # summary) is in their logs, not here, every attempt's appended.
    logs = tmp_path / "out" / "tiny" / "logs"
    ended = sorted(line.split("] ", 1)[1].split(":")[0] for line in err if line.startswith("sweep: ["))
    assert ended == ["bn_bs4 finished", "bn_bs8 finished", "gn5_bs4 failed", "gn5_bs8 failed"], err
    assert "gn5_bs4 failed: " in "\n".join(err) and f"(its output: {logs / 'gn5_bs4.log'})" in "\n".join(err)
    assert not any("no last checkpoint under" in line for line in err), err
    bn_log = (logs / "bn_bs4.log").read_text()
    assert bn_log.startswith("== normbench sweep: bn_bs4, from the start, ") and "no last checkpoint under" in bn_log
    gn_log = (logs / "gn5_bs4.log").read_text()
    assert "== gn5_bs4 failed ==" in gn_log and "num_groups=5 does not divide" in gn_log
    found = records(tmp_path / "out" / "tiny")
    assert sorted(found) == ["bn_bs4", "bn_bs8", "gn5_bs4", "gn5_bs8"]
    for name, (record,) in found.items():
        if name.startswith("bn"):
            assert record["status"] == "finished" and len(record["epochs"]) == 2
            assert record["config"]["model"]["norm"] == "bn" and record["seed"] == 0
            assert record["revision"] and record["wall_time_s"] > 0 and 0 <= record["val_acc_best"] <= 1
            # One run at a time, in this process: torch's own thread count, untouched.
            assert record["hardware"].endswith(threads_said(torch.get_num_threads())), record["hardware"]
        else:  # 5 groups do not divide 64 channels: recorded as failed, and the sweep went on
            assert record["status"] == "failed" and "num_groups=5 does not divide" in record["error"]
        assert record["sweep"]["cell"] == name
    # Run again: everything finished or failed is final for finished runs, failed ones are retried.
    # The runs' own event files (the sweep's HPARAMS summary at the logs' root is rewritten each time).
    runs_events = (tmp_path / "out" / "tiny").glob("lightning_logs/*/*/events.out.tfevents*")
    mtimes = {f: f.stat().st_mtime for f in runs_events}
    # An exploratory sweep accepts its failures: they are said, and it exits 0.
    main(["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--workers", "1",
          "--allow_failures", "true"])  # fmt: skip
    assert sum(line.startswith("sweep: gn5") for line in capsys.readouterr().err.splitlines()) == 2
    assert (logs / "gn5_bs4.log").read_text().startswith(gn_log) and (logs / "bn_bs4.log").read_text() == bn_log
    assert (logs / "gn5_bs4.log").read_text().count("== normbench sweep: gn5_bs4, from the start") == 2
    assert {f: f.stat().st_mtime for f in mtimes} == mtimes  # finished runs were not retrained
    report = main(["report", str(tmp_path / "out" / "tiny")])
    text = (tmp_path / "out" / "tiny" / "report" / "report.md").read_text()
    assert "| 4 |" in text and "2 failed" in text and report is None
    assert list((tmp_path / "out" / "tiny" / "report").glob("acc_vs_epoch_*.png"))


def test_a_sweep_with_every_run_done_says_so_in_two_lines(fake_data, tmp_path, capsys):
    config = write_sweep(tmp_path / "done.yaml", fake_data, {"model.norm": ["bn"]})
    args = ["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--workers", "1"]
    main(args)
    capsys.readouterr()
    main(args)  # nothing left to run: no worker layout, no empty progress bar
    assert capsys.readouterr().err.splitlines() == [
        f"sweep done: 1 run, 1 already done, in {tmp_path / 'out' / 'done'} (what each run prints: logs/<run>.log there)",
        '{"finished": 1}',
    ]


def test_cell_runs_one_run_of_the_grid_as_a_job_array_task_does(fake_data, tmp_path, capsys):
    config = write_sweep(tmp_path / "arr.yaml", fake_data, {"model.norm": ["bn", "gn"]})
    args = ["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--cell", "1"]
    main(args)
    err = capsys.readouterr().err.splitlines()
    sweep_dir = tmp_path / "out" / "arr"
    assert err[0] == f"sweep arr: run 1 of its 2, gn, in {sweep_dir} (what each run prints: logs/<run>.log there)"
    assert {name: [r["status"] for r in rs] for name, rs in records(sweep_dir).items()} == {"gn": ["finished"]}
    main(args)  # the task again (a requeued job): its run is done, and said to be
    assert capsys.readouterr().err.splitlines()[0].startswith("sweep arr: run 1 of its 2, gn, already done, in ")
    assert {name: len(rs) for name, rs in records(sweep_dir).items()} == {"gn": 1}


# Slow (20 s): the Ctrl-C sweep test and test_resume.py's SIGKILL tests run by default.
@pytest.mark.slow
def test_sweep_killed_in_the_middle_resumes_without_loss_or_duplicates(fake_data, tmp_path):
    grid = {"model.norm": ["bn", "gn"], "data.batch_size": [4, 8], "seed_everything": [0]}
    extra = {"trainer.max_epochs": 3, "trainer.limit_train_batches": 4}
    config = tmp_path / "kill.yaml"
    config.write_text(
        yaml.safe_dump(
            {"base": BASE, "overrides": {**quick_overrides(fake_data), **extra}, "grid": grid}, sort_keys=False
        )
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "normbench", "sweep", "--config", str(config), "--output", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    # Kill it once one run has finished and the next has started.
    while time.time() < deadline:
        found = records(out / "kill") if (out / "kill").exists() else {}
        statuses = [r["status"] for rs in found.values() for r in rs]
        if statuses.count("finished") >= 1 and "running" in statuses:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = records(out / "kill")
    finished_before = {n for n, rs in before.items() if rs[0]["status"] == "finished"}
    (cut,) = [n for n, rs in before.items() if rs[0]["status"] == "running"]
    assert finished_before
    stamps = {n: before[n][0]["wall_time_s"] for n in finished_before}
    cut_dir = out / "kill" / "lightning_logs" / cut / "version_0"
    had_checkpoint = (cut_dir / "checkpoints" / "last.ckpt").is_file()
    # The killed process's claim file is left behind, its lock released by the kernel.
    assert (out / "kill" / "claims" / f"{cut}.lock").read_text().startswith(f"pid {proc.pid}")

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    after = records(out / "kill")
    assert sorted(after) == ["bn_bs4_seed0", "bn_bs8_seed0", "gn_bs4_seed0", "gn_bs8_seed0"]
    for name, rs in after.items():
        assert len(rs) == 1 and rs[0]["status"] == "finished", name  # once each, in version_0
        assert [e["epoch"] for e in rs[0]["epochs"]] == [0, 1, 2]
        run_dir = out / "kill" / "lightning_logs" / name / "version_0"
        # One value per epoch in TensorBoard: what the killed attempt logged is not doubled.
        steps = [s for s, _ in scalar_steps(run_dir, "val/acc")]
        assert len(steps) == 3 and steps == sorted(set(steps)), (name, steps)
        assert len(rs[0]["attempts"]) == (2 if name == cut else 1), name
    assert after[cut][0]["attempts"][1]["resumed"] == had_checkpoint
    assert ("resumed_from" in after[cut][0]) == had_checkpoint
    assert {n: after[n][0]["wall_time_s"] for n in finished_before} == stamps  # not rerun


# Starting a local Ray instance takes most of its 15 s: out of the default run (-m slow runs it).
@pytest.mark.slow
@pytest.mark.xdist_group("ports")  # a TCP port per process group: one at a time (pyproject.toml)
def test_ray_backend_runs_a_two_run_grid_on_a_local_instance(fake_data, tmp_path):
    pytest.importorskip("ray.tune", reason="the ray extra is not installed: pip install 'normbench[ray]'")
    config = write_sweep(tmp_path / "ray.yaml", fake_data, {"model.norm": ["bn", "gn"]}, backend="ray")
    main(["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--cpus_per_run", "1"])
    found = records(tmp_path / "out" / "ray")
    assert sorted(found) == ["bn", "gn"] and all(rs[0]["status"] == "finished" for rs in found.values())
    assert (tmp_path / "out" / "ray" / "ray").is_dir()  # Ray Tune's own experiment folder


TESTS = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _stopped_sweep(fake_data, tmp_path: Path, callback: str) -> list[str]:
    """The command of a bn/gn sweep whose first run gets ``callback`` (tests/killer.py) at step 9,
    in its second 6-step epoch, one step after its checkpoint at step 8, once."""
    marker = tmp_path / "stopped"
    overrides = {**quick_overrides(fake_data), "trainer.limit_train_batches": 6, "checkpoint_every_n_steps": 4,
                 "trainer.callbacks": [{"class_path": callback, "init_args": {"step": 9, "marker": str(marker)}}]}  # fmt: skip
    config = tmp_path / "mid.yaml"
    config.write_text(yaml.safe_dump({"base": BASE, "overrides": overrides, "grid": {"model.norm": ["bn", "gn"]}}))
    return [sys.executable, "-m", "normbench", "sweep", "--config", str(config), "--output", str(tmp_path / "out"),
            "--workers", "1"]  # fmt: skip


# test_resume.py checks the same resume at the fit level in the default run; this sweep-level
# one runs with -m slow, to keep the default suite under 5 minutes on 2 cores.
@pytest.mark.slow
def test_sweep_resumes_a_run_killed_mid_epoch_from_its_checkpoint(fake_data, tmp_path):
    cmd = _stopped_sweep(fake_data, tmp_path, "killer.KillAtStep")
    first = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert records(tmp_path / "out" / "mid")["bn"][0]["status"] == "running"

    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "taking over the stale claim on bn" in second.stderr
    found = records(tmp_path / "out" / "mid")
    assert sorted(found) == ["bn", "gn"]
    for (record,) in found.values():
        assert record["status"] == "finished" and [e["epoch"] for e in record["epochs"]] == [0, 1]
        assert record["global_step"] == 12
    bn = found["bn"][0]
    assert [a["resumed"] for a in bn["attempts"]] == [False, True] and bn["resumed_from"].endswith("last.ckpt")
    assert len(found["gn"][0]["attempts"]) == 1


# Slow (18 s: two sweep processes, each importing torch and Lightning).
@pytest.mark.slow
def test_two_sweep_processes_on_one_directory_run_each_cell_once(fake_data, tmp_path):
    config = write_sweep(tmp_path / "two.yaml", fake_data, {"model.norm": ["bn", "gn", "bnrs", "brn"]})
    cmd = [sys.executable, "-m", "normbench", "sweep", "--config", str(config), "--output", str(tmp_path / "out"),
           "--workers", "1"]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    found = records(tmp_path / "out" / "two")
    assert sorted(found) == ["bn", "bnrs", "brn", "gn"]
    pids = set()
    for name, (record,) in found.items():
        assert record["status"] == "finished" and len(record["epochs"]) == 2, name
        assert len(record["attempts"]) == 1, (name, record["attempts"])  # one process ran it, once
        pids.add(record["attempts"][0]["pid"])
    assert pids <= {p.pid for p in procs}


# Both cases with -m slow (each starts worker processes that import torch and Lightning: 10 s);
# test_a_worker_process_trains_run_after_run checks in the default suite that two workers' runs
# get cores // 2 threads each on cores of their own, and test_auto_workers_... the auto rule.
@pytest.mark.slow
@pytest.mark.parametrize("override", [False, True])
def test_parallel_workers_share_the_cores_instead_of_oversubscribing_them(override, fake_data, tmp_path):
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    assert cpu_cores() == cores
    config = write_sweep(tmp_path / "par.yaml", fake_data, {"model.norm": ["bn", "gn"]})
    spec = yaml.safe_load(config.read_text())
    spec["overrides"].update({"trainer.max_epochs": 1, "trainer.limit_train_batches": 1, "trainer.num_sanity_val_steps": 0,
                              "trainer.callbacks": [{"class_path": "thread_probe.ThreadProbe"}]})  # fmt: skip
    config.write_text(yaml.safe_dump(spec))
    # By default (auto) one worker per core, at most one per run: two runs take two workers of
    # cores // 2 threads each where there are 2 cores or more (one run in this process on 1 core).
    # The override: --workers 2 with 1 thread each, or 2 where 1 is the default already.
    workers = 2 if override else min(2, len(cores))
    default = max(1, len(cores) // workers)
    cases = [(1 if default > 1 else 2,) * 2] if override else [(None, default)]
    for given, threads in cases:
        out = tmp_path / f"threads{given}"
        extra = ["--workers", "2"] if override else []
        extra += [] if given is None else ["--threads_per_run", str(given)]
        main(["sweep", "--config", str(config), "--output", str(out), *extra])
        if workers == 1:  # one core: the runs ran here, one after another, with torch's threads
            threads = torch.get_num_threads()
        runs = sorted((out / "par" / "lightning_logs").glob("*/version_0"))
        assert [r.parent.name for r in runs] == ["bn", "gn"]
        probes = [json.loads((r / "threads.json").read_text()) for r in runs]
        for run, probe in zip(runs, probes, strict=True):
            record = json.loads((run / "metrics.json").read_text())
            assert record["status"] == "finished"
            assert record["hardware"].endswith(threads_said(threads)), (given, record["hardware"])
            if workers == 1:
                assert probe["pid"] == os.getpid()
                continue
            assert probe["intra_op"] == probe["inter_op"] == threads, (given, probe)
            assert probe["env"] == {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            assert probe["pid"] != os.getpid()  # each in a worker process
            if hasattr(os, "sched_setaffinity"):
                assert len(probe["cores"]) == threads and set(probe["cores"]) <= set(cores), probe
        if hasattr(os, "sched_setaffinity") and 2 * threads <= len(cores):
            # The two runs ran at once, each on cores of its own.
            assert not set(probes[0]["cores"]) & set(probes[1]["cores"]), probes


def test_auto_workers_are_one_per_core_or_gpu_and_at_most_one_per_run(monkeypatch):
    from normbench import workers

    monkeypatch.setattr(workers, "cpu_cores", lambda: list(range(16)))
    # (runs, gpus, threads_per_run, GiB of memory free) -> workers, by the rule the README states.
    cases = {(48, 0, None, 64): 16, (3, 0, None, 64): 3, (0, 0, None, 64): 1, (48, 0, 4, 64): 4,
             (48, 0, 5, 64): 3, (48, 0, 32, 64): 1, (48, 0, None, 6.5): 6, (48, 0, None, 0.3): 1,
             (48, 4, None, 64): 4, (2, 4, None, 64): 2, (48, 4, 8, 0.3): 4}  # fmt: skip
    assert {case: workers.auto_workers(*case) for case in cases} == cases
    # The memory this machine has free, from the kernel's own count.
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        (line,) = [x for x in meminfo.read_text().splitlines() if x.startswith("MemAvailable:")]
        assert abs(workers.available_memory_gib() - int(line.split()[1]) / 2**20) < 0.5
    # What each of them gets: the cores shared out on CPU, torch's default on GPUs.
    assert [workers.worker_threads(w, 0, None) for w in (16, 3, 1)] == [1, 5, 16]
    assert workers.worker_threads(3, 0, 2) == 2 and workers.worker_threads(4, 4, None) is None


# A fresh process per run (1) with -m slow: its three worker starts cost about 10 s more.
@pytest.mark.parametrize("runs_per_worker", [None, pytest.param(1, marks=pytest.mark.slow)])
def test_a_worker_process_trains_run_after_run(runs_per_worker, fake_data, tmp_path):
    # Three runs on two workers: by default each worker is one process for the whole sweep, so
    # three runs need two processes (one of them trains two runs, having imported torch once);
    # with --runs_per_worker 1 every run has a process of its own. Each run's record is its own.
    config = write_sweep(tmp_path / "reuse.yaml", fake_data, {"model.norm": ["bn", "gn", "brn"]})
    spec = yaml.safe_load(config.read_text())
    spec["overrides"].update({"trainer.max_epochs": 1, "trainer.limit_train_batches": 1, "trainer.num_sanity_val_steps": 0,
                              "trainer.callbacks": [{"class_path": "thread_probe.ThreadProbe"}]})  # fmt: skip
    config.write_text(yaml.safe_dump(spec))
    extra = [] if runs_per_worker is None else ["--runs_per_worker", str(runs_per_worker)]
    main(["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--workers", "2", *extra])
    runs = sorted((tmp_path / "out" / "reuse" / "lightning_logs").glob("*/version_0"))
    assert [r.parent.name for r in runs] == ["bn", "brn", "gn"]
    pids, cores_of = [], {}
    cores = cpu_cores()
    threads = max(1, len(cores) // 2)  # the cores shared out between the two workers
    for run in runs:
        record = json.loads((run / "metrics.json").read_text())
        probe = json.loads((run / "threads.json").read_text())
        assert record["status"] == "finished" and record["config"]["model"]["norm"] == run.parent.name
        assert record["attempts"][0]["pid"] == probe["pid"] != os.getpid()
        assert record["hardware"].endswith(threads_said(threads)), record["hardware"]
        assert probe["intra_op"] == probe["inter_op"] == threads, probe
        assert probe["env"] == {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if hasattr(os, "sched_setaffinity"):
            assert len(probe["cores"]) == threads and set(probe["cores"]) <= set(cores), probe
        cores_of.setdefault(probe["pid"], set()).update(probe["cores"])
        pids.append(probe["pid"])
    assert len(set(pids)) == (2 if runs_per_worker is None else 3), pids
    if hasattr(os, "sched_setaffinity") and len(cores) >= 2 and runs_per_worker is None:
        # The two workers ran on cores of their own, not on each other's.
        first, second = cores_of.values()
        assert not first & second, cores_of


def test_sweep_help_shows_threads_per_run(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--threads_per_run THREADS_PER_RUN torch threads per run, each pinned to cores of its own on CPU" in text


def test_a_diverging_run_stops_is_recorded_and_the_sweep_goes_on(fake_data, tmp_path, capsys):
    grid = {"lr": {"ok": {"model.optimizer.init_args.lr": 0.001}, "huge": {"model.optimizer.init_args.lr": 1.0e30}}}
    config = write_sweep(tmp_path / "div.yaml", fake_data, grid)
    overrides = yaml.safe_load(config.read_text())
    overrides["overrides"].update({"model.norm": "none", "trainer.limit_train_batches": 8, "trainer.max_epochs": 3})
    config.write_text(yaml.safe_dump(overrides))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--workers", "1"])
    assert exit_info.value.code == 1
    found = records(tmp_path / "out" / "div")
    ok, huge = found["ok"][0], found["huge"][0]
    assert f"sweep: huge diverged at step {huge['diverged_at_step']}" in capsys.readouterr().err.splitlines()
    assert ok["status"] == "finished" and ok["global_step"] == 24
    assert huge["status"] == "diverged"
    # It stopped at the first non-finite loss (checked every step on CPU), not at the end.
    assert huge["global_step"] == huge["diverged_at_step"] + 1 < 24
    main(["report", str(tmp_path / "out" / "div")])
    assert "1 diverged" in (tmp_path / "out" / "div" / "report" / "report.md").read_text()


# Slow (10 s); test_packed.py checks packed runs against the same runs alone by default.
@pytest.mark.slow
def test_packed_sweep_runs_equal_the_same_runs_alone(fake_data, tmp_path):
    grid = {"model.norm": ["gn", "bnrs"], "seed_everything": [0, 1]}
    config = write_sweep(tmp_path / "pack.yaml", fake_data, grid)
    spec = yaml.safe_load(config.read_text())
    # SGD with momentum: equal up to float order, which vmap's batched convolutions change and bnrs
    # (normalizing by lagging running statistics) amplifies to ~3e-4 in two epochs; gn stays
    # within 2e-5. See test_packed.py for why not Adam with a batch-mean-subtracting norm.
    spec["overrides"].update({"model.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
                              "model.channels_last": False, "trainer.limit_train_batches": 3, "model.norm_kwargs": {}})  # fmt: skip
    config.write_text(yaml.safe_dump(spec))
    main(["sweep", "--config", str(config), "--output", str(tmp_path / "alone"), "--pack", "false", "--workers", "1"])
    main(["sweep", "--config", str(config), "--output", str(tmp_path / "packed"), "--pack", "true", "--workers", "1"])
    alone, packed = records(tmp_path / "alone" / "pack"), records(tmp_path / "packed" / "pack")
    assert sorted(alone) == sorted(packed) and len(alone) == 4
    for name in alone:
        (a,), (p,) = alone[name], packed[name]
        assert a["status"] == p["status"] == "finished" and a["global_step"] == p["global_step"] == 6
        assert p["packed"]["runs"] == [name.rsplit("_", 1)[0] + f"_seed{i}" for i in (0, 1)] and "packed" not in a
        assert p["seed"] == a["seed"]
        assert len(a["epochs"]) == len(p["epochs"]) == 2
        for ea, ep in zip(a["epochs"], p["epochs"], strict=True):
            assert ea.keys() == ep.keys(), name
            for key, value in ea.items():
                assert ep[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (name, key)
        assert a["config"]["model"] == p["config"]["model"]
    # The seeds really differ: the runs of one pack are not copies of each other.
    assert packed["gn_seed0"][0]["epochs"][-1]["train/loss"] != packed["gn_seed1"][0]["epochs"][-1]["train/loss"]


def _close(a, b, where) -> None:
    """Two record values equal up to float order: numbers within rel 1e-3 (abs 1e-5), the rest exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], (*where, key))
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, (*where, i))
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5), where
    else:
        assert a == b, where


def test_a_packed_sweep_at_the_shipped_memory_format_writes_what_the_runs_alone_write(fake_data, tmp_path):
    # channels_last as shipped (true): the pack must not hand vmap a channels-last tensor, whose
    # layout query vmap cannot answer (it failed on CUDA); each run alone trains channels-last.
    config = write_sweep(tmp_path / "pack.yaml", fake_data, {"seed_everything": [0, 1]})
    spec = yaml.safe_load(config.read_text())
    spec["overrides"].update({"model.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
                              "trainer.log_every_n_steps": 1})  # fmt: skip
    config.write_text(yaml.safe_dump(spec))
    for pack in ("false", "true"):
        main(["sweep", "--config", str(config), "--output", str(tmp_path / pack), "--pack", pack, "--workers", "1"])
    logs = {pack: tmp_path / pack / "pack" / "lightning_logs" for pack in ("false", "true")}
    alone, packed = records(tmp_path / "false" / "pack"), records(tmp_path / "true" / "pack")
    assert sorted(alone) == sorted(packed) == ["seed0", "seed1"]
    for name in alone:
        (a,), (p,) = alone[name], packed[name]
        assert a["config"]["model"]["channels_last"] is p["config"]["model"]["channels_last"] is True
        assert p["packed"] == {"runs": ["seed0", "seed1"], "index": int(name[-1])} and "packed" not in a
        # One record, one schema: every field a run alone writes, with the same values.
        assert set(p) - {"packed"} == set(a) - {"attempts"} | {"attempts"} & set(p), set(a) ^ set(p)
        for key in ("status", "seed", "global_step", "lr", "layout", "hardware"):
            assert p[key] == a[key], key
        for key in ("model", "data", "budget", "seed_everything"):  # the rest names each sweep's folder
            assert p["config"][key] == a["config"][key], key
        assert [s for s, _ in p["train_loss_steps"]] == [s for s, _ in a["train_loss_steps"]] == [0, 1, 2, 3]
        for key in ("epochs", "evals", "train_loss_steps", "val_acc_best", "val_acc_final"):
            _close(a[key], p[key], (name, key))
        # The HPARAMS tab: the same settings (hparams.yaml) and figures for the run.
        hparams = [yaml.safe_load((logs[pack] / name / "version_0" / "hparams.yaml").read_text()) for pack in logs]
        assert hparams[0] == hparams[1] and hparams[1]["seed"] == a["seed"], hparams
        for run in (logs[pack] / name / "version_0" for pack in logs):
            assert {"hparams/val_acc_best", "hparams/val_acc_final", "train/loss_step"} <= set(
                EventAccumulator(str(run)).Reload().Tags()["scalars"]
            ), run
    assert packed["seed0"][0]["epochs"][-1]["train/loss"] != packed["seed1"][0]["epochs"][-1]["train/loss"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"model.lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}}},
         "model.lr_scheduler=torch.optim.lr_scheduler.StepLR"),
        ({"trainer.gradient_clip_val": 1.0}, "trainer.gradient_clip_val=1.0"),
        ({"trainer.accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches=2"),
        ({"trainer.callbacks": [{"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                                 "init_args": {"monitor": "val/acc"}}]}, "trainer.callbacks: lightning.pytorch.callbacks.EarlyStopping"),
        ({"trainer.devices": 2}, "trainer.devices=2 and trainer.num_nodes=1"),
        ({"model.compile": True}, "model.compile=true"),
        ({"model.compile": "reduce-overhead"}, "model.compile=reduce-overhead"),
    ],
    ids=["lr_scheduler", "gradient_clip_val", "accumulate_grad_batches", "callback", "devices", "compile",
         "compile_mode"],
)  # fmt: skip
def test_a_pack_refuses_a_setting_it_would_not_apply(fake_data, tmp_path, capsys, override, named):
    config = write_sweep(tmp_path / "pack.yaml", fake_data, {"seed_everything": [0, 1]})
    spec = yaml.safe_load(config.read_text())
    spec["overrides"].update(override)
    config.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(config), "--output", str(tmp_path / "out"), "--pack", "true"])
    assert exit_info.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("normbench: error:")]
    assert "run seed0 sets " + named in line and "--pack false" in line, line
    assert not (tmp_path / "out" / "pack" / "lightning_logs").exists()  # nothing ran


def test_packing_is_opt_in_even_with_a_gpu(fake_data, tmp_path, monkeypatch):
    import torch

    from normbench import sweep as sweep_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    seen = []
    monkeypatch.setattr(sweep_module, "run_local", lambda cells, workers, gpus, pack=False, **_: seen.append(pack))
    config = write_sweep(tmp_path / "s.yaml", fake_data, {"seed_everything": [0, 1]})
    main(["sweep", "--config", str(config), "--output", str(tmp_path / "out")])
    assert seen == [False]


def test_a_dry_run_into_a_pipe_whose_reader_has_gone_ends_quietly(fake_data, tmp_path):
    # `normbench sweep --dry-run | head -1`: head exits after its line. The sweep ends as a Unix
    # tool that SIGPIPE stops does, status 141 and nothing on stderr, not with a traceback. The
    # pipe's reader is closed before the sweep starts, so every write fails, none by chance, and
    # output unbuffered makes the first print fail, as the print that fills Python's 8 KiB
    # buffer does in a long dry run (a short one fails only as it is flushed at the exit).
    config = write_sweep(tmp_path / "two.yaml", fake_data, {"model.norm": ["bn", "gn"]})
    cmd = [sys.executable, "-m", "normbench", "sweep", "--config", str(config), "--output", str(tmp_path), "--dry-run"]
    reader, writer = os.pipe()
    os.close(reader)
    try:
        env = {**_env(), "PYTHONUNBUFFERED": "1"}
        done = subprocess.run(cmd, stdout=writer, stderr=subprocess.PIPE, env=env, text=True, timeout=120, check=False)
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (141, "")


def test_ctrl_c_as_a_run_is_set_up_is_recorded_as_interrupted_and_said_in_its_log(tmp_path, monkeypatch):
    # Ctrl-C before Lightning's fit loop starts (the CLI parsing, the data loading) reaches no
    # recorder: the sweep itself records the run as interrupted, not as running.
    from normbench import runner

    (cell,) = expand({"model.norm": ["bn"]}, BASE, {}, tmp_path / "s")

    def setting_up(args):
        print("set up so far")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_cli", setting_up)
    with pytest.raises(KeyboardInterrupt):
        runner.run_cell(cell)
    record = json.loads((Path(cell.run_dir) / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["attempts"][-1]["ended"] >= record["attempts"][-1]["started"]
    log = (tmp_path / "s" / "logs" / "bn.log").read_text().splitlines()
    assert log[0].startswith("== normbench sweep: bn, from the start, ") and log[1:] == ["set up so far"]


# Two sweep processes, 13 s on 2 cores; with -m slow. A fit's Ctrl-C (test_recorder) and a
# killed run's resume (test_resume) are checked in the default suite.
@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_the_next_run_of_it_resumes(fake_data, tmp_path):
    cmd = _stopped_sweep(fake_data, tmp_path, "killer.InterruptAtStep")
    first = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, check=False,
                           preexec_fn=killer.terminal_job)  # fmt: skip
    assert first.returncode == 130, first.stderr[-2000:]
    assert "run the same command again to resume" in first.stderr.splitlines()[-1]
    found = records(tmp_path / "out" / "mid")
    assert sorted(found) == ["bn"] and found["bn"][0]["status"] == "interrupted"  # gn never started

    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    found = records(tmp_path / "out" / "mid")
    assert {n: rs[0]["status"] for n, rs in found.items()} == {"bn": "finished", "gn": "finished"}
    assert [a["resumed"] for a in found["bn"][0]["attempts"]] == [False, True]
    assert found["bn"][0]["global_step"] == 12 and len(found["bn"][0]["epochs"]) == 2


# Slow (35 s: two sweeps, each starting two worker processes).
@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_of_workers_and_the_next_run_of_it_resumes(fake_data, tmp_path):
    # The default layout on 2+ cores: bn and gn train at once in two worker processes, brn waits.
    # Ctrl-C reaches the sweep and both workers: both runs are recorded as interrupted, brn
    # never starts, and the next sweep resumes the two and runs brn, each exactly once.
    if len(cpu_cores()) < 2:
        pytest.skip("one core: --workers auto runs one run at a time here (the test above)")
    marker = tmp_path / "ctrl_c"
    overrides = {**quick_overrides(fake_data), "trainer.limit_train_batches": 6, "checkpoint_every_n_steps": 4,
                 # Ctrl-C once both runs are past step 5, so that each has its step-4 checkpoint: a run
                 # still before it (the second worker starts later) would resume from nothing.
                 "trainer.callbacks": [{"class_path": "killer.CtrlCAtStep",
                                        "init_args": {"step": 9, "marker": str(marker), "runs": 2,
                                                      "ready_step": 5}}]}  # fmt: skip
    config = tmp_path / "cc.yaml"
    config.write_text(
        yaml.safe_dump({"base": BASE, "overrides": overrides, "grid": {"model.norm": ["bn", "gn", "brn"]}})
    )
    cmd = [sys.executable, "-m", "normbench", "sweep", "--config", str(config), "--output", str(tmp_path / "out")]
    # A session of its own, as a terminal's foreground job: the Ctrl-C reaches only the sweep.
    run = {
        "env": _env(),
        "capture_output": True,
        "text": True,
        "timeout": 300,
        "start_new_session": True,
        "preexec_fn": killer.terminal_job,
    }
    first = subprocess.run(cmd, check=False, **run)
    assert first.returncode == 130, first.stderr[-2000:]
    assert "2 worker processes" in first.stderr
    found = records(tmp_path / "out" / "cc")
    assert {n: rs[0]["status"] for n, rs in found.items()} == {"bn": "interrupted", "gn": "interrupted"}

    second = subprocess.run(cmd, check=False, **run)
    assert second.returncode == 0, second.stderr[-2000:]
    found = records(tmp_path / "out" / "cc")
    assert sorted(found) == ["bn", "brn", "gn"]
    for name, (record,) in found.items():
        assert record["status"] == "finished" and record["global_step"] == 12, name
        assert [e["epoch"] for e in record["epochs"]] == [0, 1], name
        assert [a["resumed"] for a in record["attempts"]] == ([False] if name == "brn" else [False, True]), name


# --------------------------------------------------------------------------- devices


def _attempt_spans(sweep_dir: Path) -> dict[str, tuple[str | None, float, float]]:
    """Run name -> (CUDA_VISIBLE_DEVICES its process had, start, end) of its one attempt."""
    spans = {}
    for name, (record,) in records(sweep_dir).items():
        assert record["status"] == "finished", (name, record.get("error"))
        (attempt,) = record["attempts"]
        spans[name] = (attempt["visible_devices"], attempt["started"], attempt["ended"])
    return spans


def _overlap(a: tuple, b: tuple) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def test_a_worker_owns_its_gpu_before_the_run_starts(fake_data, tmp_path, monkeypatch):
    # What a worker process does with its slot, here in this process: the run's own callback
    # sees the slot's GPU as its CUDA_VISIBLE_DEVICES, and its config still says one device.
    # (The worker processes themselves are test_parallel_workers_share_the_cores_...)
    from normbench import backends, sweep, workers

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # put back after the test
    config = write_sweep(tmp_path / "gpus.yaml", fake_data, {"model.norm": ["bn"]})
    spec = yaml.safe_load(config.read_text())
    spec["overrides"].update({"trainer.max_epochs": 1, "trainer.limit_train_batches": 1,
                              "trainer.num_sanity_val_steps": 0,
                              "trainer.callbacks": [{"class_path": "thread_probe.ThreadProbe"}]})  # fmt: skip
    config.write_text(yaml.safe_dump(spec))
    (cell,) = sweep.sweep(["--config", str(config), "--output", str(tmp_path / "out"), "--dry_run"])
    slots = workers.gpu_slots(workers=4, gpus=2)
    assert [slot.gpu for slot in slots] == ["0", "1", "0", "1"]  # the visible GPUs in turn, --gpus of them
    backends._run_group_in_slot([asdict(cell)], slots[1])
    run = Path(cell.run_dir)
    probe = json.loads((run / "threads.json").read_text())
    record = json.loads((run / "metrics.json").read_text())
    assert probe["cuda_visible_devices"] == record["attempts"][0]["visible_devices"] == "1"
    assert record["status"] == "finished"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["devices"] == 1


def test_runs_go_to_the_worker_that_is_free(monkeypatch):
    # The scheduling alone, with threads for processes: the first run is long, so the second
    # worker, free first, takes the third and the fourth run.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from normbench import backends
    from normbench.grid import Cell

    seconds = {"long": 1.0, "a": 0.05, "b": 0.05, "c": 0.05}
    ran: list[tuple[str, str, float, float]] = []
    lock = threading.Lock()

    def fake_slot(cells, slot):
        start = time.time()
        time.sleep(seconds[cells[0]["values"]["model.norm"]])
        with lock:
            ran.append(("+".join(c["name"] for c in cells), slot.gpu, start, time.time()))
        return ["finished"] * len(cells)

    monkeypatch.setattr(backends, "_run_group_in_slot", fake_slot)
    monkeypatch.setattr(backends, "ProcessPoolExecutor", lambda n, **_: ThreadPoolExecutor(n))
    # Two seeds of each: with --pack, one pack per norm, handed to one worker whole.
    cells = [Cell(i, f"{norm}_seed{seed}", {"model.norm": norm, "seed_everything": seed}, [], "/none")
             for i, (norm, seed) in enumerate((n, s) for n in seconds for s in (0, 1))]  # fmt: skip
    backends.run_local(cells, workers=2, gpus=2, pack=True)
    gpu = {name: g for name, g, _, _ in ran}
    assert gpu == {"long_seed0+long_seed1": "0", "a_seed0+a_seed1": "1", "b_seed0+b_seed1": "1",
                   "c_seed0+c_seed1": "1"}, ran  # fmt: skip
    for x in ran:
        for y in ran:
            if x is not y and x[1] == y[1]:
                assert x[3] <= y[2] or y[3] <= x[2], (x, y)  # one run at a time per GPU


def test_a_grid_of_norms_keeps_the_bases_options_each_takes_and_checks_the_rest_before_running(fake_data, tmp_path):
    base = mnist_config("gn", 16)  # norm_kwargs {num_groups: 4}
    overrides = {"data.data_dir": str(fake_data), "trainer.accelerator": "cpu"}
    validate(expand({"model.norm": ["gn", "brn", "dyt"]}, base, overrides, tmp_path))
    # Options given with the norm are its own: a wrong one stops the sweep, though its cell is
    # not the first (the one the check instantiates).
    given = {"gn": {"model.norm": "gn"}, "brn": {"model.norm": "brn", "model.norm_kwargs": {"num_groups": 4}}}
    with pytest.raises(ValueError, match=r"^sweep run brn \(model.norm=brn, model.norm_kwargs=\{num_groups: 4\}\): "
                                         r"norm 'brn' has no option 'num_groups'.*; fix the sweep's grid"):  # fmt: skip
        validate(expand({"norm": given}, base, overrides, tmp_path))


def test_the_every_norm_sweep_has_every_norm_that_trains_from_scratch():
    # frozen_bn, fresh, is the identity up to eps (the network of none): the one norm left out.
    grid = yaml.safe_load((ROOT / "configs" / "sweeps" / "every_norm.yaml").read_text())["grid"]
    assert {variant["model.norm"] for variant in grid["norm"].values()} == set(NORMS) - {"frozen_bn"}


def _one_cell(tmp_path):
    (cell,) = expand({"model.norm": ["gn"]}, BASE, {}, tmp_path / "sweep")
    return cell


def test_a_cell_finished_by_another_process_after_the_todo_list_is_not_run_again(tmp_path, monkeypatch):
    # Guards run_cell's check of the status once it holds
    # the claim, `if status in DONE: return status`, dropped. The sweep's todo list is made
    # before the claims; a cell another sweep process finished in between must be left as it is
    # (the mutated code cleared its run directory and trained it again).
    import json

    from normbench import runner

    cell = _one_cell(tmp_path)
    run_dir = tmp_path / "sweep" / "lightning_logs" / cell.name / "version_0"
    assert cell.run_dir == str(run_dir)
    run_dir.mkdir(parents=True)
    finished = {"status": "finished", "global_step": 7, "attempts": [{"pid": 1}]}
    (run_dir / "metrics.json").write_text(json.dumps(finished))
    (run_dir / "kept.txt").write_text("the other process's output")

    def no_run(args):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(runner, "run_cli", no_run)
    assert runner.run_cell(cell) == "finished"
    assert json.loads((run_dir / "metrics.json").read_text()) == finished
    assert (run_dir / "kept.txt").read_text() == "the other process's output"


def test_a_cell_claimed_by_another_process_is_left_to_it(tmp_path, monkeypatch):
    # The claim (a POSIX lock on claims/<cell>.lock) is checked by -m slow tests only
    # (two sweep processes); dropping the refusal of a held lock (`except OSError: yield False`)
    # passes the default suite. A forked process holds the claim; this one must leave the cell.
    import multiprocessing as mp

    from normbench import runner

    cell = _one_cell(tmp_path)
    ctx = mp.get_context("fork")
    held, release = ctx.Event(), ctx.Event()

    def holder():
        with runner.claim(cell) as ours:
            assert ours
            held.set()
            release.wait(60)

    proc = ctx.Process(target=holder)
    proc.start()
    try:
        assert held.wait(60)
        monkeypatch.setattr(runner, "run_cli", lambda args: pytest.fail("a claimed cell was run"))
        with runner.claim(cell) as ours:
            assert ours is False
        assert runner.run_cell(cell) == "claimed"
        assert cell.status() == "pending"  # nothing written for it
    finally:
        release.set()
        proc.join(60)
    assert proc.exitcode == 0
    with runner.claim(cell) as ours:  # the holder gone, its lock went with it
        assert ours is True
