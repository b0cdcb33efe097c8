"""NormBenchModule: the logged epoch metrics against an independent evaluation."""

from __future__ import annotations

import os
import traceback

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from normbench.callbacks import NormDiagnostics
from normbench.data import CIFAR10DataModule, MNISTDataModule
from normbench.module import NormBenchModule
from normbench.norms import NORMS
from normbench.recorder import RunRecorder


class _Witness(L.Callback):
    """Records, per epoch, the training losses as they happen and the validation metrics
    recomputed by hand from the model after validation."""

    def __init__(self) -> None:
        self.losses: list[list[tuple[float, int]]] = []
        self.logged: list[dict[str, float]] = []
        self.by_hand: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.losses.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[-1].append((float(outputs["loss"]), len(batch[1])))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        correct = total = 0
        loss_sum = 0.0
        with torch.no_grad():
            for x, y in trainer.datamodule.val_dataloader():
                logits = pl_module(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                total += len(y)
        self.by_hand.append({"val/acc": correct / total, "val/loss": loss_sum / total})

    def on_train_end(self, trainer, pl_module) -> None:
        self.final = {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_epoch_metrics_are_per_epoch_and_match_an_independent_evaluation(fake_data, tmp_path):
    L.seed_everything(0)
    witness = _Witness()
    history: list[dict[str, float]] = []

    class Epochs(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch:
                history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    data = MNISTDataModule(str(fake_data), download=False, batch_size=16, num_workers=0)
    model = NormBenchModule(norm="bn", in_channels=1, width=8, num_blocks=2)
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2, callbacks=[witness, Epochs()],
    )  # fmt: skip
    trainer.fit(model, data)
    history.append(witness.final)
    assert len(history) == len(witness.by_hand) == len(witness.losses) == 3
    for epoch, (logged, by_hand, losses) in enumerate(zip(history, witness.by_hand, witness.losses, strict=True)):
        # A mean over this epoch's steps only: a cumulative or unreset metric would differ.
        train_loss = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        assert abs(logged["train/loss"] - train_loss) < 1e-5, epoch
        assert abs(logged["val/acc"] - by_hand["val/acc"]) < 1e-6, epoch
        assert abs(logged["val/loss"] - by_hand["val/loss"]) < 1e-4, epoch
        assert logged["val/acc_best"] == max(h["val/acc"] for h in witness.by_hand[: epoch + 1])


def test_a_last_partial_batch_weighs_its_images_in_the_loss(fake_data):
    # 64 test images in batches of 24: 24, 24 and 16. The epoch loss is the mean over images,
    # not over batches (a mean of batch means would weigh the 16 as much as the 24s).
    torch.manual_seed(0)
    model = NormBenchModule(norm="bn", in_channels=1, width=8, num_blocks=2).eval()
    data = MNISTDataModule(str(fake_data), download=False, batch_size=16, eval_batch_size=24, num_workers=0)
    data.setup("fit")
    batches = list(data.val_dataloader())
    assert [len(y) for _, y in batches] == [24, 24, 16]
    with torch.no_grad():
        for x, y in batches:
            model._step((x, y), model.val_loss, model.val_acc)
        logits = torch.cat([model(x) for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    by_image = F.cross_entropy(logits, targets).item()
    by_batch = sum(F.cross_entropy(model(x), y).item() for x, y in batches) / len(batches)
    assert abs(by_image - by_batch) > 1e-4  # the two weightings differ on these batches
    assert model.val_loss.compute().item() == pytest.approx(by_image, abs=1e-6)
    assert model.val_acc.compute().item() == pytest.approx((logits.argmax(1) == targets).float().mean().item())


# ----------------------------------------------------------------------------- host syncs

SYNCS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default)
# Frames between an op and the code that issued it: the dispatch mode itself, torch's wrappers.
PLUMBING = ("torch/utils/_python_dispatch.py", "torch/_compile.py", "torch/_dynamo/", "torch/_tensor.py", __file__)


class _HostReads(TorchDispatchMode):
    """Every ``_local_scalar_dense`` (a device value read on the host: .item(), float(), int(),
    bool()) and ``lift_fresh`` (a tensor built from Python data, a host-to-device copy on an
    accelerator), with the line that issued it, per training step.

    torch's optimizers keep their step counters on the host on every device (``state["step"]``
    is a CPU tensor unless capturable or fused), so their reads and their ``torch.tensor(1.0,
    device="cpu")`` are no device syncs: ops issued from ``torch/optim`` are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[list[str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCS and self.steps:
            frames = [f for f in traceback.extract_stack()[:-1] if not any(p in f.filename for p in PLUMBING)]
            where = frames[-1]
            if "torch/optim/" not in where.filename.replace(os.sep, "/"):
                self.steps[-1].append(f"{func} at {where.filename}:{where.lineno}: {where.line}")
        return func(*args, **(kwargs or {}))


class _RecordSteps(L.Callback):
    """Records the ops of each training step, from one step's start to the next's: the batch,
    the forward, backward and optimizer step, every callback's and the module's hooks."""

    def __init__(self) -> None:
        self.mode = _HostReads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.mode.steps:
            self.mode.__enter__()
        self.mode.steps.append([])

    def on_train_end(self, trainer, pl_module) -> None:
        self.mode.__exit__(None, None, None)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_no_training_step_reads_the_device_on_the_host(norm, fake_data, tmp_path):
    # As the shipped configs train: in-memory batches with augmentation, foreach Adam, the run
    # record and NormDiagnostics, whose per-step figures are read every every_n_steps (50).
    # The module reads its record of a non-finite loss every check_finite_every_n_steps steps:
    # on CPU by default every step (a CPU read syncs nothing), here every 20, the accelerators'
    # default.
    torch.manual_seed(0)
    options = (
        {"num_groups": 4} if norm in ("gn", "evonorm_s0") else {"virtual_batch_size": 2} if norm == "ghost_bn" else {}
    )
    model = NormBenchModule(norm=norm, norm_kwargs=options, in_channels=3, width=8, num_blocks=2,
                            optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
                            check_finite_every_n_steps=20)  # fmt: skip
    data = CIFAR10DataModule(str(fake_data), download=False, batch_size=4, num_workers=0, augment=True)
    recorder = _RecordSteps()
    trainer = L.Trainer(
        max_steps=8, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder, NormDiagnostics(), RunRecorder()],
    )  # fmt: skip
    trainer.fit(model, data)
    steps = recorder.mode.steps
    assert len(steps) == 8
    # Step 0 arms the diagnostics (every 50 steps); the last step ends the epoch, whose metrics
    # are read once. Every step between is free of host reads.
    for step, reads in enumerate(steps[1:-1], start=1):
        assert not reads, f"step {step} of {norm}: " + "; ".join(reads)


def test_fused_adam_is_foreach_adam_to_float_rounding_over_200_steps():
    # The shipped configs' Adam (fused: one kernel for all parameters) against the multi-tensor
    # one, fed the same 200 gradients of study 2's network: the same algorithm, so they agree
    # to float32 rounding at every step, and both move the weights far more than they differ.
    # The gradients are laid out as their parameters (channels_last conv weights): torch 2.14's
    # fused CPU kernel walks a gradient in its parameter's memory order, so it is right only
    # under autograd's gradient layout contract, which the first part checks for this network.
    torch.manual_seed(0)
    module = NormBenchModule(norm="bn", in_channels=1, width=16, num_blocks=2)
    net = module.net
    x, y = torch.randn(4, 1, 28, 28).to(memory_format=torch.channels_last), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert any(p.dim() == 4 and not p.is_contiguous() for p in net.parameters())  # channels_last weights
    for p in net.parameters():
        assert p.grad.stride() == p.stride(), (p.shape, p.grad.stride(), p.stride())
    start = [p.detach().clone() for p in net.parameters()]
    copies = {kind: [p.clone().requires_grad_() for p in start] for kind in ("fused", "foreach")}
    opts = {kind: torch.optim.Adam(ps, lr=1e-3, **{kind: True}) for kind, ps in copies.items()}
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(200):
        grads = [torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))
                 * 10 ** torch.empty(()).uniform_(-4, 0, generator=g) for p in start]  # fmt: skip
        for kind, ps in copies.items():
            for p, grad in zip(ps, grads, strict=True):
                p.grad = grad.clone()
            opts[kind].step()
        for a, b in zip(copies["fused"], copies["foreach"], strict=True):
            worst = max(worst, (a - b).abs().max().item())
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    moved = min((p - s).abs().max().item() for p, s in zip(copies["fused"], start, strict=True))
    assert moved > 1e-2 > 1e3 * worst, (moved, worst)
