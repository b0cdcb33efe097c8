"""What ``normbench bench``'s sections share: the commands they time (the study's loop,
normbench on a shipped config), timing a whole process, the run record it left, the machine in
words and the tables they print."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from normbench.experiments import render_configs
from normbench.report.tables import markdown_table
from normbench.results import cpu_cores, cpu_model, read_record

BF16 = ["--trainer.precision", "bf16-mixed"]
# The CPU features that decide what bf16 can gain: AVX-512 BF16 converts and dot products,
# AMX's bf16 matrix tiles (what oneDNN's bf16 convolutions and matmuls need to beat fp32).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# What "bare" turns off: everything a shipped run does besides training and evaluating.
BARE = ["--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip


def bench_device() -> torch.device:
    """The device the in-process sections (pack, step) time on: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_mnist(data_dir: Path, raw: Path | None) -> bool:
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
           "--device", bench_device().type]  # fmt: skip
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


def bench_record(root: Path) -> dict:
    runs = sorted((root / "lightning_logs" / "bench").glob("version_*"))
    return read_record(runs[-1]) if runs else {}


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    print(markdown_table(header, rows, align="right"))


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
    cores = len(cpu_cores())
    return f"{cpu_model()}, {cores} cores, torch {torch.__version__}; {cpu_flags()}"
