"""--model.compile: the same training as eager mode, the same checkpoints, hooks honoured."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normbench.steps
from normbench.callbacks import NormDiagnostics
from normbench.module import NormBenchModule
from normbench.steps import compiled_net_call

STEPS = 50


def _model(compile: bool, seed: int = 0) -> NormBenchModule:
    torch.manual_seed(seed)
    return NormBenchModule(norm="bn", in_channels=1, width=8, num_blocks=2, compile=compile)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of 4 random MNIST-shaped images with random labels.

    Random labels keep the comparison above float32's noise floor: on a learnable task, eager
    training itself drifts by 1e-4 in 50 steps between 1 and 2 threads (measured 2.7e-4), as
    Adam turns the rounding noise of the zero gradients of the conv biases before each norm into
    steps of size lr. Here eager and compiled agree to 3e-7.
    """
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(STEPS)]


def _train(model: NormBenchModule, batches) -> list[float]:
    """The module's own training step and optimizer (Adam, lr 1e-3), one batch per step."""
    optimizer = model.configure_optimizers()
    model.train()
    losses = []
    for i, batch in enumerate(batches):
        loss = model.training_step(batch, i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def cold_inductor_cache(tmp_path):
    """An empty inductor cache, on disk and in memory: what the first run on a machine pays."""
    from torch._inductor.utils import fresh_cache

    with fresh_cache(dir=str(tmp_path)):
        yield


# Inductor from a cold cache, 15 s on 2 cores; with -m slow. The aot_eager test below checks the
# compiled call's hooks and figures in the default suite.
@pytest.mark.slow
def test_compiled_training_follows_eager_step_by_step_and_keeps_checkpoints(cold_inductor_cache, tmp_path):
    eager, compiled = _model(False), _model(True, seed=1)
    assert compiled.memory_format == torch.channels_last  # the default, compiled too
    # The same keys, no _orig_mod. prefix, so the same initial weights load.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    start = {k: v.clone() for k, v in compiled.state_dict().items()}
    batches = _batches()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager_losses, compiled_losses = _train(eager, batches), _train(compiled, batches)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # compiled once, for training
    for step, (a, b) in enumerate(zip(eager_losses, compiled_losses, strict=True)):
        assert abs(a - b) < 1e-4, (step, a, b)
    # Not two flat curves: the weights moved, and the loss fell towards ln(10) = 2.303.
    assert (compiled.net.fc.weight - start["net.fc.weight"]).abs().max() > 1e-2
    assert compiled_losses[0] - sum(compiled_losses[-10:]) / 10 > 0.02

    # A Lightning checkpoint of the compiled model loads into an eager one, with its weights.
    trainer = L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.strategy.connect(compiled)
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    loaded = NormBenchModule.load_from_checkpoint(tmp_path / "compiled.ckpt", compile=False, weights_only=True)
    assert not loaded.compile_net
    for (key, value), theirs in zip(loaded.state_dict().items(), compiled.state_dict().values(), strict=True):
        assert torch.equal(value, theirs), key


def test_hooks_added_or_removed_after_the_first_compiled_call_take_effect():
    # Dynamo's eager backend: what is tested is dynamo's guards on the hooks, not inductor.
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    call = compiled_net_call(backend="eager")
    seen: list[torch.Tensor] = []
    x = torch.randn(2, 1, 8, 8)
    call(net, x)
    handle = net[1].register_forward_pre_hook(lambda layer, args: seen.append(args[0].detach().sum()))
    call(net, x)
    assert len(seen) == 1
    handle.remove()
    call(net, x)
    assert len(seen) == 1


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_norm_diagnostics_log_the_same_figures_compiled(tmp_path, monkeypatch):
    # AOTAutograd without inductor: the graphs, hooks and buffer updates that inductor gets, in
    # seconds; the figures then equal eager ones up to float rounding.
    monkeypatch.setattr(normbench.steps, "compiled_net_call", partial(compiled_net_call, backend="aot_eager"))
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(48, 1, 12, 12, generator=g), torch.randint(0, 10, (48,), generator=g))
    val = TensorDataset(torch.randn(32, 1, 12, 12, generator=g), torch.randint(0, 10, (32,), generator=g))
    for name, compile in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        model = NormBenchModule(norm="brn", width=8, num_blocks=2, in_channels=1, compile=compile)
        trainer = L.Trainer(
            max_epochs=1, logger=TensorBoardLogger(tmp_path, name=name), accelerator="cpu",
            callbacks=[NormDiagnostics(every_n_steps=1)], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(model, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    eager, compiled = (_scalars(tmp_path / n / "version_0") for n in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    # Captured by the forward pre-hooks at every step, in the compiled forward too.
    assert [s for s, _ in compiled["batch_vs_running/blocks.1.norm/std_ratio"]] == [0, 1, 2]
    assert "brn/blocks.1.norm/r_clip_fraction" in compiled and "train_eval/val_acc_batch_stats" in compiled
    for tag, values in eager.items():
        assert [s for s, _ in compiled[tag]] == [s for s, _ in values], tag
        for (_, a), (_, b) in zip(values, compiled[tag], strict=True):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-5), tag
