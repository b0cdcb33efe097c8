"""``normbench bench --sections [step]``: one training step in steady state, normbench's against
the study's loop's, on the device the bench runs on (the GPU when there is one).

normbench's step is its LightningModule's, built from the shipped config by the CLI (the model
as ``normbench fit`` builds it, channels-last and all): ``training_step`` (forward, loss, the
metrics' updates on the device), backward, the config's optimizer, with no host sync. The
study's step is ``normbench.baseline``'s: its network, Adam, and ``loss.item()`` after every step,
as the study reads it. Both train on one fixed batch already on the device, so neither the data
pipeline nor the start-up is in the figure (the ``runs`` section has those). Each timing is the
median over ``repeats`` blocks of steps after a warm-up; the range is each block's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from normbench.baseline import StudyNetwork
from normbench.bench_tools import bench_device, print_table, shipped_config

WARMUP = 10  # steps before timing: kernel choice, the allocator, Adam's state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def study_step(batch_size: int, device: torch.device) -> Callable[[], None]:
    """One step of the study's loop on one batch of MNIST's shape."""
    torch.manual_seed(0)
    net = StudyNetwork(4, "batch", 1, 10, 64).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(batch_size, 1, 28, 28, device=device), torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        loss.item()

    return step


def normbench_step(config: Path, batch_size: int, device: torch.device) -> tuple[Callable[[], None], Any]:
    """(one step, the module it trains): the module ``normbench fit`` builds from ``config``
    (with MNIST's shape)."""
    from normbench.cli import NormBenchCLI

    cli = NormBenchCLI(args=["--config", str(config), "--data", "normbench.data.MNISTDataModule",
                             "--data.download", "false"], run=False)  # fmt: skip
    module = cli.model.to(device)
    module.train()
    opt = module.optimizer_factory(module.parameters())
    batch = (torch.randn(batch_size, 1, 28, 28, device=device), torch.randint(0, 10, (batch_size,), device=device))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        opt.step()

    return step, module


def step_ms(step: Callable[[], None], steps: int, repeats: int, device: torch.device) -> list[float]:
    """Milliseconds a step, one figure per block of ``steps`` steps, after the warm-up."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append((time.perf_counter() - start) / steps * 1000)
    return times


def bench_step(cfg, work: Path, device: torch.device | None = None) -> list[dict]:
    """The step section's rows, one per batch size, and its table."""
    device = device or bench_device()
    rows = []
    for bs in cfg.batch_sizes:
        times = {"study": step_ms(study_step(bs, device), cfg.step_steps, cfg.repeats, device),
                 "normbench": step_ms(normbench_step(shipped_config(work, "bn", bs), bs, device)[0], cfg.step_steps,
                                      cfg.repeats, device)}  # fmt: skip
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        rows.append({"batch_size": bs, "device": device.type, "steps": cfg.step_steps, "n": cfg.repeats,
                     **{f"{k}_ms": v for k, v in med.items()},
                     **{f"{k}_range_ms": [round(min(v), 3), round(max(v), 3)] for k, v in times.items()},
                     "ratio": round(med["study"] / med["normbench"], 2)})  # fmt: skip
    print_table(
        f"One training step in steady state on {device.type}, ms (median of {cfg.repeats} blocks of "
        f"{cfg.step_steps} steps after {WARMUP}, min–max in brackets; ratio = the study's step / normbench's)",
        ["batch size", "study's loop ms", "normbench ms", "ratio"],
        [[str(r["batch_size"]), _spread(r, "study"), _spread(r, "normbench"), f"{r['ratio']:.2f}x"] for r in rows],
    )
    return rows


def _spread(row: dict, kind: str) -> str:
    low, high = row[f"{kind}_range_ms"]
    return f"{row[f'{kind}_ms']:.2f} ({low:.2f}–{high:.2f})"
