"""MONAI's MAISI autoencoder blocks made fast on CPU, in place: the same maths and parameter names.

Both stage-1 autoencoders (the FSQ one and the KL-VAE) are built from MAISI's encoder and decoder, whose blocks
are written to fit whole volumes in GPU memory:

- ``MaisiGroupNorm3D`` normalises one group at a time in Python; on CPU that is ~6x slower for the whole network,
  and tiled inference bounds the memory anyway: torch's ``GroupNorm`` instead.
- ``MaisiResBlock`` and ``MaisiUpsample`` end in ``convert_to_tensor``, which copies their output into the
  contiguous layout. The trainers keep CPU activations channels-last, so every block's output was copied out of it
  and, by the next convolution, back (again in the backward pass): 7% of a demo training step of either (0.292 ->
  0.270 s VAE, 0.311 -> 0.289 s FSQ). Here they return their output as computed, a plain tensor as before.
"""

from __future__ import annotations

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
        adapt_maisi_blocks(child)
