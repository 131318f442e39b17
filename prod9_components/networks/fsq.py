"""Finite scalar quantization (Mentzer et al., 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each latent channel is bounded and rounded to a small fixed grid; the implicit codebook is the product of the
per-channel grids, so there is nothing to learn and no codebook collapse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FiniteScalarQuantizer", "code_digits"]


class FiniteScalarQuantizer(nn.Module):
    """
    Quantize each channel ``c`` of a latent to ``levels[c]`` evenly spaced values in [-1, 1].

    Channel ``c`` with ``L = levels[c]`` and ``h = L // 2`` takes the values ``k / h`` for the integers
    ``k`` in ``[-h, L - 1 - h]`` (``{-1, -0.5, 0, 0.5, 1}`` for ``L = 5``; ``{-1, ..., 0.75}`` for ``L = 8``).

    Args:
        levels: number of grid values per channel; the codebook size is their product
            (15,360 for the default ``[8, 8, 8, 6, 5]`` of the FSQ paper).
        eps: keeps the bounded value strictly inside the outermost rounding cells.

    Shapes:
        ``forward``: (B, C, *spatial) -> (B, C, *spatial) with ``C = len(levels)``;
        ``quantize``: (B, C, *spatial) codes -> (B, *spatial) int64 indices in ``[0, codebook_size)``;
        ``embed``: (B, *spatial) indices -> (B, C, *spatial) float32 codes;
        ``codebook``: () -> (codebook_size, C) float32, the codes of every index.
    """

    def __init__(self, levels: Sequence[int], eps: float = 1e-3) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"levels must be a non-empty sequence of integers >= 2, got {levels}.")
        self.levels = levels
        self.eps = float(eps)
        # Derived constants, not learned state: keep them out of the state dict.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        self.register_buffer("_half_width", torch.tensor([lv // 2 for lv in levels], dtype=torch.int64), persistent=False)
        # Mixed-radix place values: index = sum_c digit_c * prod(levels[:c]).
        basis = [math.prod(levels[:c]) for c in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

    @property
    def num_channels(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        # (C,) -> (1, C, 1, ..., 1) to broadcast over a (B, C, *spatial) tensor.
        return t.view(1, -1, *([1] * (ndim - 2)))

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z`` so that rounding yields exactly ``L`` integers, ``-L//2 .. L - 1 - L//2`` (float32)."""
        levels = self._view(self._levels, z.ndim).to(torch.float32)
        half_l = (levels - 1) * (1 - self.eps) / 2
        # Even L has no grid point at the centre: shift by half a step so the L cells are symmetric about 0,
        # and shift the tanh input so that z = 0 still maps to 0. L = 2 cannot do both (its range is (-1, 0)):
        # no input shift, so it is the sign of z.
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        ratio = offset / half_l
        shift = torch.atanh(torch.where(ratio < 1, ratio, 0.0))
        return torch.tanh(z.to(torch.float32) + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Bound, round (straight-through) and normalise ``z`` (B, C, *spatial) to grid codes in [-1, 1]."""
        if z.ndim < 3 or z.shape[1] != self.num_channels:
            raise ValueError(f"expected (B, {self.num_channels}, *spatial), got {tuple(z.shape)}.")
        bounded = self.bound(z)
        # Straight-through: the value is round(bounded) exactly (adding an exact 0), the gradient is identity.
        rounded = bounded.round().detach() + (bounded - bounded.detach())
        codes = rounded / self._view(self._half_width, z.ndim)
        return codes.to(z.dtype)

    def quantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Map grid codes (B, C, *spatial) to indices (B, *spatial); a digit mapping, no re-bounding."""
        if codes.ndim < 3 or codes.shape[1] != self.num_channels:
            raise ValueError(f"expected (B, {self.num_channels}, *spatial), got {tuple(codes.shape)}.")
        half_width = self._view(self._half_width, codes.ndim)
        digits = (codes.to(torch.float32) * half_width).round().to(torch.int64) + half_width
        return (digits * self._view(self._basis, codes.ndim)).sum(dim=1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Map indices (B, *spatial) to grid codes (B, C, *spatial), float32."""
        indices = indices.to(torch.int64).unsqueeze(1)
        digits = (indices // self._view(self._basis, indices.ndim)) % self._view(self._levels, indices.ndim)
        half_width = self._view(self._half_width, indices.ndim)
        # Same arithmetic as forward (integer-valued float / h) so the codes agree bit for bit.
        return (digits - half_width).to(torch.float32) / half_width.to(torch.float32)

    def codebook(self) -> torch.Tensor:
        """The codes of every index, (codebook_size, C) float32 on the quantizer's device (row k = ``embed(k)``)."""
        return self.embed(torch.arange(self.codebook_size, device=self._levels.device)[None])[0].t()

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"


def code_digits(levels: Sequence[int]) -> torch.Tensor:
    """One-hot FSQ digits of every token id: (prod(levels), sum(levels)) float, row ``k`` holding a 1 at digit
    ``(k // prod(levels[:c])) % levels[c]`` of each channel ``c`` (the numbering of
    :meth:`FiniteScalarQuantizer.quantize`)."""
    ids = torch.arange(math.prod(levels))
    columns = [F.one_hot((ids // math.prod(levels[:c])) % level, level) for c, level in enumerate(levels)]
    return torch.cat(columns, dim=1).float()
