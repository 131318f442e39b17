"""linear_token_loss, the fused head + cross-entropy of MaskGiT training, against F.cross_entropy on the logits."""

import pytest
import torch
import torch.nn.functional as F

from prod9_components.networks import token_head
from prod9_components.networks.fsq import FiniteScalarQuantizer
from prod9_components.networks.token_head import linear_token_loss


def head_and_rows(rows=23, channels=8, vocabulary=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, channels, generator=g, requires_grad=True)
    head = torch.nn.Linear(channels, vocabulary)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocabulary, channels, generator=g))
        head.bias.copy_(torch.randn(vocabulary, generator=g))
    targets = torch.randint(0, vocabulary, (rows,), generator=g)
    return hidden, head, targets


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("chunk_rows", [1, 5, 23, 100])
def test_fused_loss_matches_cross_entropy_of_the_logits(monkeypatch, chunk_rows):
    """Loss, accuracy and all three gradients equal F.cross_entropy's on the materialised logits, whatever the
    chunking (1 row, uneven chunks, exactly M, more than M); a scaled loss scales the gradients."""
    hidden, head, targets = head_and_rows()
    monkeypatch.setitem(token_head.CHUNK_LOGITS, "cpu", chunk_rows * head.out_features)
    logits = head(hidden)
    # About a third of the rows made right, so the accuracy is neither 0 nor 1.
    targets = torch.where(torch.arange(len(targets)) % 3 == 0, logits.argmax(1), targets)
    expected = F.cross_entropy(logits, targets)
    out = linear_token_loss(hidden, head.weight, head.bias, targets)
    torch.testing.assert_close(out["loss"], expected, atol=1e-6, rtol=1e-6)
    assert out["token_accuracy"] == (logits.argmax(1) == targets).float().mean() and 0 < out["token_accuracy"] < 1
    assert not out["token_accuracy"].requires_grad
    tensors = (hidden, head.weight, head.bias)
    for got, want in zip(grads(3 * out["loss"], tensors), grads(3 * expected, tensors)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 5, 100])
def test_row_weights_give_the_weighted_mean_cross_entropy(monkeypatch, chunk_rows):
    """With row weights (a tumour's tokens 50x), loss and gradients equal sum(w * CE) / sum(w) on the logits; the
    accuracy stays the plain fraction of rows right."""
    hidden, head, targets = head_and_rows()
    monkeypatch.setitem(token_head.CHUNK_LOGITS, "cpu", chunk_rows * head.out_features)
    weights = torch.where(torch.arange(len(targets)) < 4, 50.0, 1.0)
    logits = head(hidden)
    expected = (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / weights.sum()
    out = linear_token_loss(hidden, head.weight, head.bias, targets, weights)
    torch.testing.assert_close(out["loss"], expected, atol=1e-6, rtol=1e-6)
    assert abs(float(out["loss"]) - float(F.cross_entropy(logits, targets))) > 0.01  # the weights matter
    assert out["token_accuracy"] == (logits.argmax(1) == targets).float().mean()
    tensors = (hidden, head.weight, head.bias)
    for got, want in zip(grads(2 * out["loss"], tensors), grads(2 * expected, tensors)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="expected row_weights"):
        linear_token_loss(hidden, head.weight, head.bias, targets, weights[:3])


def test_frozen_head_gets_no_gradient_and_the_rows_still_learn():
    """A ControlNet's base head is frozen: only ``hidden`` gets a gradient, the same one as through the logits."""
    hidden, head, targets = head_and_rows()
    head.requires_grad_(False)
    out = linear_token_loss(hidden, head.weight, head.bias, targets)
    out["loss"].backward()
    assert head.weight.grad is None and head.bias.grad is None
    expected = grads(F.cross_entropy(head(hidden), targets), (hidden,))[0]
    torch.testing.assert_close(hidden.grad, expected, atol=1e-6, rtol=1e-5)


def test_bad_shapes_and_empty_masks_are_named():
    hidden, head, targets = head_and_rows()
    with pytest.raises(ValueError, match="expected hidden"):
        linear_token_loss(hidden[:, :4], head.weight, head.bias, targets)
    with pytest.raises(ValueError, match="expected targets"):
        linear_token_loss(hidden, head.weight, head.bias, targets[:3])
    with pytest.raises(ValueError, match="no position"):
        linear_token_loss(hidden[:0], head.weight, head.bias, targets[:0])


@pytest.mark.parametrize("chunk_rows", [1, 7, 100])
@pytest.mark.parametrize("weighted", [False, True])
def test_code_error_term_matches_autograd_of_the_expected_code(monkeypatch, chunk_rows, weighted):
    """With a codebook, loss = CE + code_weight x mean |softmax(logits) @ codebook - codebook[target]|^2 / C (row
    weights as for the CE), its gradients those of autograd through the materialised logits; code_error is reported
    whether or not it is weighted, and a code weight without a codebook is refused."""
    hidden, head, targets = head_and_rows(vocabulary=30)
    monkeypatch.setitem(token_head.CHUNK_LOGITS, "cpu", chunk_rows * head.out_features)
    codebook = FiniteScalarQuantizer([5, 3, 2]).codebook()  # 30 codes of 3 channels
    weights = torch.where(torch.arange(len(targets)) < 4, 20.0, 1.0) if weighted else torch.ones(len(targets))
    logits = head(hidden)
    squared = ((torch.softmax(logits, 1) @ codebook - codebook[targets]) ** 2).mean(1)
    ce = F.cross_entropy(logits, targets, reduction="none")
    error = (squared * weights).sum() / weights.sum()
    expected = (ce * weights).sum() / weights.sum() + 7.0 * error
    out = linear_token_loss(hidden, head.weight, head.bias, targets, weights if weighted else None, codebook, 7.0)
    torch.testing.assert_close(out["loss"], expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out["code_error"], error.detach(), atol=1e-6, rtol=1e-6)
    assert float(error) > 0.05 and not out["code_error"].requires_grad  # the term is not negligible here
    tensors = (hidden, head.weight, head.bias)
    for got, want in zip(grads(out["loss"], tensors), grads(expected, tensors)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    unweighted = linear_token_loss(hidden, head.weight, head.bias, targets, codebook=codebook)
    torch.testing.assert_close(unweighted["loss"], F.cross_entropy(logits, targets), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(unweighted["code_error"], squared.mean().detach(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="code_weight must be"):
        linear_token_loss(hidden, head.weight, head.bias, targets, code_weight=1.0)
    with pytest.raises(ValueError, match="expected codebook"):
        linear_token_loss(hidden, head.weight, head.bias, targets, codebook=codebook[:5])
