"""The normalization batch apart from the SGD batch (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", Sec. 4; Hoffer et al. 2017's ghost batches)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normbench.norms.batch_renorm import BatchRenorm
from normbench.norms.registry import create_norm

# The norms whose training output depends on the batch: those a norm batch applies to.
BATCH_NORMS = ("bn", "bnrs", "brn")


class NormBatch(nn.Module):
    """A batch-dependent norm applied to groups of ``norm_batch`` images of its input, in order:
    in training the layer sees batches of ``norm_batch`` images, whatever the SGD batch. Each
    group is normalized as the layer normalizes a batch (bn by the group's moments, brn with the
    group's r and d, bnrs by its running statistics), and the running statistics take one update
    per group, in order, as Ghost BatchNorm's (Hoffer et al. 2017, Algorithm 1). A last group of
    fewer images (a short last batch) is normalized as it is.

    brn's r_max/d_max schedule counts training steps (Ioffe 2017, Sec. 4), not updates of its
    statistics: the wrapper keeps that count in its ``steps`` buffer, one per training forward,
    and every group of a step reads it, so the limits open at the same step whatever the norm
    batch.

    Out of training the whole input goes through at once: the running statistics normalize it,
    or, where a diagnostic switches the norm alone to training mode, the statistics of the whole
    evaluation batch.

    Args:
        norm: the layer (its buffers keep torch's names under ``norm.``).
        norm_batch: images per normalization group.
    """

    def __init__(self, norm: nn.Module, norm_batch: int) -> None:
        super().__init__()
        if norm_batch < 1:
            raise ValueError(f"norm_batch={norm_batch} must be >= 1")
        self.norm = norm
        self.norm_batch = norm_batch
        self.scheduled = isinstance(norm, BatchRenorm)
        if self.scheduled:  # training steps, for brn's schedule (its own count is per group)
            self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        options = {"step": self.steps} if self.scheduled else {}
        if not self.training:  # a diagnostic may switch the norm alone to training: this step's limits
            return self.norm(x, **options)
        if x.shape[0] <= self.norm_batch:
            y = self.norm(x, **options)
        else:
            y = torch.cat([self.norm(part, **options) for part in x.split(self.norm_batch)])
        if self.scheduled:
            with torch.no_grad():
                self.steps.add_(1)
        return y

    def extra_repr(self) -> str:
        return f"norm_batch={self.norm_batch}"


# bn's options that ghost_bn takes as they are; update_first changes nothing in bn (its training
# output uses only the batch moments) and is dropped.
_BN_AS_GHOST = ("eps", "momentum", "affine")


def norm_batch_factory(norm: str, norm_batch: int, kwargs: dict[str, Any]) -> Callable[[int], nn.Module]:
    """The factory of ``norm``'s layers in groups of ``norm_batch`` images.

    bn becomes ``ghost_bn`` with ``virtual_batch_size=norm_batch``: BN over each group with one
    running-statistics update per group (the same, tested, as ``NormBatch`` over bn), and on
    several processes its ghost batches are cut from the global batch in rank order, each
    rank's statistics updated by every group of the global batch in order: what one device does.
    bnrs and brn are wrapped in ``NormBatch`` (one device: ``check_norm_batch`` refuses more).

    Args:
        norm: bn, bnrs or brn.
        norm_batch: images per group.
        kwargs: the norm's options (``model.norm_kwargs``).
    """
    if norm == "bn":
        other = sorted(set(kwargs) - set(_BN_AS_GHOST) - {"update_first"})
        if other:
            raise ValueError(f"model.norm_batch: bn's option {other[0]!r} does not apply in norm batches; drop it")
        options = {k: v for k, v in kwargs.items() if k in _BN_AS_GHOST}
        return lambda num_features: create_norm("ghost_bn", num_features, virtual_batch_size=norm_batch, **options)
    return lambda num_features: NormBatch(create_norm(norm, num_features, **kwargs), norm_batch)


def check_norm_batch(norm: str, norm_batch: int | None, per_device_batch: int | None, processes: int = 1,
                     synced: bool = True) -> None:  # fmt: skip
    """Raise a one-line ValueError when ``norm_batch`` does not apply to ``norm``, does not
    divide the per-device batch (so that on N devices the groups are those of one device), or
    asks bnrs or brn for several processes, or bn for several without ``sync_norms``.

    Args:
        norm: the norm's registry name.
        norm_batch: images per normalization group (None: the whole per-device batch).
        per_device_batch: ``data.batch_size``.
        processes: devices x nodes.
        synced: ``model.sync_norms``.
    """
    if norm_batch is None:
        return
    if norm not in BATCH_NORMS:
        raise ValueError(
            f"model.norm_batch={norm_batch} applies to the norms that normalize over the batch ({', '.join(BATCH_NORMS)}), "
            f"not to {norm}; drop model.norm_batch"
        )
    if norm_batch < 1:
        raise ValueError(f"model.norm_batch={norm_batch} must be a positive number of images, or null")
    if per_device_batch and per_device_batch % norm_batch:
        divisors = [d for d in range(1, per_device_batch + 1) if per_device_batch % d == 0]
        raise ValueError(
            f"model.norm_batch={norm_batch} does not divide data.batch_size={per_device_batch} (images per device); "
            f"use one of {', '.join(map(str, divisors))}"
        )
    if processes > 1 and norm != "bn":
        raise ValueError(
            f"model.norm_batch with {norm} trains on one device only ({processes} processes asked): its groups would "
            "each update the running statistics of their own rank; use --trainer.devices 1, or norm bn"
        )
    if processes > 1 and not synced:
        # Each rank's ghost batches would update its own running statistics, and DDP keeps rank
        # zero's: they would follow half the groups of one device's step (the normalization in
        # training the same), and every evaluation with them would differ from one device's.
        raise ValueError(
            f"model.norm_batch with model.sync_norms=false on {processes} processes: each rank's groups would update "
            "only its own running statistics (DDP keeps rank zero's), not those of every group as on one device; "
            "drop --model.sync_norms false"
        )
