"""What only a CUDA device can show: the captured step replayed as CUDA graphs, the norm
diagnostics under those replays, DDP with channels_last on cuDNN's own gradients, and the
in-memory loader's batches on CUDA against the CPU's.

``pytest -m gpu`` (deselected by default, and skipped without CUDA: CI has no GPU);
bench/gpu_session.sh runs it on a lent GPU. The CPU tests of the same code are in
test_compile.py (the captured step traced and under inductor, the diagnostics compiled) and
test_ddp_grads.py (DDP with a stand-in for cuDNN's strides).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from test_compile import CAPTURED, _captured_against_eager, _scalars
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

from normbench.callbacks import NormDiagnostics
from normbench.module import NormBenchModule

TESTS = Path(__file__).resolve().parent

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def float32_without_tf32():
    """Eager and captured compared at float32's rounding: TF32 (cuDNN's default for
    convolutions) would put 1e-3 between any two convolution algorithms."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("case", list(CAPTURED))
def test_the_captured_step_replays_as_the_eager_one(case):
    # 20 steps per norm, each from eager's state: loss, every gradient and every buffer (BRN's
    # r/d schedule, the running statistics, BNRS's update-first order), one graph, fullgraph.
    skips = counters["inductor"]["cudagraph_skips"]
    _captured_against_eager(case, "inductor", "cuda")
    # Replayed as CUDA graphs: inductor counts each graph it leaves uncaptured (an input
    # mutation it cannot replay, a CPU tensor in the graph) and says why.
    assert counters["inductor"]["cudagraph_skips"] == skips, case


def test_diagnostics_under_cuda_graph_replays_log_the_eager_figures(tmp_path):
    # NormDiagnostics' forward pre-hooks are traced into the graph on the steps they capture
    # (every second step here: two graphs that alternate) and their figures are read after the
    # step, before the next replay reuses the graphs' memory; BRN, whose figures are the most.
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(48, 1, 12, 12, generator=g), torch.randint(0, 10, (48,), generator=g))
    val = TensorDataset(torch.randn(32, 1, 12, 12, generator=g), torch.randint(0, 10, (32,), generator=g))
    skips = counters["inductor"]["cudagraph_skips"]
    for name, compile in (("eager", False), ("captured", "reduce-overhead")):
        torch.manual_seed(0)
        model = NormBenchModule(norm="brn", width=8, num_blocks=2, in_channels=1, compile=compile)
        trainer = L.Trainer(
            max_epochs=4, logger=TensorBoardLogger(tmp_path, name=name), accelerator="gpu", devices=1,
            callbacks=[NormDiagnostics(every_n_steps=2)], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(model, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    assert counters["inductor"]["cudagraph_skips"] == skips
    eager, captured = (_scalars(tmp_path / n / "version_0") for n in ("eager", "captured"))
    assert eager.keys() == captured.keys()
    assert [s for s, _ in captured["batch_vs_running/blocks.1.norm/std_ratio"]] == [0, 2, 4, 6, 8, 10]
    for tag, values in eager.items():
        assert [s for s, _ in captured[tag]] == [s for s, _ in values], tag
        for (_, a), (_, b) in zip(values, captured[tag], strict=True):
            assert b == pytest.approx(a, rel=1e-3, abs=1e-4), tag


def test_ddp_on_cudnn_keeps_gradients_in_their_parameters_layout(tmp_path):
    # One GPU, DDP over NCCL, channels_last, the stem's gradient as cuDNN returns it (the CPU
    # test stands in for it with a hook). The finding: without held gradients DDP warns.
    subprocess.run([sys.executable, str(TESTS / "ddp_grads_probe.py"), str(tmp_path), "cuda"], check=True,
                   cwd=tmp_path)  # fmt: skip
    held, views, unheld = (json.loads((tmp_path / f / "rank0.json").read_text()) for f in ("held", "views", "unheld"))
    print("unheld: stem gradient strides", [s["stride"] for s in unheld["seen"]], "warnings", unheld["warnings"])
    assert unheld["warnings"], "cuDNN returned the stem's gradient in its weight's strides: nothing to hold"
    for run in (held, views):
        assert run["warnings"] == []
        assert {tuple(s["stride"]) for s in run["seen"]} == {tuple(run["param_stride"])}
    for a, b, c in zip(held["weights"], views["weights"], unheld["weights"], strict=True):
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5)


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_in_memory_loader_hands_out_the_cpus_batches_on_cuda(world_size):
    # Order and augmentation are drawn on the CPU and moved: a seed trains on the same batches
    # (images, crops, flips, targets) on a GPU as on the CPU, on every rank, in every epoch.
    from normbench.loaders import InMemoryLoader

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 3, 16, 16), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (70,), generator=g)
    for rank in range(world_size):
        loaders = [InMemoryLoader(images.to(device), targets.to(device), 8, True, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4),
                                  augment=True, seed=5, rank=rank, world_size=world_size)
                   for device in ("cpu", "cuda")]  # fmt: skip
        for epoch in (0, 3):
            for lo in loaders:
                lo.set_epoch(epoch)
            cpu, cuda = (list(lo) for lo in loaders)
            assert len(cpu) == len(cuda) == len(loaders[0])
            for (xc, yc), (xg, yg) in zip(cpu, cuda, strict=True):
                assert xg.is_cuda and torch.equal(yc, yg.cpu())
                torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
