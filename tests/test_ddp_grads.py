"""DDP with channels_last: gradients in their parameters' layout, so DDP's reducer neither
warns "Grad strides do not match bucket view strides" nor copies (``normbench.steps.HeldGrads``).

On a CPU the convolutions return gradients in their weights' strides, so the warning cannot
appear by itself here. A gradient hook stands in for cuDNN: it hands the 1-channel stem's
weight gradient over in the other strides its layout allows ((9, 9, 3, 1) for a weight of
(9, 1, 3, 1)), which autograd accepts and DDP then warns about, unless the gradient already
exists. The fits run in ddp_grads_probe.py, a fresh process that forks its ranks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Each fit opens a TCP port for its process group: one at a time in a parallel run (pyproject.toml).
pytestmark = pytest.mark.xdist_group("ports")


def test_ddp_with_channels_last_keeps_gradients_in_their_parameters_layout(tmp_path):
    subprocess.run([sys.executable, str(TESTS / "ddp_grads_probe.py"), str(tmp_path)], check=True, cwd=tmp_path)
    held, views, unheld = (
        [json.loads((tmp_path / fit / f"rank{r}.json").read_text()) for r in range(2)]
        for fit in ("held", "views", "unheld")
    )
    for rank in range(2):
        # Without held gradients, the stand-in's strides reach DDP, which warns.
        assert unheld[rank]["warnings"], rank
        assert unheld[rank]["seen"][0]["stride"] == [9, 9, 3, 1]
        for run in (held[rank], views[rank]):
            assert run["warnings"] == []
            assert run["param_stride"] == [9, 1, 3, 1]  # channels_last
            # The gradient in the weight's layout at every step, added to in place.
            assert {tuple(s["stride"]) for s in run["seen"]} == {(9, 1, 3, 1)} and len(run["seen"]) == 4
        assert len({s["ptr"] for s in held[rank]["seen"]}) == 1  # one tensor throughout
        # As views, one tensor from the second step on (DDP rebuilds its buckets once, after the
        # first backward, in the order the gradients arrived).
        assert len({s["ptr"] for s in views[rank]["seen"][1:]}) == 1
        # With gradient_as_bucket_view the gradients are the buckets' views: a few storages,
        # not one per parameter.
        assert views[rank]["grad_storages"] < views[rank]["params"] == held[rank]["grad_storages"]
        # The same training either way, on each rank.
        for a, b, c in zip(held[rank]["weights"], views[rank]["weights"], unheld[rank]["weights"], strict=True):
            assert a == pytest.approx(b, abs=1e-6) and a == pytest.approx(c, abs=1e-6)
    assert held[0]["weights"] == held[1]["weights"]  # the ranks agree


def test_gradients_are_held_for_ddp_fits_only(monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    from normbench.module import NormBenchModule

    cases = [
        (DDPStrategy(), "fit", True),
        (DDPStrategy(), "validate", False),
        (SingleDeviceStrategy("cpu"), "fit", False),
        (DeepSpeedStrategy.__new__(DeepSpeedStrategy), "fit", False),  # DeepSpeed keeps its own
    ]
    for strategy, stage, held in cases:
        model = NormBenchModule(in_channels=1, width=8, num_blocks=2)
        monkeypatch.setattr(type(model), "trainer", property(lambda self, s=strategy: type("T", (), {"strategy": s})))
        model.hold_grads(stage)
        assert model.grads_held is held, (type(strategy).__name__, stage)
        grads = [p.grad for p in model.parameters()]
        if held:  # zeros in each parameter's own strides (channels_last), kept by zero_grad
            assert all(
                g is not None and g.stride() == p.stride() and not g.any() for g, p in zip(grads, model.parameters())
            )
            model.zero_grad()
            assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
        else:
            assert all(g is None for g in grads)
