"""``normbench bench --sections [step]``: one training step in steady state, normbench's against
the study's loop's, on the device the bench runs on (the GPU when there is one).

normbench's step is its LightningModule's, built from the shipped config by the CLI (the model
as ``normbench fit`` builds it, channels-last and all): ``training_step`` (forward, loss, the
metrics' updates on the device), backward, the config's optimizer, with no host sync. The
study's step is ``normbench.baseline``'s: its network, Adam, and ``loss.item()`` after every step,
as the study reads it. Both train on one fixed batch already on the device, so neither the data
pipeline nor the start-up is in the figure (the ``runs`` section has those). Each timing is the
median over ``repeats`` blocks of steps after a warm-up; the range is each block's.

On CUDA a third column times normbench's step with ``--model.compile reduce-overhead`` (the
network's forward and backward replayed as CUDA graphs, ``normbench.steps.NetCall``); its
warm-up includes the compile. Elsewhere that mode runs eagerly, so the column is left out.
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
from normbench.steps import GRAPH_MODE, NetCall

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


def normbench_step(
    config: Path, batch_size: int, device: torch.device, compile: bool | str = False
) -> tuple[Callable[[], None], Any]:
    """(one step, the module it trains): the module ``normbench fit`` builds from ``config``
    (with MNIST's shape), with ``--model.compile compile``."""
    from normbench.cli import NormBenchCLI

    cli = NormBenchCLI(args=["--config", str(config), "--data", "normbench.data.MNISTDataModule",
                             "--data.download", "false", "--model.compile", str(compile).lower()],
                       run=False)  # fmt: skip
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


def step_kinds(device: torch.device) -> dict[str, bool | str]:
    """The steps the section times on ``device``: name -> normbench's ``--model.compile`` (the
    study's loop under "study")."""
    kinds: dict[str, bool | str] = {"study": False, "normbench": False}
    if NetCall(GRAPH_MODE).active(device):
        kinds["captured"] = GRAPH_MODE
    return kinds


HEADERS = {"study": "study's loop ms", "normbench": "normbench ms", "captured": f"normbench {GRAPH_MODE} ms"}


def bench_step(cfg, work: Path, device: torch.device | None = None) -> list[dict]:
    """The step section's rows, one per batch size, and its table."""
    device = device or bench_device()
    kinds = step_kinds(device)
    rows = []
    for bs in cfg.batch_sizes:
        times = {}
        for kind, compile in kinds.items():
            step = (study_step(bs, device) if kind == "study"
                    else normbench_step(shipped_config(work, "bn", bs), bs, device, compile)[0])  # fmt: skip
            times[kind] = step_ms(step, cfg.step_steps, cfg.repeats, device)
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        row = {"batch_size": bs, "device": device.type, "steps": cfg.step_steps, "n": cfg.repeats,
               **{f"{k}_ms": v for k, v in med.items()},
               **{f"{k}_range_ms": [round(min(v), 3), round(max(v), 3)] for k, v in times.items()},
               "ratio": round(med["study"] / med["normbench"], 2)}  # fmt: skip
        if "captured" in med:
            row["captured_ratio"] = round(med["study"] / med["captured"], 2)
        rows.append(row)
    ratios = ["ratio"] + (["captured_ratio"] if "captured" in kinds else [])
    print_table(
        f"One training step in steady state on {device.type}, ms (median of {cfg.repeats} blocks of "
        f"{cfg.step_steps} steps after {WARMUP}, min–max in brackets; ratio = the study's step / normbench's)",
        ["batch size", *(HEADERS[k] for k in kinds), *(r.replace("_", " ") for r in ratios)],
        [[str(r["batch_size"]), *(_spread(r, k) for k in kinds), *(f"{r[x]:.2f}x" for x in ratios)] for r in rows],
    )
    return rows


def _spread(row: dict, kind: str) -> str:
    low, high = row[f"{kind}_range_ms"]
    return f"{row[f'{kind}_ms']:.2f} ({low:.2f}–{high:.2f})"
