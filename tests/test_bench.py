"""normbench bench and the study's loop it ships (normbench.baseline): it works without the
shared folder, and the loop is the study's, module for module."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from normbench import baseline, bench, bench_sections, bench_tools
from normbench.main import main
from normbench.results import cpu_cores

ROOT = Path(__file__).resolve().parents[1]
SEED_LOOP = ROOT.parent / "shared" / "bench" / "seed_loop.py"


def test_the_shipped_loop_builds_the_studys_network_module_for_module():
    if not SEED_LOOP.is_file():
        pytest.skip(f"the study's loop is not at {SEED_LOOP}")
    spec = importlib.util.spec_from_file_location("seed_loop", SEED_LOOP)
    seed_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed_loop)
    for norm in ("batch", "group"):
        torch.manual_seed(0)
        theirs = seed_loop.Network(3, norm, 1, 10, 16)
        torch.manual_seed(0)
        ours = baseline.StudyNetwork(3, norm, 1, 10, 16)
        a, b = theirs.state_dict(), ours.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        x = torch.randn(4, 1, 12, 12)
        torch.testing.assert_close(ours(x), theirs(x))
    assert sorted(baseline.DATASETS) == sorted(seed_loop.DATASETS)


def test_the_shipped_loop_trains_and_prints_its_json_line(fake_data, capsys):
    out = baseline.main(["--dataset", "mnist", "--data-dir", str(fake_data), "--batch-size", "16", "--epochs", "1",
                         "--train-subset", "64", "--test-subset", "32", "--num-workers", "0", "--width", "8"])  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["epochs"] == 1 and out["images_per_s"] > 0 and 0 <= out["best_test_acc"] <= 100


# 16 s on 2 cores (it times the study's loop, a shipped run and a bare one as processes); with
# -m slow. test_bench_runs_the_shipped_config_as_it_is checks its commands in the default suite.
@pytest.mark.slow
def test_bench_needs_nothing_outside_the_package(fake_data, tmp_path, monkeypatch, capsys):
    # As for a user who installed normbench: no ../shared folder beside it, no configs/ folder.
    monkeypatch.chdir(tmp_path)
    rows = bench.bench(["--data_dir", str(fake_data), "--sections", "[runs, pack]", "--batch_sizes", "[16]",
                 "--train_subset", "64", "--test_subset", "32", "--repeats", "1",
                 "--pack", "2", "--pack_steps", "2", "--pack_batch_size", "4"])  # fmt: skip
    out = capsys.readouterr().out
    (run,) = rows["runs"]
    assert run["seed_loop_s"] > 0 and run["shipped_s"] > 0 and run["bare_s"] > 0
    # The shipped run's record states what its diagnostics took, a part of the whole process.
    assert 0 < run["diagnostics_s"] < run["shipped_s"]
    assert run["ratio_shipped"] == round(run["seed_loop_s"] / run["shipped_s"], 2)
    row = next(line for line in out.splitlines() if line.startswith("| 16 |"))
    assert f"{run['ratio_shipped']:.2f}x" in row and f"{run['ratio_bare']:.2f}x" in row
    assert rows["pack"][0]["packed"] > 0


def test_bench_runs_the_shipped_config_as_it_is(tmp_path):
    # The config it runs is the committed file, byte for byte.
    for bs in (2, 16, 128):
        written = bench_tools.shipped_config(tmp_path, "bn", bs)
        assert written.read_text() == (ROOT / "configs" / written.name).read_text()
    cmd = bench_tools.normbench_cmd(written, tmp_path, tmp_path, 10000, 2000)
    assert cmd[cmd.index("--config") + 1] == str(written) and "--trainer.callbacks" not in cmd
    assert cmd[cmd.index("--data.test_subset") + 1] == "2000"


def test_bench_rejects_an_unknown_section():
    with pytest.raises(ValueError, match="unknown bench section 'speed'; choose from runs, overhead"):
        bench.bench(["--sections", "[speed]"])


@pytest.mark.slow
def test_bench_grid_overhead_and_compile_sections_run(fake_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = bench.bench(["--data_dir", str(fake_data), "--sections", "[overhead, grid, compile]", "--batch_sizes", "[16]",
                        "--train_subset", "64", "--test_subset", "32", "--overhead_batch_sizes", "[64]",
                        "--grid_batch_sizes", "[16]", "--grid_seeds", "1", "--grid_train_subset", "64",
                        "--grid_test_subset", "32"])  # fmt: skip
    # The loop's row, then one per layout the bench defines for this machine's cores, each with
    # every run of the grid finished: norms x batch sizes x seeds.
    layouts = bench_sections.grid_layouts(len(cpu_cores()))
    grid_runs = len(bench_sections.GRID_NORMS) * 1 * 1
    assert len(rows["grid"]) == 1 + len(layouts)
    assert [(r["workers"], r["threads"], r["runs_per_worker"]) for r in rows["grid"][1:]] == layouts
    assert [r["runs"] for r in rows["grid"]] == [grid_runs] * (1 + len(layouts))
    assert all(r["seconds"] > 0 and r["ratio"] == round(rows["grid"][0]["seconds"] / r["seconds"], 2)
               for r in rows["grid"])  # fmt: skip
    assert 0 < rows["overhead"][0]["share"] < 1
    assert rows["compile"][0]["compile_cold_s"] > 0


def test_bench_help_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0 and "--seed_loop" in capsys.readouterr().out


def test_the_step_section_times_both_steps_on_this_device(tmp_path, monkeypatch, capsys):
    from normbench import bench_steps

    monkeypatch.chdir(tmp_path)
    rows = bench.bench(["--data_dir", str(tmp_path / "none"), "--sections", "[step]", "--batch_sizes", "[2, 4]",
                        "--step_steps", "2", "--repeats", "2"])["step"]  # fmt: skip
    assert [r["batch_size"] for r in rows] == [2, 4] and {r["device"] for r in rows} == {"cpu"}
    for r in rows:
        assert r["study_range_ms"][0] <= r["study_ms"] <= r["study_range_ms"][1]
        assert r["normbench_range_ms"][0] <= r["normbench_ms"] <= r["normbench_range_ms"][1]
        assert r["ratio"] == round(r["study_ms"] / r["normbench_ms"], 2)
    assert "| 4 |" in capsys.readouterr().out
    # normbench's step is the module the shipped config builds, and it trains: the optimizer
    # moves the weights and the norms' running statistics move.
    config = bench_tools.shipped_config(tmp_path, "bn", 4)
    step, module = bench_steps.normbench_step(config, 4, torch.device("cpu"))
    assert module.memory_format == torch.channels_last and module.hparams.width == 64
    before = {k: v.clone() for k, v in module.state_dict().items()}
    step()
    moved = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert "net.blocks.0.norm.running_mean" in moved and "net.fc.weight" in moved


def test_on_cuda_the_step_section_also_times_the_captured_step(tmp_path, monkeypatch, capsys):
    from normbench import bench_steps

    assert list(bench_steps.step_kinds(torch.device("cpu"))) == ["study", "normbench"]
    assert bench_steps.step_kinds(torch.device("cuda")) == {"study": False, "normbench": False,
                                                            "captured": "reduce-overhead"}  # fmt: skip
    # The CUDA table on this CPU: the captured step runs eagerly here, so only its plumbing is
    # checked; each step is the module built with its own --model.compile.
    built = []
    step_kinds, normbench_step = bench_steps.step_kinds, bench_steps.normbench_step

    def recorded_step(*args):
        step, module = normbench_step(*args)
        built.append(module.net_call.compile)
        return step, module

    monkeypatch.setattr(bench_steps, "step_kinds", lambda device: step_kinds(torch.device("cuda")))
    monkeypatch.setattr(bench_steps, "normbench_step", recorded_step)
    monkeypatch.chdir(tmp_path)
    (row,) = bench.bench(["--data_dir", str(tmp_path / "none"), "--sections", "[step]", "--batch_sizes", "[2]",
                          "--step_steps", "2", "--repeats", "2"])["step"]  # fmt: skip
    assert built == [False, "reduce-overhead"]
    assert row["captured_range_ms"][0] <= row["captured_ms"] <= row["captured_range_ms"][1]
    assert row["captured_ratio"] == round(row["study_ms"] / row["captured_ms"], 2)
    out = capsys.readouterr().out
    assert "normbench reduce-overhead ms" in out and f"{row['captured_ratio']:.2f}x |" in out


def test_without_sections_a_gpu_machine_runs_the_gpu_section(tmp_path, monkeypatch):
    ran = []
    for name in ("bench_runs", "bench_step", "bench_pack", "bench_overhead", "bench_grid"):
        monkeypatch.setattr(bench, name, lambda *a, name=name, **k: ran.append(name) or [])
    monkeypatch.setattr(bench, "prepare_mnist", lambda *a: True)
    monkeypatch.setattr(bench, "machine", lambda: "a machine")
    bench.bench(["--data_dir", str(tmp_path)])
    assert ran == ["bench_runs", "bench_overhead", "bench_grid"]  # this CPU: as before
    ran.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    bench.bench(["--data_dir", str(tmp_path)])
    assert ran == ["bench_runs", "bench_step", "bench_pack"]
