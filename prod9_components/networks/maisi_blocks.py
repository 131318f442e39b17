"""MONAI's MAISI autoencoder blocks made fast on CPU, in place: the same maths and parameter names.

Both stage-1 autoencoders (the FSQ one and the KL-VAE) are built from MAISI's encoder and decoder, whose blocks
are written to fit whole volumes in GPU memory:

- ``MaisiGroupNorm3D`` normalises one group at a time in Python; on CPU that is ~6x slower for the whole network,
  and tiled inference bounds the memory anyway: torch's ``GroupNorm`` instead.
- ``MaisiResBlock`` and ``MaisiUpsample`` end in ``convert_to_tensor``, which copies their output into the
  contiguous layout. The trainers keep CPU activations channels-last, so every block's output was copied out of it
  and, by the next convolution, back (again in the backward pass): 7% of a demo training step of either (0.292 ->
  0.270 s VAE, 0.311 -> 0.289 s FSQ). Here they return their output as computed, a plain tensor as before.
- The decoder's last convolution, to one channel at full resolution, gets about 4 GFLOP/s of a CPU core from oneDNN
  (fwd + bwd 52-74 ms of a ~0.30 s demo step): one output channel leaves its kernels nothing to vectorise over. In
  training on CPU it runs as one matrix product over the channels and 27 shifted sums (:class:`_ToOneChannel`), 28-41
  ms, the same numbers to float rounding (paired demo VAE steps 0.336 -> 0.291 s).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D, MaisiResBlock, MaisiUpsample

__all__ = ["adapt_maisi_blocks"]


class _ResBlock(MaisiResBlock):
    """``MaisiResBlock`` without the layout copy: x (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        # h first: the sum takes its layout (single-threaded, torch runs the 1x1x1 shortcut outside oneDNN, which
        # returns it contiguous); metadata dropped, as convert_to_tensor did
        return (h + shortcut).as_subclass(torch.Tensor)


class _Upsample(MaisiUpsample):
    """``MaisiUpsample`` without the layout copy: x (B, C, D, H, W) -> (B, C, 2D, 2H, 2W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_convtranspose:
            x = F.interpolate(x, scale_factor=2.0, mode="trilinear")
        return self.conv(x).as_subclass(torch.Tensor)


def _shifts(spatial: tuple[int, ...]) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Per offset ``o`` of a 3x3x3 kernel, in its weights' order: ``(out, in)`` slices of (N, D, H, W) arrays such that
    ``out`` holds the positions ``p`` whose neighbour ``p + o`` is inside the volume and ``in`` those neighbours."""
    return [(((slice(None),) + tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, spatial))),
             ((slice(None),) + tuple(slice(max(0, o), n + min(0, o)) for o, n in zip(offset, spatial))))
            for offset in itertools.product((-1, 0, 1), repeat=3)]


class _OneChannelConvFunction(torch.autograd.Function):
    """A 3x3x3 convolution (stride 1, zero padding 1) from C channels to one: ``taps = w^T x`` gives each voxel's 27
    kernel taps (27, N, D, H, W) in one matrix product, and the output is their 27 shifted sums; backward shifts the
    output gradient the other way (27 copies) for two more products."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (N, C, D, H, W), best channels-last; weight (1, C, 3, 3, 3); bias (1,) or None -> (N, 1, D, H, W)."""
        n, c, *spatial = x.shape
        taps = torch.mm(weight.reshape(c, 27).t(), x.permute(0, 2, 3, 4, 1).reshape(-1, c).t()).view(27, n, *spatial)
        y = (torch.zeros(n, *spatial, dtype=x.dtype) if bias is None
             else bias.view(1, 1, 1, 1).expand(n, *spatial).clone())
        for tap, (out, inside) in zip(taps, _shifts(tuple(spatial))):
            y[out] += tap[inside]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.unsqueeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        n, c, *spatial = x.shape
        grad = grad[:, 0]
        grad_taps = torch.zeros(27, n, *spatial, dtype=grad.dtype)  # zero where a tap falls outside the volume
        for grad_tap, (out, inside) in zip(grad_taps, _shifts(tuple(spatial))):
            grad_tap[inside] = grad[out]
        grad_taps = grad_taps.view(27, -1)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # (N*D*H*W, C) -> channels-last (N, C, D, H, W)
            grad_x = torch.mm(grad_taps.t(), weight.reshape(c, 27).t()).view(n, *spatial, c).permute(0, 4, 1, 2, 3)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(x.permute(0, 2, 3, 4, 1).reshape(-1, c).t(), grad_taps.t()).view_as(weight)
        grad_bias = grad.sum().view(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class _ToOneChannel(nn.Conv3d):
    """A 3x3x3 ``Conv3d`` to one channel (stride 1, padding 1) that trains on CPU through
    :class:`_OneChannelConvFunction`; elsewhere (CUDA, inference) it is ``Conv3d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _OneChannelConvFunction.apply(x, self.weight, self.bias)
        return super().forward(x)


def _to_one_channel(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain ``Conv3d`` that :class:`_ToOneChannel` computes."""
    return (type(conv) is nn.Conv3d and conv.out_channels == 1 and conv.groups == 1 and conv.kernel_size == (3, 3, 3)
            and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1)
            and conv.padding_mode == "zeros")


def adapt_maisi_blocks(module: nn.Module) -> None:
    """Swap the MAISI blocks inside ``module`` for the CPU-friendly ones above, in place (weights untouched)."""
    for name, child in module.named_children():
        if isinstance(child, MaisiGroupNorm3D):
            setattr(module, name, nn.GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine))
            continue
        if type(child) is MaisiResBlock:
            child.__class__ = _ResBlock  # a subclass that only overrides forward: its state stays valid
        elif type(child) is MaisiUpsample:
            child.__class__ = _Upsample
        elif _to_one_channel(child):
            child.__class__ = _ToOneChannel
        adapt_maisi_blocks(child)
