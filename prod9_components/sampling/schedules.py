"""MaskGiT mask schedules: the fraction of tokens still masked at progress r in [0, 1].

Every schedule decreases from ``f(0) = 1`` (all masked) to ``f(1) = 0`` (none masked). Training draws the
mask ratio of each sample from the same schedule that sampling steps through (Chang et al., 2022).

- ``cosine``: cos(pi r / 2) (MaskGiT's default; few tokens are fixed early, many late).
- ``linear``: 1 - r.
- ``sqrt``: 1 - sqrt(r) (many tokens fixed early).
- ``log``: 1 - log(1 + r (e - 1)), a natural-log curve rescaled to hit 0 at r = 1 (many tokens fixed early,
  gentler than ``sqrt``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["SCHEDULES", "mask_ratio", "sample_training_mask"]

SCHEDULES = ("cosine", "linear", "sqrt", "log")


def mask_ratio(r: float | torch.Tensor, schedule: str = "cosine") -> float | torch.Tensor:
    """Fraction of tokens still masked at progress ``r`` (clamped to [0, 1]); a float for a float, else a tensor."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown mask schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}.")
    is_float = not isinstance(r, torch.Tensor)
    r = torch.as_tensor(r, dtype=torch.float64 if is_float else None).clamp(0.0, 1.0)
    if schedule == "cosine":
        ratio = torch.cos(r * (math.pi / 2))
    elif schedule == "linear":
        ratio = 1.0 - r
    elif schedule == "sqrt":
        ratio = 1.0 - torch.sqrt(r)
    else:
        ratio = 1.0 - torch.log1p(r * (math.e - 1.0))
    ratio = ratio.clamp(0.0, 1.0)  # cos(pi/2) and log(e) are off by rounding only
    return float(ratio) if is_float else ratio


def sample_training_mask(
    shape: Sequence[int],
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """
    Draw one training mask per sample: r ~ U(0, 1), then ``ceil(mask_ratio(r) * N)`` (at least 1) random positions.

    Args:
        shape: (B, d, h, w) token-grid shape.
        schedule: one of :data:`SCHEDULES`.
        generator: a torch.Generator for reproducible masks; its device is used when ``device`` is None.
        device: device of the returned mask.

    Returns:
        bool tensor of ``shape``, True = masked (the positions the loss is computed on).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be (B, d, h, w) with positive sizes, got {shape}.")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    batch, num_tokens = shape[0], math.prod(shape[1:])
    r = torch.rand(batch, generator=generator, device=device)
    counts = torch.ceil(mask_ratio(r, schedule) * num_tokens).long().clamp(1, num_tokens)  # (B,)
    # A random permutation per sample: the positions with the `count` smallest scores are masked.
    scores = torch.rand(batch, num_tokens, generator=generator, device=device)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < counts[:, None]).view(shape)
