"""normbench's 64-bit seeding, which runs, packs and sweeps share."""

from __future__ import annotations

import os
import random

import lightning as L
import lightning.fabric.utilities.seed as lightning_seed
import numpy as np
import torch

# seed_everything's range: torch takes 64-bit seeds, Lightning's seed_everything only numpy's 32.
MAX_SEED = 2**63 - 1


def seed_everything(seed: int) -> int:
    """Seed torch, numpy and Python's random as Lightning's ``seed_everything(seed,
    workers=True)`` does, for any seed in [0, 2**63 - 1]: Lightning's own is used where it
    applies (seeds below 2**32), and above it torch and Python's random take the whole seed and
    numpy, whose seeds are 32-bit, the seed modulo 2**32. ``PL_GLOBAL_SEED`` holds the whole seed
    for DDP's processes and data loader workers.

    Args:
        seed: the run's ``seed_everything``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed_everything={seed!r} is out of range; give an integer from 0 to 2**63 - 1")
    if seed <= np.iinfo(np.uint32).max:
        return L.seed_everything(seed, workers=True)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = "1"
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


_LIGHTNING_SEED_EVERYTHING = lightning_seed.seed_everything


def _seed_everything_in_a_rank(seed: int | None = None, workers: bool = False, verbose: bool = True) -> int:
    """Lightning's ``seed_everything`` where its ``reset_seed`` calls it: in each process of a
    DDP, FSDP or DeepSpeed run, with the seed from ``PL_GLOBAL_SEED``. A seed above 2**32 - 1,
    which Lightning's refuses, seeds as ``seed_everything`` above, as the run's first process was."""
    if seed is not None and int(seed) > np.iinfo(np.uint32).max:
        return seed_everything(int(seed))
    return _LIGHTNING_SEED_EVERYTHING(seed, workers=workers, verbose=verbose)


# reset_seed looks seed_everything up in its module when it runs; Lightning's public
# seed_everything (L.seed_everything, used above) is another name and stays as it is.
lightning_seed.seed_everything = _seed_everything_in_a_rank
