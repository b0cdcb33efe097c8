"""``normbench bench``'s sections that time whole sweeps and their layouts (``grid``), compiled
against eager runs (``compile``) and packed runs against the same runs one after another
(``pack``)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from normbench.bench_tools import (
    bench_device,
    normbench_cmd,
    print_table,
    seed_loop_cmd,
    shipped_config,
    timed,
)
from normbench.loaders import InMemoryLoader, PackedLoader
from normbench.module import NormBenchModule
from normbench.packed_runs import PackedRuns, packed_loss
from normbench.results import cpu_cores, read_record

GRID_NORMS = {
    "bn": {"loop": "batch", "sweep": {"model.norm": "bn"}},
    "gn": {"loop": "group", "sweep": {"model.norm": "gn", "model.norm_kwargs": {"num_groups": 4}}},
}


def grid_layouts(cores: int) -> list[tuple[int, int, int | None]]:
    """The sweep layouts the grid section times, as (workers, threads per run, runs per worker;
    None: one process per worker for the whole grid): all cores' threads in one worker, then on
    a machine of several cores one single-thread worker per core (the default), and the same
    with a fresh process per run."""
    if cores == 1:
        return [(1, 1, None)]
    return [(1, cores, None), (cores, 1, None), (cores, 1, 1)]


def bench_grid(cfg, data_dir: Path, work: Path, script: Path | None) -> list[dict]:
    """The study grid by ``normbench sweep`` at each of ``grid_layouts``, and by the study's loop;
    a row per layout, the loop's first, each with the runs that finished."""
    cores = len(cpu_cores())
    seeds = list(range(cfg.grid_seeds))
    cells = [(GRID_NORMS[n]["loop"], bs, s) for n in GRID_NORMS for bs in cfg.grid_batch_sizes for s in seeds]
    start = time.perf_counter()
    for norm, bs, seed in cells:
        timed(seed_loop_cmd(script, data_dir, bs, cfg.grid_train_subset, cfg.grid_test_subset, norm, seed))
    rows = [{"layout": "study's loop, one run after another", "runs": len(cells),
             "seconds": round(time.perf_counter() - start, 1)}]  # fmt: skip
    base = shipped_config(work, "bn", cfg.grid_batch_sizes[0])
    overrides = {"dataset": "mnist", "data.data_dir": str(data_dir), "data.train_subset": cfg.grid_train_subset,
                 "data.test_subset": cfg.grid_test_subset, "trainer.max_epochs": 1}  # fmt: skip
    grid = {"norm": {n: GRID_NORMS[n]["sweep"] for n in GRID_NORMS}, "data.batch_size": cfg.grid_batch_sizes,
            "seed_everything": seeds}  # fmt: skip
    for workers, threads, runs_per_worker in grid_layouts(cores):
        out = work / f"grid_{workers}x{threads}_{runs_per_worker}"
        cmd = [sys.executable, "-m", "normbench", "sweep", "--base", str(base), "--overrides", json.dumps(overrides),
               "--grid", json.dumps(grid), "--workers", str(workers), "--threads_per_run", str(threads),
               "--output", str(out), "--name", "grid"]  # fmt: skip
        cmd += ["--runs_per_worker", str(runs_per_worker)] if runs_per_worker else []
        seconds = timed(cmd)
        finished = sum(read_record(f.parent).get("status") == "finished" for f in out.rglob("metrics.json"))
        how = ("" if workers == 1 else ", a fresh process per run" if runs_per_worker == 1
               else ", each worker one process for the grid (the default)")  # fmt: skip
        rows.append({"layout": f"normbench sweep, {workers} worker(s) x {threads} thread(s){how}", "runs": finished,
                     "seconds": round(seconds, 1), "workers": workers, "threads": threads,
                     "runs_per_worker": runs_per_worker})  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
    for r in rows:
        r["ratio"] = round(rows[0]["seconds"] / r["seconds"], 2)
    print_table(
        f"Grid: bn and gn x batch sizes {cfg.grid_batch_sizes} x {len(seeds)} seeds, {cfg.grid_train_subset} training "
        f"and {cfg.grid_test_subset} test images each, whole grid (ratio = the loop's seconds / this layout's)",
        ["layout", "runs", "seconds", "ratio"],
        [[r["layout"], str(r["runs"]), f"{r['seconds']:.1f}", f"{r['ratio']:.2f}x"] for r in rows],
    )  # fmt: skip
    return rows


def bench_compile(cfg, data_dir: Path, work: Path) -> list[dict]:
    """Shipped eager against shipped with ``--model.compile true``, cold cache then warm."""
    rows = []
    for bs in cfg.batch_sizes:
        config = shipped_config(work, "bn", bs)
        cache = work / f"inductor_cache_bs{bs}"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        row: dict = {"batch_size": bs}
        for kind, extra in (("eager", []), ("compile_cold", ["--model.compile", "true"]),
                            ("compile_warm", ["--model.compile", "true"])):  # fmt: skip
            root = work / f"compile_bs{bs}_{kind}"
            row[f"{kind}_s"] = round(
                timed(normbench_cmd(config, data_dir, root, cfg.train_subset, cfg.test_subset, *extra), env=env), 1
            )
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        row["ratio_cold"] = round(row["eager_s"] / row["compile_cold_s"], 2)
        row["ratio_warm"] = round(row["eager_s"] / row["compile_warm_s"], 2)
        rows.append(row)
    print_table(
        f"--model.compile true, shipped config, {cfg.train_subset} training / {cfg.test_subset} test images, whole "
        "process (ratio = eager seconds / compiled)",
        ["batch size", "eager s", "compiled, empty cache s", "compiled, warm cache s", "ratio cold", "ratio warm"],
        [[str(r["batch_size"]), f"{r['eager_s']:.1f}", f"{r['compile_cold_s']:.1f}", f"{r['compile_warm_s']:.1f}",
          f"{r['ratio_cold']:.2f}x", f"{r['ratio_warm']:.2f}x"] for r in rows],
    )  # fmt: skip
    return rows


def packed_vs_sequential(
    images, targets, k: int, batch_size: int, steps: int, device: torch.device
) -> tuple[float, float]:
    """Images per second of K runs trained packed, and one after another, on the same engine."""
    images, targets = images.to(device), targets.to(device)
    in_ch = images.shape[1]

    def loader(seed):
        return InMemoryLoader(images, targets, batch_size, True, (0.5,) * in_ch, (0.5,) * in_ch, seed=seed)

    def nets():
        out = []
        for seed in range(k):
            torch.manual_seed(seed)
            out.append(NormBenchModule(norm="bn", in_channels=in_ch).net.to(device))
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train(step_fn, batches, n):
        for _ in range(n):
            step_fn(*next(batches))

    def timed_steps(step_fn, batches) -> float:
        train(step_fn, batches, warmup)  # one-time costs (kernel selection, allocator) untimed
        sync()
        start = time.perf_counter()
        train(step_fn, batches, steps)
        sync()
        return time.perf_counter() - start

    warmup = 10
    seconds = 0.0
    for seed, net in enumerate(nets()):
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)

        def step(x, y, net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()

        seconds += timed_steps(step, iter(loader(seed)))
    sequential = k * steps * batch_size / seconds
    packed = PackedRuns(nets()).to(device)
    popt = torch.optim.Adam(packed.parameters(), lr=1e-3)

    def packed_step(x, y):
        popt.zero_grad(set_to_none=True)
        packed_loss(packed(x), y)[0].backward()
        popt.step()

    packed_rate = k * steps * batch_size / timed_steps(packed_step, iter(PackedLoader([loader(s) for s in range(k)])))
    return packed_rate, sequential


def bench_pack(cfg, data_dir: Path, real: bool) -> list[dict]:
    device = bench_device()
    if real:
        from torchvision.datasets import MNIST

        ds = MNIST(str(data_dir), train=True)
        images, targets = ds.data[: cfg.train_subset].unsqueeze(1), ds.targets[: cfg.train_subset]
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (cfg.train_subset, 3, 32, 32), generator=g, dtype=torch.uint8)
        targets = torch.randint(0, 10, (cfg.train_subset,), generator=g)
    rates = [packed_vs_sequential(images, targets, cfg.pack, cfg.pack_batch_size, cfg.pack_steps, device)
             for _ in range(cfg.repeats)]  # fmt: skip
    ratios = [p / s for p, s in rates]
    packed, sequential = (statistics.median(r[i] for r in rates) for i in (0, 1))
    ratio = statistics.median(ratios)
    print(f"\npacked K={cfg.pack} at batch size {cfg.pack_batch_size} on {device.type}: {packed:.1f} img/s against "
          f"{sequential:.1f} img/s for {cfg.pack} runs one after another: {ratio:.2f}x "
          f"(median of {cfg.repeats}; {min(ratios):.2f}x to {max(ratios):.2f}x)")  # fmt: skip
    return [{"pack": cfg.pack, "batch_size": cfg.pack_batch_size, "device": device.type, "n": cfg.repeats,
             "packed": round(packed, 1), "sequential": round(sequential, 1), "ratio": round(ratio, 3),
             "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}]  # fmt: skip
