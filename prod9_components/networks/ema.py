"""Exponential moving average of a network's weights (the weights diffusion models sample with)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from prod9_components.networks.export import unwrap


class ExponentialMovingAverage(nn.Module):
    """A frozen copy of ``network`` whose weights follow it: ``ema += (1 - d) * (weights - ema)`` per update.

    The decay warms up as ``d = min(decay, (1 + n) / (10 + n))`` after n updates, so a short run's average is not
    stuck at the initial weights. Buffers (none in MAISI UNets) are copied. ``state_dict`` holds the average and
    the update count (resumable); :func:`~prod9_components.networks.export.unwrap` sees the inner network, so
    checkpoint records of an EMA rebuild the plain network class.

    Args:
        network: the trained network (possibly DDP-wrapped).
        decay: the long-run decay, e.g. 0.999.
    """

    def __init__(self, network: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.module = copy.deepcopy(unwrap(network)).eval().requires_grad_(False)
        self.decay = float(decay)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        decay = self.current_decay()
        source = unwrap(network)
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in zip(ema_params, source.parameters())],
                             1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), source.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def train(self, mode: bool = True) -> ExponentialMovingAverage:
        super().train(False)  # the average never runs in training mode
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
