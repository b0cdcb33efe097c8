"""What a run's batch means on the machine it ran on: devices, processes, per-device and global
batch, and how many images each norm statistic covers; and the settings refused because under
them it would not mean what the run's name and record say."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from normbench.devices import world_size
from normbench.diagnostics.train_eval import norm_batch
from normbench.norms import check_norm_batch, tracks_running_stats
from normbench.orders import EpochOrder


def batch_layout(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any = None) -> dict[str, Any]:
    """What a run's batch means on this machine, for its record: devices, nodes, processes, the
    per-device and global batch size (the images of one optimizer step), and how many images
    each norm's statistics cover (``norm_stats_images``, per device or over all of them when
    synced; 1 for norms of one image, such as gn; None for no norm). ``datamodule``: the run's,
    where the Trainer has none (a packed run's)."""
    datamodule = datamodule or trainer.datamodule
    per_device = getattr(datamodule, "batch_size", None)
    world = trainer.world_size
    layers = [m for m in pl_module.modules() if tracks_running_stats(m)]
    synced = bool(getattr(pl_module, "sync_norms", False)) and world > 1
    # BatchNorm without running statistics normalizes over the batch all the same.
    layers += [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in layers]
    if layers:
        images = norm_batch(trainer, pl_module, datamodule) if per_device else None
        ghost = [m.virtual_batch_size for m in layers if hasattr(m, "virtual_batch_size")]
        if images is not None and ghost:
            images = min(images, *ghost)
        scope = "norm batch" if getattr(pl_module, "norm_batch", None) else "all devices" if synced else "per device"
    elif getattr(pl_module, "norm_name", None) == "none":
        images, scope = None, "no norm"
    else:
        images, scope = 1, "per image"
    return {
        "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
        "world_size": world,
        "batch_size_per_device": per_device,
        "global_batch_size": per_device * world if per_device else None,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "norm_stats_images": images,
        "norm_stats_scope": scope,
        "train_images_padded": padded_train_images(datamodule, world),
    }


def padded_train_images(datamodule: Any, world: int) -> int | None:
    """Training images an epoch holds twice on ``world`` processes so that every rank takes as
    many steps (each rank's share of the last global batch made whole): 0 on one process, or with
    drop_last (the global batches one device takes, whole: ``orders.EpochOrder``, both data
    paths); None where unknown."""
    train_set = getattr(datamodule, "train_set", None)
    if world == 1:
        return 0
    if train_set is None:
        return None
    order = EpochOrder(len(train_set), int(getattr(datamodule, "batch_size", 1) or 1), True, 0, 0, world,
                       bool(getattr(datamodule, "drop_last", False)))  # fmt: skip
    return order.padded_images()


def check_batch_settings(config: Any, fit: bool) -> None:
    """Raise a one-line ValueError for settings under which a run's batch would not be what its
    name, budget and record (``batch_layout``) say: a ``model.norm_batch`` that does not fit
    (``check_norm_batch``), gradient accumulation in a fit, and Lightning's ``sync_batchnorm``
    beside norms left unsynced.

    Args:
        config: the run's parsed config (a subcommand's namespace).
        fit: whether the command trains.
    """
    trainer, synced = config.trainer, config.model.get("sync_norms", True)
    check_norm_batch(config.model.norm, config.model.get("norm_batch"), config.data.init_args.batch_size,
                     world_size(trainer), synced)  # fmt: skip
    if fit and (trainer.get("accumulate_grad_batches") or 1) > 1:
        # A run's batch is its optimizer step's, data.batch_size x devices: its name, budget
        # (learning rate, evaluation points) and the norms' batch all follow from it.
        raise ValueError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: normbench's batch is the optimizer "
            "step's, data.batch_size x devices, which its run name, budget and norms follow; give the whole batch "
            "as data.batch_size (with model.norm_batch to normalize over part of it) and drop the option"
        )
    if trainer.get("sync_batchnorm") and not synced:
        # Lightning's conversion knows torch's BatchNorm only: bn would be synced, the other
        # norms not, and the record (norm_stats_scope) would say per device.
        raise ValueError(
            "trainer.sync_batchnorm=true with model.sync_norms=false would sync bn alone while the run's record "
            "says each device normalizes by its own share; drop --trainer.sync_batchnorm (model.sync_norms "
            "syncs every norm)"
        )
