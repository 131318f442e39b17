"""The one check of a sampler's step count (``num_inference_steps``): MaskGiT decoding steps and rectified-flow Euler
steps alike."""

from __future__ import annotations

import numbers

__all__ = ["check_num_steps"]


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
