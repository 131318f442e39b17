"""The MaskGiT transformers' output head fused with their training loss: the masked positions' mean cross-entropy
and token accuracy computed from the hidden rows and the head's weights in chunks, so the (M, K) logits (K = 15,360
FSQ codes) are never held. It lives with the networks because their ``forward(..., positions, targets)`` returns it:
a DDP wrapper syncs only gradients that flow through ``forward``.
"""

from __future__ import annotations

import torch

__all__ = ["linear_token_loss"]

# Rows of logits per chunk: 2**22 float32 logits (16 MB) stay in a CPU's cache; a GPU wants few, large chunks.
CHUNK_LOGITS = {"cpu": 2**22}
CHUNK_LOGITS_DEFAULT = 2**26


class _LinearCrossEntropy(torch.autograd.Function):
    """Head + mean cross-entropy over row chunks; the gradients are computed in the forward, chunk by chunk, so the
    (M, K) logits, their log-softmax and its gradient never exist whole (a third of a CPU transformer step went to
    writing and re-reading them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_weights):
        rows, vocabulary = hidden.shape[0], weight.shape[0]
        total = float(rows) if row_weights is None else row_weights.sum()  # the loss is sum(w * CE) / sum(w)
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
            scale = None if row_weights is None else row_weights[start:start + chunk].float()
            loss += (log_total - true_logit).sum() if scale is None else ((log_total - true_logit) * scale).sum()
            correct += (true_logit >= logits.amax(dim=1)).sum()
            if need_hidden or need_weight or need_bias:
                # d(mean CE)/d(logits) = w (softmax - one_hot) / sum(w), made in place in the chunk's logits.
                grad = logits.sub_(log_total[:, None]).exp_()
                grad[torch.arange(len(true), device=grad.device), true] -= 1
                if scale is not None:
                    grad.mul_(scale[:, None])
                grad.div_(total)
                if need_hidden:
                    grad_hidden[start:start + chunk] = grad.to(weight.dtype) @ weight
                if need_weight:
                    grad_weight += grad.t() @ part.to(grad.dtype)
                if need_bias:
                    grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        accuracy = correct.float() / rows
        ctx.mark_non_differentiable(accuracy)
        return loss / total, accuracy

    @staticmethod
    def backward(ctx, grad_loss, _grad_accuracy):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return tuple(None if grad is None else grad * grad_loss.to(grad.dtype)
                     for grad in (grad_hidden, grad_weight, grad_bias)) + (None, None)


def linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      targets: torch.Tensor, row_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """
    ``losses.masked_token.token_loss`` of ``hidden @ weight.T + bias`` without holding the logits: the output head
    and the mean cross-entropy fused, in chunks of rows (the training path of the MaskGiT transformers).

    Args:
        hidden: (M, C) the masked positions' final hidden rows.
        weight: (K, C) and bias (K,): the output head (``nn.Linear(C, K)``).
        targets: (M,) int64 true token ids in [0, K).
        row_weights: (M,) >= 0, not all 0, or None: each row's weight in the mean (None: equal weights).

    Returns:
        dict with ``loss`` (scalar, differentiable in ``hidden``, ``weight`` and ``bias``: the mean over the M rows,
        weighted by ``row_weights``)
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
    if row_weights is not None and row_weights.shape != targets.shape:
        raise ValueError(f"expected row_weights (M,) = ({hidden.shape[0]},), got {tuple(row_weights.shape)}.")
    loss, accuracy = _LinearCrossEntropy.apply(hidden, weight, bias, targets, row_weights)
    return {"loss": loss, "token_accuracy": accuracy}
