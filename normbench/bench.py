"""``normbench bench``: normbench against the study's own training loop, side by side.

For each batch size it trains one epoch of study 2's network with BatchNorm on the same data,
evaluation on the test split included, once with the study's own loop, ``normbench.baseline``
(a DataLoader with per-image transforms and ``loss.item()`` every step; ``--seed_loop`` runs
another copy of it instead) and once with ``normbench fit``, each in its own process on the same device, and prints images per second and
their ratio. Then K packed runs against the same K runs one after another. The data is real
MNIST when its files are there; otherwise random tensors of CIFAR's shape, and the table says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser

from normbench.data import InMemoryLoader
from normbench.module import NormBenchModule
from normbench.packed import PackedLoader, PackedRuns, packed_loss
from normbench.results import read_record

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# Study 2's experiment on MNIST, the network and training normbench.baseline runs, given in full
# so that the command needs no config file (an installed normbench has none).
STUDY2_MNIST = ["--seed_everything", "0", "--model.norm", "bn", "--model.norm_kwargs", "{}", "--model.net", "seed_cnn",
                "--model.width", "64", "--model.num_blocks", "4", "--model.activation", "relu", "--model.optimizer",
                "{class_path: torch.optim.Adam, init_args: {lr: 0.001, foreach: true}}",
                "--data", "normbench.data.MNISTDataModule", "--data.val_split", "0", "--data.normalization", "half"]  # fmt: skip


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


def seed_loop_images_per_s(script: Path | None, data_dir: Path, batch_size: int, subset: int, device: str) -> float:
    """Images per second of the study's loop: ``normbench.baseline``, or the script ``script``."""
    entry = [str(script)] if script is not None else ["-m", "normbench.baseline"]
    cmd = [sys.executable, *entry, "--dataset", "mnist", "--data-dir", str(data_dir), "--batch-size", str(batch_size),
           "--norm", "batch", "--epochs", "1", "--train-subset", str(subset), "--device", device]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_s"]


def normbench_images_per_s(data_dir: Path, batch_size: int, subset: int, accelerator: str, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as root:
        cmd = [sys.executable, "-m", "normbench.cli", "fit", *STUDY2_MNIST, "--data.batch_size", str(batch_size),
               "--data.data_dir", str(data_dir), "--data.train_subset", str(subset), "--trainer.max_epochs", "1",
               "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
               "--trainer.enable_checkpointing", "false", "--trainer.enable_model_summary", "false",
               "--trainer.accelerator", accelerator, "--trainer.default_root_dir", root, "--name", "bench", "--version", "0",
               *extra]  # fmt: skip
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        # fit's own wall time, from its first hook to its last, like the seed loop's timer.
        return subset / read_record(Path(root) / "lightning_logs" / "bench" / "version_0")["wall_time_s"]


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

    def timed(step_fn, batches) -> float:
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

        seconds += timed(step, iter(loader(seed)))
    sequential = k * steps * batch_size / seconds
    packed = PackedRuns(nets()).to(device)
    popt = torch.optim.Adam(packed.parameters(), lr=1e-3)

    def packed_step(x, y):
        popt.zero_grad(set_to_none=True)
        packed_loss(packed(x), y)[0].backward()
        popt.step()

    packed_rate = k * steps * batch_size / timed(packed_step, iter(PackedLoader([loader(s) for s in range(k)])))
    return packed_rate, sequential


def bench(args: list[str] | None = None) -> list[dict]:
    """``normbench bench``: print the table, return its rows.

    Args:
        args: command-line arguments after ``bench``.
    """
    p = ArgumentParser(prog="normbench bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", type=str, default="data", help="folder with (or for) MNIST")
    p.add_argument(
        "--mnist_raw", type=str, default=str(SHARED / "data" / "MNIST" / "raw"), help="MNIST .gz files to copy"
    )
    p.add_argument(
        "--seed_loop",
        type=str | None,
        default=None,
        help="a copy of the study's loop to run as the baseline (default: normbench.baseline, shipped)",
    )
    p.add_argument("--batch_sizes", type=list[int], default=[2, 16, 128])
    p.add_argument("--train_subset", type=int, default=5000, help="training images per epoch")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best counts")
    p.add_argument("--pack", type=int, default=5, help="runs per pack")
    p.add_argument("--pack_steps", type=int, default=200, help="steps per run for the packed comparison")
    p.add_argument("--pack_batch_size", type=int, default=2)
    cfg = p.parse_args(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = "gpu" if device == "cuda" else "cpu"
    data_dir = Path(cfg.data_dir).resolve()
    real = _prepare_mnist(data_dir, Path(cfg.mnist_raw))
    hardware = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {hardware}; data: {'real MNIST' if real else 'random tensors of CIFAR shape'}, "
          f"{cfg.train_subset} training images, 1 epoch, test-split evaluation included, best of {cfg.repeats}")  # fmt: skip
    rows = []
    script = Path(cfg.seed_loop) if cfg.seed_loop else None
    if script is not None and not script.is_file():
        raise FileNotFoundError(f"--seed_loop {script} not found; leave it out to use normbench.baseline")
    if real:
        print(f"{'batch size':>10} {'seed loop img/s':>16} {'normbench img/s':>16} {'ratio':>7}")
        for bs in cfg.batch_sizes:
            # Alternate the two, and keep each one's best: a shared machine's noise only slows.
            base = ours = 0.0
            for _ in range(cfg.repeats):
                base = max(base, seed_loop_images_per_s(script, data_dir, bs, cfg.train_subset, device))
                ours = max(ours, normbench_images_per_s(data_dir, bs, cfg.train_subset, accelerator, []))
            rows.append(
                {"batch_size": bs, "seed_loop": base, "normbench": round(ours, 1), "ratio": round(ours / base, 3)}
            )
            print(f"{bs:>10} {base:>16.1f} {ours:>16.1f} {ours / base:>7.2f}")
    else:
        print("no real MNIST: the single-run comparison is skipped")
    if real:
        from torchvision.datasets import MNIST

        ds = MNIST(str(data_dir), train=True)
        images, targets = ds.data[: cfg.train_subset].unsqueeze(1), ds.targets[: cfg.train_subset]
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (cfg.train_subset, 3, 32, 32), generator=g, dtype=torch.uint8)
        targets = torch.randint(0, 10, (cfg.train_subset,), generator=g)
    packed, sequential = packed_vs_sequential(
        images, targets, cfg.pack, cfg.pack_batch_size, cfg.pack_steps, torch.device(device)
    )
    print(f"packed K={cfg.pack} at batch size {cfg.pack_batch_size}: {packed:.1f} img/s against {sequential:.1f} img/s "
          f"for {cfg.pack} runs one after another: {packed / sequential:.2f}x")  # fmt: skip
    rows.append({"pack": cfg.pack, "batch_size": cfg.pack_batch_size, "packed": round(packed, 1),
                 "sequential": round(sequential, 1), "ratio": round(packed / sequential, 3)})  # fmt: skip
    return rows
