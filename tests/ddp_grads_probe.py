"""A script, not a test module: ``python ddp_grads_probe.py OUT [cuda]``, for test_ddp_grads
and test_gpu.

Three fits of 4 steps on two gloo processes forked from this process, which runs no autograd
itself (a process that has cannot fork ranks that use it): ``held`` (normbench's DDP as it
ships), ``views`` (with ``gradient_as_bucket_view``) and ``unheld`` (``HeldGrads.hold_grads``
made a no-op); each rank writes ``OUT/{fit}/rank{R}.json``. On the CPU a gradient hook stands in
for cuDNN's strides. With ``cuda``: the same fits on one GPU (DDP over NCCL, one process, the
gradients as cuDNN returns them, no stand-in).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

import normbench.steps
from normbench.module import NormBenchModule

STRIDE_WARNING = "Grad strides do not match bucket view strides"


class Observe(L.Callback):
    """Per rank: the warnings of the fit, and after each backward the stem's gradient strides
    and storage, written to ``out/rank{R}.json``."""

    def __init__(self, out, stand_in: bool = True) -> None:
        self.out, self.seen, self.stand_in = out, [], stand_in

    def setup(self, trainer, pl_module, stage) -> None:
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        weight = pl_module.net.conv1.weight
        if self.stand_in:  # what cuDNN may return for a weight whose channel dimension has size 1
            weight.register_hook(lambda g: torch.empty_strided(g.shape, (9, 9, 3, 1), device=g.device).copy_(g))

    def on_after_backward(self, trainer, pl_module) -> None:
        grad = pl_module.net.conv1.weight.grad
        self.seen.append({"stride": list(grad.stride()), "ptr": grad.data_ptr()})

    def teardown(self, trainer, pl_module, stage) -> None:
        self.caught.__exit__(None, None, None)
        params = list(pl_module.parameters())
        result = {
            "warnings": [str(w.message) for w in self.records if STRIDE_WARNING in str(w.message)],
            "seen": self.seen,
            "param_stride": list(pl_module.net.conv1.weight.stride()),
            "grad_storages": len({p.grad.untyped_storage().data_ptr() for p in params}),
            "params": len(params),
            "weights": [p.detach().flatten().tolist() for p in params],
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _fit(out: Path, strategy, cuda: bool = False) -> None:
    out.mkdir()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g))
    torch.manual_seed(0)
    model = NormBenchModule(norm="bn", in_channels=1, width=8, num_blocks=2)  # channels_last by default
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1 if cuda else 2, strategy=strategy,
                        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Observe(out, stand_in=not cuda)],
                        use_distributed_sampler=True)  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=4))


if __name__ == "__main__":
    root, cuda = Path(sys.argv[1]), sys.argv[2:] == ["cuda"]
    # On one GPU no rank is forked: DDP's subprocess launcher starts none for one device.
    start = {} if cuda else {"start_method": "fork"}
    _fit(root / "held", DDPStrategy(**start), cuda)
    _fit(root / "views", DDPStrategy(**start, gradient_as_bucket_view=True), cuda)
    normbench.steps.HeldGrads.hold_grads = lambda self, stage: None
    _fit(root / "unheld", DDPStrategy(**start), cuda)
