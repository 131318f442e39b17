"""Masked-token cross-entropy of MaskGiT stage 2: the loss is computed on the masked target positions only.

Computing it on the visible positions teaches the model to copy its input (DESIGN §4, trap 3), so the visible
positions are dropped before the reduction: their gradient is exactly zero, not merely down-weighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_token_loss", "token_loss"]


def token_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """
    Mean cross-entropy and token accuracy over already selected positions (the logits of
    ``network(..., positions=mask)``; training asks for the loss itself, ``positions=mask, targets=...``:
    :func:`~prod9_components.networks.token_head.linear_token_loss`, the same numbers without the logits).

    Args:
        logits: (M, K) token logits, one row per masked position.
        targets: (M,) int64 true token ids in [0, K), ``target_tokens[mask]`` (the same row order).
        label_smoothing: passed to ``F.cross_entropy``.

    Returns:
        dict with ``loss`` (scalar, differentiable: the mean over the M rows) and ``token_accuracy`` (scalar,
        detached): the fraction of rows whose argmax logit is the true token.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (M, K) and targets (M,), got {tuple(logits.shape)}, {tuple(targets.shape)}.")
    if logits.shape[0] == 0:
        raise ValueError("mask selects no position: the masked-token loss needs at least one masked token.")
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)  # mean over the M rows
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
    return {"loss": loss, "token_accuracy": accuracy}


def masked_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0
) -> dict[str, torch.Tensor]:
    """
    Mean cross-entropy and token accuracy over the masked positions of full-grid logits (evaluation; training asks
    the network for the masked rows only and calls :func:`token_loss`).

    Args:
        logits: (B, K, d, h, w) token logits.
        targets: (B, d, h, w) int64 true token ids in [0, K).
        mask: (B, d, h, w) bool, True = masked in the model input (where the loss is computed).
        label_smoothing: passed to ``F.cross_entropy``.

    Returns:
        dict with ``loss`` (scalar, differentiable) and ``token_accuracy`` (scalar, detached): the fraction of
        masked positions whose argmax logit is the true token.
    """
    if logits.ndim != 5 or targets.shape != logits.shape[:1] + logits.shape[2:] or mask.shape != targets.shape:
        raise ValueError(
            "expected logits (B, K, d, h, w), targets and mask (B, d, h, w), got "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}."
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = masked), got dtype {mask.dtype}.")
    if not mask.any():
        raise ValueError("mask selects no position: the masked-token loss needs at least one masked token.")
    # The masked rows first: the log-softmax (and its backward) then touches M rows, not all B*d*h*w.
    return token_loss(logits.movedim(1, -1)[mask], targets[mask], label_smoothing)
