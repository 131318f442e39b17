"""The checks of a sampler's settings, both families alike: its step count (``num_inference_steps``: MaskGiT decoding
steps, rectified-flow Euler steps) and its scales (``guidance_scale``, a ControlNet's ``conditioning_scale``)."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_num_steps", "check_scale"]


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


SCALE_MEANINGS = {"guidance_scale": "1 = no guidance", "conditioning_scale": "1 = the ControlNet as trained"}


def check_scale(name: str, value: float) -> float:
    """``value`` as a float if it is a finite real number >= 0, else a one-line ValueError naming the setting ``name``
    (one of :data:`SCALE_MEANINGS`): a NaN scale would write NaN volumes, a string would fail deep in the sampler."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if real and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(f"{name} must be a finite number >= 0 ({SCALE_MEANINGS[name]}), got {value!r}")
