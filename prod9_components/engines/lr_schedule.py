"""Learning-rate schedules by name, stepped once per iteration (MONAI ``LrScheduleHandler(epoch_level=False)``)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULES", "check_schedule", "lr_schedule"]

SCHEDULES = ("constant", "cosine")


def _factor(step: int, name: str, total_steps: int, warmup_steps: int) -> float:
    """The factor on the base learning rate at iteration ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_schedule(name: str, warmup_steps: int) -> None:
    """Refuse an unknown schedule ``name`` or a negative (or non-integer) ``warmup_steps``, naming the value. The
    bundles call it first in ``initialize``: before the run writes anything (its ``datalist.json``).

    Raises:
        ValueError: as above.
    """
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}")


def lr_schedule(optimizer: torch.optim.Optimizer, name: str = "constant", total_steps: int = 1,
                warmup_steps: int = 0) -> LambdaLR:
    """A linear warm-up over ``warmup_steps`` iterations, then ``"constant"`` or ``"cosine"`` (half a cosine from
    the base learning rate to 0 at ``total_steps``, constant 0 after it).

    A short run needs the decay: at a constant rate large enough to learn in a few hundred steps, the last weights
    are as noisy as the steps (measured on the demo's stage 1: +1-2 dB PSNR from the decay alone).

    Raises:
        ValueError: an unknown ``name`` or a negative step count, naming the value.
    """
    check_schedule(name, warmup_steps)
    if int(total_steps) < 1:
        raise ValueError(f"lr_schedule needs total_steps >= 1, got {total_steps}")
    # A partial keeps its arguments out of LambdaLR.state_dict: a resumed run keeps its step count (last_epoch) but
    # follows the schedule of its own config (e.g. more epochs), and the checkpoint holds no callable.
    factor = partial(_factor, name=name, total_steps=int(total_steps), warmup_steps=int(warmup_steps))
    return LambdaLR(optimizer, factor)
