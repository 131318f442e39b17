"""The MaskGiT transformers' output head fused with their training loss: the masked positions' mean cross-entropy
(plus, optionally, the squared error of their expected FSQ code) and token accuracy computed from the hidden rows and
the head's weights in chunks, so the (M, K) logits (K = 15,360 FSQ codes) are never held. It lives with the networks
because their ``forward(..., positions, targets)`` returns it: a DDP wrapper syncs only gradients that flow through
``forward``.
"""

from __future__ import annotations

import torch

__all__ = ["linear_token_loss"]

# Rows of logits per chunk: 2**22 float32 logits (16 MB) stay in a CPU's cache; a GPU wants few, large chunks.
CHUNK_LOGITS = {"cpu": 2**22}
CHUNK_LOGITS_DEFAULT = 2**26


class _LinearCrossEntropy(torch.autograd.Function):
    """Head + mean cross-entropy (+ code_weight x the expected code's squared error) over row chunks; the gradients
    are computed in the forward, chunk by chunk, so the (M, K) logits, their softmax and its gradient never exist
    whole (a third of a CPU transformer step went to writing and re-reading them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_weights, codebook, code_weight):
        rows, vocabulary = hidden.shape[0], weight.shape[0]
        total = float(rows) if row_weights is None else row_weights.sum()  # the loss is sum(w * CE) / sum(w)
        chunk = max(1, CHUNK_LOGITS.get(hidden.device.type, CHUNK_LOGITS_DEFAULT) // vocabulary)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        code_error = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for start in range(0, rows, chunk):
            part, true = hidden[start:start + chunk], targets[start:start + chunk]
            logits = torch.addmm(bias, part, weight.t()).float()  # (m, K)
            true_logit = logits.gather(1, true[:, None])[:, 0]
            log_total = torch.logsumexp(logits, dim=1)
            scale = None if row_weights is None else row_weights[start:start + chunk].float()
            loss += (log_total - true_logit).sum() if scale is None else ((log_total - true_logit) * scale).sum()
            correct += (true_logit >= logits.amax(dim=1)).sum()
            need_grad = need_hidden or need_weight or need_bias
            if need_grad or codebook is not None:
                probability = logits.sub_(log_total[:, None]).exp_()  # (m, K), in place in the chunk's logits
            if codebook is not None:
                # e = p @ codebook, the expected code; its error per row, mean over the C channels: |e - c|^2 / C.
                expected = probability @ codebook
                error = expected - codebook[true]  # (m, C)
                squared = error.square().mean(dim=1)
                code_error += squared.sum() if scale is None else (squared * scale).sum()
                if need_grad and code_weight:  # d|e - c|^2/C / d logit_k = 2 / C * p_k * (codebook_k - e) . (e - c)
                    code_grad = (error @ codebook.t()).sub_((expected * error).sum(dim=1, keepdim=True))
                    code_grad.mul_(probability).mul_(2 * code_weight / codebook.shape[1])
            if need_grad:
                # d(mean CE)/d(logits) = w (softmax - one_hot) / sum(w), made in place in the chunk's logits.
                grad = probability
                grad[torch.arange(len(true), device=grad.device), true] -= 1
                if codebook is not None and code_weight:
                    grad.add_(code_grad)
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
        accuracy, code_error = correct.float() / rows, code_error / total
        ctx.mark_non_differentiable(accuracy, code_error)
        return (loss / total + code_weight * code_error), accuracy, code_error

    @staticmethod
    def backward(ctx, grad_loss, _grad_accuracy, _grad_code_error):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return tuple(None if grad is None else grad * grad_loss.to(grad.dtype)
                     for grad in (grad_hidden, grad_weight, grad_bias)) + (None,) * 4


def linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      targets: torch.Tensor, row_weights: torch.Tensor | None = None,
                      codebook: torch.Tensor | None = None, code_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """
    ``losses.masked_token.token_loss`` of ``hidden @ weight.T + bias`` without holding the logits: the output head
    and the mean cross-entropy fused, in chunks of rows (the training path of the MaskGiT transformers).

    Args:
        hidden: (M, C) the masked positions' final hidden rows.
        weight: (K, C) and bias (K,): the output head (``nn.Linear(C, K)``).
        targets: (M,) int64 true token ids in [0, K).
        row_weights: (M,) >= 0, not all 0, or None: each row's weight in the mean (None: equal weights).
        codebook: (K, C) the FSQ code of every id, or None. When given, the loss adds ``code_weight`` times the
            squared error of each row's expected code ``softmax(logits) @ codebook`` against its true code (mean
            over the C channels, weighted like the cross-entropy): the cross-entropy counts a neighbour on the FSQ
            grid as wrong as any other id, this term counts how far off the decoded code lands.
        code_weight: >= 0, the weight of that term (it is reported either way).

    Returns:
        dict with ``loss`` (scalar, differentiable in ``hidden``, ``weight`` and ``bias``: the mean over the M rows,
        weighted by ``row_weights``, of the cross-entropy plus ``code_weight`` x the code error),
        ``token_accuracy`` (scalar, not differentiable): the fraction of rows whose true token has the largest
        logit, and with ``codebook``, ``code_error`` (scalar, not differentiable): the mean squared error of the
        expected codes.
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
    if codebook is not None and (codebook.ndim != 2 or codebook.shape[0] != weight.shape[0]):
        raise ValueError(f"expected codebook (K, C) with K = {weight.shape[0]}, got {tuple(codebook.shape)}.")
    code_weight = float(code_weight)
    if not 0.0 <= code_weight < float("inf") or (code_weight and codebook is None):
        raise ValueError(f"code_weight must be a finite number >= 0 (above 0 only with a codebook), got {code_weight}.")
    codebook = None if codebook is None else codebook.to(device=hidden.device, dtype=torch.float32)
    loss, accuracy, code_error = _LinearCrossEntropy.apply(hidden, weight, bias, targets, row_weights, codebook,
                                                           code_weight)
    out = {"loss": loss, "token_accuracy": accuracy}
    if codebook is not None:
        out["code_error"] = code_error
    return out
