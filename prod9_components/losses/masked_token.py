"""Masked-token cross-entropy of MaskGiT stage 2: the loss is computed on the masked target positions only.

Computing it on the visible positions teaches the model to copy its input (DESIGN §4, trap 3), so the visible
positions are dropped before the reduction: their gradient is exactly zero, not merely down-weighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_token_loss", "masked_token_loss", "token_loss"]

# Rows of logits per chunk of linear_token_loss: 2**22 float32 logits (16 MB) stay in a CPU's cache; a GPU wants
# few, large chunks.
CHUNK_LOGITS = {"cpu": 2**22}
CHUNK_LOGITS_DEFAULT = 2**26


def token_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """
    Mean cross-entropy and token accuracy over already selected positions (the training path: the network scored
    only the masked positions, ``network(..., positions=mask)``).

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


class _LinearCrossEntropy(torch.autograd.Function):
    """Head + mean cross-entropy over row chunks; the gradients are computed in the forward, chunk by chunk, so the
    (M, K) logits, their log-softmax and its gradient never exist whole (a third of a CPU transformer step went to
    writing and re-reading them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        rows, vocabulary = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_LOGITS.get(hidden.device.type, CHUNK_LOGITS_DEFAULT) // vocabulary)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for start in range(0, rows, chunk):
            part, true = hidden[start:start + chunk], targets[start:start + chunk]
            logits = torch.addmm(bias, part, weight.t()).float()  # (m, K)
            true_logit = logits.gather(1, true[:, None])[:, 0]
            log_total = torch.logsumexp(logits, dim=1)
            loss += (log_total - true_logit).sum()
            correct += (true_logit >= logits.amax(dim=1)).sum()
            if need_hidden or need_weight or need_bias:
                # d(mean CE)/d(logits) = (softmax - one_hot) / M, made in place in the chunk's logits.
                grad = logits.sub_(log_total[:, None]).exp_()
                grad[torch.arange(len(true), device=grad.device), true] -= 1
                grad.div_(rows)
                if need_hidden:
                    grad_hidden[start:start + chunk] = grad.to(weight.dtype) @ weight
                if need_weight:
                    grad_weight += grad.t() @ part.to(grad.dtype)
                if need_bias:
                    grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        accuracy = correct.float() / rows
        ctx.mark_non_differentiable(accuracy)
        return loss / rows, accuracy

    @staticmethod
    def backward(ctx, grad_loss, _grad_accuracy):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return tuple(None if grad is None else grad * grad_loss.to(grad.dtype)
                     for grad in (grad_hidden, grad_weight, grad_bias)) + (None,)


def linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    :func:`token_loss` of ``hidden @ weight.T + bias`` without holding the logits: the output head and the mean
    cross-entropy fused, in chunks of rows (the training path of the MaskGiT transformers).

    Args:
        hidden: (M, C) the masked positions' final hidden rows.
        weight: (K, C) and bias (K,): the output head (``nn.Linear(C, K)``).
        targets: (M,) int64 true token ids in [0, K).

    Returns:
        dict with ``loss`` (scalar, differentiable in ``hidden``, ``weight`` and ``bias``: the mean over the M rows)
        and ``token_accuracy`` (scalar, not differentiable): the fraction of rows whose true token has the largest
        logit.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1] or bias.shape != weight.shape[:1]:
        raise ValueError(f"expected hidden (M, C), weight (K, C) and bias (K,), got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}.")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets (M,) = ({hidden.shape[0]},), got {tuple(targets.shape)}.")
    if hidden.shape[0] == 0:
        raise ValueError("mask selects no position: the masked-token loss needs at least one masked token.")
    loss, accuracy = _LinearCrossEntropy.apply(hidden, weight, bias, targets)
    return {"loss": loss, "token_accuracy": accuracy}
