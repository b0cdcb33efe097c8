"""FrozenBN for the last part of training (``model.freeze_norms_after``): from that step on, the
norms' running statistics stop moving and normalize the training batches, as eval does."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from normbench.data import MNISTDataModule
from normbench.module import NormBenchModule
from normbench.norms import tracks_running_stats


class _Watch(L.Callback):
    """Each step's running means, and the module's training output on a fixed batch against its
    eval output, after the step's own freezing decision."""

    def __init__(self) -> None:
        self.means, self.same_as_eval = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layers = [m for m in pl_module.net.modules() if tracks_running_stats(m)]
        self.means.append(torch.cat([m.running_mean.clone() for m in layers]))
        self.same_as_eval.append(all(not m.training for m in layers))


@pytest.mark.parametrize("norm", ["bn", "brn"])
def test_statistics_freeze_from_the_given_fraction_of_the_steps(norm, fake_data, tmp_path):
    torch.manual_seed(0)
    model = NormBenchModule(norm=norm, in_channels=1, width=8, num_blocks=2, freeze_norms_after=0.5)
    data = MNISTDataModule(str(fake_data), download=False, batch_size=8, num_workers=0)
    watch = _Watch()
    trainer = L.Trainer(max_steps=10, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[watch])  # fmt: skip
    trainer.fit(model, data)
    # 10 steps, frozen from step 5 (0.5 x 10): steps 0-4 move the statistics, 5-9 do not.
    moved = [not torch.equal(a, b) for a, b in zip(watch.means, watch.means[1:])]
    assert moved[:4] == [True] * 4 and moved[4:] == [False] * 5
    assert watch.same_as_eval == [False] * 5 + [True] * 5


def test_a_fraction_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="freeze_norms_after must be a number from 0 to 1 or null, got 1.5"):
        NormBenchModule(norm="bn", freeze_norms_after=1.5)
