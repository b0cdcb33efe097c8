"""How many devices and processes a run's Trainer config trains on, by Lightning's own rules,
before a Trainer exists."""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry, MPSAccelerator
from lightning.pytorch.trainer.connectors.accelerator_connector import _select_auto_accelerator


def device_count(accelerator: Any, devices: Any) -> int:
    """How many devices of one node ``Trainer(accelerator=..., devices=...)`` trains on, by
    Lightning's own rules (``auto``, ``-1``, a count, a list of ids), without building a Trainer;
    a value those rules refuse counts as what it says, and the Trainer then says why.

    Args:
        accelerator: the Trainer's ``accelerator`` (a name or an Accelerator).
        devices: the Trainer's ``devices``.
    """
    try:
        if isinstance(accelerator, Accelerator):
            cls = type(accelerator)
        else:
            name = str(accelerator or "auto")
            if name == "auto":
                name = _select_auto_accelerator()
            elif name == "gpu":
                name = "mps" if MPSAccelerator.is_available() else "cuda"
            cls = type(AcceleratorRegistry.get(name))
        flag = cls.auto_device_count() if devices == "auto" else devices
        return len(cls.get_parallel_devices(cls.parse_devices(flag)))
    except Exception:  # noqa: BLE001 - the Trainer reports a bad value itself, in its words
        if isinstance(devices, (list, tuple)):
            return len(devices)
        return int(devices) if str(devices).isdigit() and int(devices) > 0 else 1


def world_size(trainer: Namespace) -> int:
    """Processes a run's Trainer config trains with: devices per node times nodes."""
    return device_count(trainer.accelerator, trainer.devices) * int(trainer.num_nodes or 1)
