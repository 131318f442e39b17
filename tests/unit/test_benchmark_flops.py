"""scripts/benchmark.py counts the CPU attention kernel's FLOPs (torch's counter alone reports 0 for it, which made
every CPU transformer step look far from the matmul peak)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.helpers import script_module


def test_cpu_attention_forward_and_backward_are_counted():
    batch, heads, tokens, dim = 2, 3, 40, 8
    q, k, v = (torch.randn(batch, heads, tokens, dim, requires_grad=True) for _ in range(3))
    with script_module("benchmark").flop_counter() as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    forward = 2 * (2 * batch * heads * tokens * tokens * dim)  # q @ k^T and scores @ v
    assert counter.get_total_flops() == forward
    with script_module("benchmark").flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 5 * forward // 2  # recomputed scores + four gradient matmuls


def test_a_transformer_layer_counts_its_attention_beside_its_linear_layers():
    # training mode: in eval mode torch runs the layer as one fused kernel that no counter sees
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    tokens = torch.randn(1, 50, 16)
    with script_module("benchmark").flop_counter() as counter:
        layer(tokens)
    linear = 2 * 50 * (16 * 48 + 16 * 16 + 16 * 32 + 32 * 16)  # qkv, out projection, feed-forward
    attention = 2 * (2 * 50 * 50 * 16)
    assert counter.get_total_flops() == linear + attention
