"""The training budget a batch-size study holds as the batch changes: a run's ``budget`` options.

Changing the batch size changes three things at once: the batch the norm normalizes over, the
number of optimizer steps (at a fixed number of epochs, batch size 128 takes 64x fewer steps than
batch size 2) and the learning rate per example. No budget is neutral, so it is part of the
experiment, stated in every run's config and record:

- ``study``: what the config says, the same epochs and learning rate at every batch size (the
  studies' protocol, so they reproduce as published).
- ``steps``: every run takes the same ``steps`` optimizer steps (``trainer.max_steps``), whatever
  its batch, and is evaluated ``evaluations`` times at even intervals; larger batches then see
  more images (Hoffer et al. 2017's "regime adaptation").
- ``scaled_lr``: the config's epochs, and its learning rate scaled from ``reference_batch_size``
  to the run's global batch by ``rule``: ``linear`` (Goyal et al. 2017, for SGD; Wu & He 2018) or
  ``sqrt`` (Malladi et al. 2022, the rule for Adam).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from jsonargparse import Namespace
from jsonargparse.typing import PositiveInt

PROTOCOLS = ("study", "steps", "scaled_lr")


@dataclass
class Budget:
    """What a run holds fixed across batch sizes (``normbench.budget``).

    Args:
        protocol: ``study`` (the config's epochs and learning rate), ``steps`` (``steps``
            optimizer steps at every batch size) or ``scaled_lr`` (the learning rate scaled
            from ``reference_batch_size`` by ``rule``).
        steps: with ``steps``: the optimizer steps every run takes.
        evaluations: with ``steps``: evaluations of the test (or validation) split, evenly
            spaced, the last after the last step; ``steps`` must be a multiple of it.
        reference_batch_size: with ``scaled_lr``: the global batch size at which the config's
            learning rate holds.
        rule: with ``scaled_lr``: ``sqrt`` (lr x sqrt(B / B_ref), for Adam) or ``linear``
            (lr x B / B_ref, for SGD).
        reference_lr: with ``scaled_lr``: the learning rate at ``reference_batch_size``
            (default: the optimizer's, written here when the run starts, so that its saved
            config.yaml scales from the same figure when it is run again).
    """

    protocol: Literal["study", "steps", "scaled_lr"] = "study"
    steps: PositiveInt | None = None
    evaluations: PositiveInt = 5
    reference_batch_size: PositiveInt | None = None
    rule: Literal["sqrt", "linear"] = "sqrt"
    reference_lr: float | None = None


def scaled_lr(lr: float, batch_size: int, reference_batch_size: int, rule: str) -> float:
    """``lr`` moved from ``reference_batch_size`` to ``batch_size`` by ``rule`` (sqrt or linear)."""
    ratio = batch_size / reference_batch_size
    return lr * (math.sqrt(ratio) if rule == "sqrt" else ratio)


def apply_budget(config: Namespace, global_batch_size: int) -> None:
    """Set the run's steps, evaluations and learning rate from ``config.budget`` (in place, so
    that the run's saved config.yaml states what it trained with).

    Args:
        config: the run's parsed config (a subcommand's namespace).
        global_batch_size: images per optimizer step (per-device batch x devices x nodes).
    """
    budget = config.get("budget")
    if budget is None or budget.protocol == "study":
        return
    trainer = config.trainer
    if budget.protocol == "steps":
        if budget.steps is None:
            raise ValueError("budget.protocol=steps needs budget.steps; give the optimizer steps every run takes")
        if budget.steps % budget.evaluations:
            divisors = [d for d in range(1, min(budget.steps, 20) + 1) if budget.steps % d == 0]
            raise ValueError(
                f"budget.evaluations={budget.evaluations} does not divide budget.steps={budget.steps}; give one of "
                f"{', '.join(map(str, divisors))} evaluations, or steps that are a multiple of {budget.evaluations}"
            )
        # Plain ints: jsonargparse's PositiveInt does not dump to YAML.
        trainer.max_steps = int(budget.steps)
        trainer.max_epochs = -1
        trainer.val_check_interval = int(budget.steps) // int(budget.evaluations)
        trainer.check_val_every_n_epoch = None
        return
    if budget.reference_batch_size is None:
        raise ValueError(
            "budget.protocol=scaled_lr needs budget.reference_batch_size; give the batch size at which the "
            "config's learning rate holds"
        )
    optimizer = config.model.get("optimizer")
    init_args = getattr(optimizer, "init_args", None)
    if init_args is None or (init_args.get("lr") is None and budget.reference_lr is None):
        raise ValueError("budget.protocol=scaled_lr needs an optimizer with an lr; give --model.optimizer.init_args.lr")
    if budget.reference_lr is None:
        budget.reference_lr = init_args.lr
    init_args.lr = scaled_lr(budget.reference_lr, global_batch_size, budget.reference_batch_size, budget.rule)


def check_end(trainer: Namespace) -> str | None:
    """Where a run ends: never is an error (``max_epochs`` -1 with no ``max_steps`` or
    ``max_time``); before its first evaluation (``max_steps`` below an int ``val_check_interval``
    of steps, a shortened iteration run of study 1's) is the line returned to say, as its only
    test accuracy would be the one before training, if any. None otherwise.

    Args:
        trainer: the run's trainer settings.
    """
    if trainer.max_epochs == -1 and trainer.max_steps in (None, -1) and trainer.max_time is None:
        raise ValueError(
            "trainer.max_epochs=-1 with no max_steps or max_time trains forever; set --trainer.max_epochs to "
            "a positive number of epochs, or give --trainer.max_steps"
        )
    steps, every = trainer.get("max_steps"), trainer.get("val_check_interval")
    if isinstance(every, bool) or not isinstance(every, int) or steps is None or not 0 < steps < every:
        return None
    return (f"normbench: trainer.max_steps={steps} ends before the first evaluation, at step {every} "
            f"(trainer.val_check_interval): no test accuracy after training; give --trainer.val_check_interval "
            f"{steps} to evaluate at the end")  # fmt: skip
