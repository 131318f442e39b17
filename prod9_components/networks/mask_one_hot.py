"""Tumour masks as ControlNet inputs: checked integer labels -> one-hot channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def mask_one_hot(mask: torch.Tensor, num_classes: int, expected_shape: Sequence[int] | None = None) -> torch.Tensor:
    """One-hot float32 (B, num_classes, D, H, W) of integer labels (B, D, H, W).

    Raises:
        ValueError: when ``mask`` is not ``expected_shape`` or holds labels outside [0, num_classes).
    """
    if expected_shape is not None and tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"control_mask must be {tuple(expected_shape)}, got shape {tuple(mask.shape)}.")
    if mask.numel() and (mask.min() < 0 or mask.max() >= num_classes):
        raise ValueError(f"control mask labels must be in [0, {num_classes}), "
                         f"got [{int(mask.min())}, {int(mask.max())}].")
    return F.one_hot(mask.long(), num_classes).movedim(-1, 1).float()
