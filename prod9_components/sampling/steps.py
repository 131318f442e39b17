"""The checks of a sampler's settings, both families alike: its step count (``num_inference_steps``: MaskGiT decoding
steps, rectified-flow Euler steps), how many samples it draws (``segmentation_samples``), its scales
(``guidance_scale``, a ControlNet's ``conditioning_scale``) and the rectified-flow scheduler arguments a MAISI
ControlNet replaces (``scheduler_overrides``)."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping

__all__ = ["check_count", "check_num_steps", "check_scale", "check_scheduler_overrides"]


def check_num_steps(num_steps: int, maximum: int | None = None) -> int:
    """``num_steps`` as an int if it is a whole number in 1..``maximum`` (no upper bound when None), else a one-line
    ValueError naming the flag, so a bad value is refused before anything is sampled or written.

    Args:
        num_steps: the requested number of sampling steps.
        maximum: the most steps the sampler can take (a rectified flow: its T training timesteps).
    """
    whole = isinstance(num_steps, numbers.Integral) and not isinstance(num_steps, bool)
    if whole and 1 <= num_steps and (maximum is None or num_steps <= maximum):
        return int(num_steps)
    if maximum is None:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps!r} (a whole number of steps)")
    raise ValueError(f"num_inference_steps must be an integer in 1..{maximum} (the training timesteps), got "
                     f"{num_steps!r}")


def check_count(name: str, value: int) -> int:
    """``value`` as an int if it is a whole number >= 1, else a one-line ValueError naming the setting ``name``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


SCALE_MEANINGS = {"guidance_scale": "1 = no guidance", "conditioning_scale": "1 = the ControlNet as trained"}


def check_scale(name: str, value: float) -> float:
    """``value`` as a float if it is a finite real number >= 0, else a one-line ValueError naming the setting ``name``
    (one of :data:`SCALE_MEANINGS`): a NaN scale would write NaN volumes, a string would fail deep in the sampler."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if real and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(f"{name} must be a finite number >= 0 ({SCALE_MEANINGS[name]}), got {value!r}")


def check_scheduler_overrides(overrides: Mapping) -> None:
    """Refuse ``scheduler_overrides`` that is not a mapping of MONAI ``RFlowScheduler`` arguments to plain values
    (bool, number, string), naming the key or value: the bundle checks it in ``initialize``, before the run writes
    anything, rather than failing in the scheduler's constructor after the split is recorded."""
    from monai.networks.schedulers import RFlowScheduler

    if not isinstance(overrides, Mapping):
        raise ValueError(f"scheduler_overrides must be a mapping of RFlowScheduler arguments, got {overrides!r}")
    known = set(inspect.signature(RFlowScheduler).parameters)
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"scheduler_overrides: {key!r} is not an RFlowScheduler argument (one of "
                             f"{', '.join(sorted(known))})")
        if not isinstance(value, (bool, numbers.Real, str)) or (isinstance(value, numbers.Real)
                                                                  and not math.isfinite(value)):
            raise ValueError(f"scheduler_overrides: {key} must be a bool, finite number or string, got {value!r}")
