"""``normbench bench``: normbench as users run it, against the study's own training loop.

Every figure is a whole process, start-up included, timed from its launch to its exit, as a
user waits for it. normbench runs the shipped config (``configs/cifar10_bn_bs<B>.yaml``, study
2's experiment) as it is, diagnostics, checkpointing and sanity check included, with MNIST in
place of CIFAR-10 when only MNIST is there. The study's loop is ``normbench.baseline`` (or a
copy given with ``--seed_loop``). Sections (``--sections``):

- ``runs``: one epoch on ``train_subset`` training images with evaluation on the first
  ``test_subset`` test images, at each batch size: the study's loop, normbench ``shipped`` and
  normbench ``bare`` (diagnostics, checkpointing, sanity check and progress bar off), and the
  ratios (the loop's seconds over normbench's: above 1, normbench is faster).
- ``bf16``: the shipped config with ``--trainer.precision bf16-mixed`` beside the same runs
  (with ``runs`` one table: each repeat times the loop, shipped fp32, bare and bf16-mixed in turn).
- ``overhead``: the shipped config over one full epoch and the full test split, and the time
  its diagnostics took (``diagnostics.seconds`` in its run record) as a share of the process.
- ``grid``: a 12-run study grid (bn and gn, batch sizes 2 and 16, 3 seeds) by ``normbench
  sweep`` with 1 worker of all cores' threads, with one worker per core of one thread each (each
  worker one process for the whole grid), and the same with a fresh process per run, against the
  study's loop over the same grid one run after another.
- ``compile``: the shipped config with ``--model.compile true`` against eager, from an empty
  compile cache and again from the cache that run left.
- ``pack``: K packed runs against the same K runs one after another (steps only).

It prints a Markdown table per section, with the machine, and returns the rows.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser

from normbench.experiments import render_configs
from normbench.loaders import InMemoryLoader, PackedLoader
from normbench.module import NormBenchModule
from normbench.nets import PackedRuns, packed_loss
from normbench.report.tables import markdown_table
from normbench.results import cpu_cores, read_record

SECTIONS = ("runs", "overhead", "grid", "compile", "pack", "bf16")
BF16 = ["--trainer.precision", "bf16-mixed"]
# The CPU features that decide what bf16 can gain: AVX-512 BF16 converts and dot products,
# AMX's bf16 matrix tiles (what oneDNN's bf16 convolutions and matmuls need to beat fp32).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# What "bare" turns off: everything a shipped run does besides training and evaluating.
BARE = ["--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip


def _prepare_mnist(data_dir: Path, raw: Path | None) -> bool:
    """Put the MNIST files under ``data_dir`` (copied from ``raw`` if needed), unpacked as
    torchvision reads them; False when there are none."""
    from torchvision.datasets import MNIST

    target = data_dir / "MNIST" / "raw"
    if not target.is_dir() and raw is not None and raw.is_dir():
        shutil.copytree(raw, target)
    try:
        MNIST(str(data_dir), train=True, download=True)
        MNIST(str(data_dir), train=False, download=True)
    except (RuntimeError, OSError):
        return False
    return True


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds from launching ``cmd`` to its exit; a failure raises with its last line."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {done.returncode}: {last}")
    return seconds


def shipped_config(folder: Path, norm: str, batch_size: int) -> Path:
    """``configs/cifar10_<norm>_bs<B>.yaml`` as shipped (rendered from normbench.experiments, which a
    test keeps equal to the committed files), written into ``folder``."""
    name = f"cifar10_{norm}_bs{batch_size}.yaml"
    path = folder / name
    path.write_text(render_configs()[name])
    return path


def seed_loop_cmd(script: Path | None, data_dir: Path, batch_size: int, train: int | None, test: int | None,
                  norm: str = "batch", seed: int = 0) -> list[str]:  # fmt: skip
    entry = [str(script)] if script is not None else ["-m", "normbench.baseline"]
    cmd = [sys.executable, *entry, "--dataset", "mnist", "--data-dir", str(data_dir), "--batch-size", str(batch_size),
           "--norm", norm, "--epochs", "1", "--seed", str(seed),
           "--device", "cuda" if torch.cuda.is_available() else "cpu"]  # fmt: skip
    cmd += ["--train-subset", str(train)] if train else []
    return cmd + (["--test-subset", str(test)] if test else [])


def normbench_cmd(
    config: Path, data_dir: Path, root: Path, train: int | None, test: int | None, *extra: str
) -> list[str]:
    cmd = [sys.executable, "-m", "normbench", "fit", "--config", str(config),
           "--data", "normbench.data.MNISTDataModule",
           "--data.data_dir", str(data_dir), "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root),
           "--name", "bench"]  # fmt: skip
    cmd += ["--data.train_subset", str(train)] if train else []
    return cmd + (["--data.test_subset", str(test)] if test else []) + list(extra)


def _record(root: Path) -> dict:
    runs = sorted((root / "lightning_logs" / "bench").glob("version_*"))
    return read_record(runs[-1]) if runs else {}


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    print(markdown_table(header, rows, align="right"))


RUN_KINDS = {"seed_loop": "study's loop", "shipped": "shipped", "bare": "bare", "bf16": "shipped bf16-mixed"}


def _spread(row: dict, kind: str) -> str:
    """``median (min–max)`` seconds of one kind of run."""
    low, high = row[f"{kind}_range_s"]
    return f"{row[f'{kind}_s']:.1f} ({low:.1f}–{high:.1f})"


def bench_runs(cfg, data_dir: Path, work: Path, script: Path | None, kinds: list[str]) -> list[dict]:
    """The study's loop and normbench's ``kinds`` of run (shipped, bare, bf16), alternating,
    ``repeats`` times each; medians, and each kind's ratio to the loop."""
    rows = []
    extras = {"shipped": [], "bare": BARE, "bf16": BF16}
    for bs in cfg.batch_sizes:
        config = shipped_config(work, "bn", bs)
        times: dict[str, list[float]] = {k: [] for k in ("seed_loop", *kinds)}
        diagnostics = []
        for i in range(cfg.repeats):
            times["seed_loop"].append(timed(seed_loop_cmd(script, data_dir, bs, cfg.train_subset, cfg.test_subset)))
            for kind in kinds:
                root = work / f"runs_bs{bs}_{kind}_{i}"
                cmd = normbench_cmd(config, data_dir, root, cfg.train_subset, cfg.test_subset, *extras[kind])
                times[kind].append(timed(cmd))
                if kind == "shipped":
                    diagnostics.append(_record(root).get("diagnostics", {}).get("seconds", float("nan")))
                shutil.rmtree(root, ignore_errors=True)
        # The ratios from the figures as printed, so that the table checks out by hand.
        med = {k: round(statistics.median(v), 1) for k, v in times.items()}
        row = {"batch_size": bs, "n": cfg.repeats, **{f"{k}_s": v for k, v in med.items()},
               **{f"{k}_range_s": [round(min(v), 1), round(max(v), 1)] for k, v in times.items()},
               **{f"ratio_{k}": round(med["seed_loop"] / med[k], 2) for k in kinds}}  # fmt: skip
        if diagnostics:
            row["diagnostics_s"] = round(statistics.median(diagnostics), 1)
        rows.append(row)
    header = ["batch size", *(f"{RUN_KINDS[k]} s" for k in ("seed_loop", *kinds))]
    header += ["diagnostics s"] if "shipped" in kinds else []
    header += [f"{RUN_KINDS[k]} ratio" for k in kinds]
    table = []
    for r in rows:
        cells = [str(r["batch_size"]), *(_spread(r, k) for k in ("seed_loop", *kinds))]
        cells += [f"{r['diagnostics_s']:.1f}"] if "shipped" in kinds else []
        table.append(cells + [f"{r['ratio_' + k]:.2f}x" for k in kinds])
    _table(
        f"One epoch, {cfg.train_subset} training images, {cfg.test_subset} test images, whole process "
        f"(median of {cfg.repeats} alternating runs, min–max in brackets; ratio = the study's loop's seconds / "
        "normbench's; the study's loop is fp32)",
        header,
        table,
    )
    return rows


def bench_overhead(cfg, data_dir: Path, work: Path) -> list[dict]:
    """The shipped config over a full epoch: its diagnostics' share of the whole process."""
    rows = []
    for bs in cfg.overhead_batch_sizes:
        root = work / f"overhead_bs{bs}"
        seconds = timed(normbench_cmd(shipped_config(work, "bn", bs), data_dir, root, None, None))
        diagnostics = _record(root).get("diagnostics", {})
        rows.append({"batch_size": bs, "process_s": round(seconds, 1), "diagnostics_s": diagnostics.get("seconds"),
                     "share": round(diagnostics.get("seconds", float("nan")) / seconds, 4),
                     "eval_images": diagnostics.get("eval_images"),
                     "precise_bn_images": diagnostics.get("precise_bn_images")})  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
    _table(
        "Diagnostics on a full epoch (all training images, the whole test split), shipped config, whole process",
        ["batch size", "process s", "diagnostics s", "share", "subset: eval / PreciseBN images"],
        [[str(r["batch_size"]), f"{r['process_s']:.1f}", f"{r['diagnostics_s']:.1f}", f"{100 * r['share']:.1f}%",
          f"{r['eval_images']} / {r['precise_bn_images']}"] for r in rows],
    )  # fmt: skip
    return rows


# The grid's norms: the study's loop's --norm and the sweep variant of each.
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
    _table(
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
    _table(
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if real:
        from torchvision.datasets import MNIST

        ds = MNIST(str(data_dir), train=True)
        images, targets = ds.data[: cfg.train_subset].unsqueeze(1), ds.targets[: cfg.train_subset]
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (cfg.train_subset, 3, 32, 32), generator=g, dtype=torch.uint8)
        targets = torch.randint(0, 10, (cfg.train_subset,), generator=g)
    packed, sequential = packed_vs_sequential(images, targets, cfg.pack, cfg.pack_batch_size, cfg.pack_steps, device)
    print(f"\npacked K={cfg.pack} at batch size {cfg.pack_batch_size}: {packed:.1f} img/s against "
          f"{sequential:.1f} img/s for {cfg.pack} runs one after another: {packed / sequential:.2f}x")  # fmt: skip
    return [{"pack": cfg.pack, "batch_size": cfg.pack_batch_size, "packed": round(packed, 1),
             "sequential": round(sequential, 1), "ratio": round(packed / sequential, 3)}]  # fmt: skip


def cpu_flags() -> str:
    """What this CPU has for bf16: ``CPU_FLAGS`` present and absent (from /proc/cpuinfo, as
    lscpu shows them) and torch's own reading (``torch.backends.cpu.get_cpu_capability``)."""
    flags: set[str] = set()
    if Path("/proc/cpuinfo").is_file():
        line = next((x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    have = " ".join(f if f in flags else f"no {f}" for f in CPU_FLAGS)
    return f"flags: {have}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def machine() -> str:
    """The machine in words: the GPU, else the CPU model, its cores and bf16 features."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").is_file() else "CPU"  # fmt: skip
    cores = len(cpu_cores())
    return f"{model}, {cores} cores, torch {torch.__version__}; {cpu_flags()}"


def bench(args: list[str] | None = None) -> dict[str, list[dict]]:
    """``normbench bench``: print the tables, return their rows by section.

    Args:
        args: command-line arguments after ``bench``.
    """
    p = ArgumentParser(prog="normbench bench", description=__doc__.split("\n\n")[0], exit_on_error=False)
    p.add_argument("--data_dir", type=str, default="data", help="folder with (or for) MNIST")
    p.add_argument(
        "--mnist_raw",
        type=str | None,
        default=None,
        help="a folder of MNIST's .gz files to copy into --data_dir (default: none; without MNIST files there, "
        "they are downloaded)",
    )
    p.add_argument(
        "--seed_loop",
        type=str | None,
        default=None,
        help="a copy of the study's loop to run as the baseline (default: normbench.baseline, shipped)",
    )
    p.add_argument("--sections", type=list[str], default=["runs", "overhead", "grid"], help=f"of {', '.join(SECTIONS)}")
    p.add_argument("--batch_sizes", type=list[int], default=[2, 16, 128])
    p.add_argument("--train_subset", type=int, default=10000, help="training images per run (runs, compile)")
    p.add_argument("--test_subset", type=int, default=2000, help="test images per evaluation (runs, compile)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the median counts")
    p.add_argument("--overhead_batch_sizes", type=list[int], default=[2, 16])
    p.add_argument("--grid_batch_sizes", type=list[int], default=[2, 16])
    p.add_argument("--grid_seeds", type=int, default=3)
    p.add_argument("--grid_train_subset", type=int, default=2000)
    p.add_argument("--grid_test_subset", type=int, default=400)
    p.add_argument("--pack", type=int, default=5, help="runs per pack")
    p.add_argument("--pack_steps", type=int, default=200, help="steps per run for the packed comparison")
    p.add_argument("--pack_batch_size", type=int, default=2)
    p.add_argument("--output", type=str | None, default=None, help="also write the rows to this JSON file")
    cfg = p.parse_args(args)
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    if cfg.repeats < 1:
        raise ValueError(f"--repeats {cfg.repeats} must be >= 1")
    script = Path(cfg.seed_loop) if cfg.seed_loop else None
    if script is not None and not script.is_file():
        raise FileNotFoundError(f"--seed_loop {script} not found; leave it out to use normbench.baseline")
    data_dir = Path(cfg.data_dir).resolve()
    real = _prepare_mnist(data_dir, Path(cfg.mnist_raw) if cfg.mnist_raw else None)
    print(f"machine: {machine()}; data: {'MNIST' if real else 'no MNIST files'} in {data_dir}")
    out: dict[str, list[dict]] = {"machine": [{"machine": machine()}]}
    with tempfile.TemporaryDirectory(prefix="normbench-bench-") as tmp:
        work = Path(tmp)
        for section in cfg.sections:
            if section != "pack" and not real:
                print(f"\n{section}: skipped, it needs the MNIST files (--data_dir, --mnist_raw)")
                continue
            if section == "runs":
                kinds = ["shipped", "bare", *(["bf16"] if "bf16" in cfg.sections else [])]
                out[section] = bench_runs(cfg, data_dir, work, script, kinds)
            elif section == "bf16":
                if "runs" not in cfg.sections:  # else the runs section timed it beside the others
                    out[section] = bench_runs(cfg, data_dir, work, script, ["shipped", "bf16"])
            elif section == "overhead":
                out[section] = bench_overhead(cfg, data_dir, work)
            elif section == "grid":
                out[section] = bench_grid(cfg, data_dir, work, script)
            elif section == "compile":
                out[section] = bench_compile(cfg, data_dir, work)
            else:
                out[section] = bench_pack(cfg, data_dir, real)
            sys.stdout.flush()
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(out, indent=1))
    return out
