"""2.5D focal frequency loss for 3D volumes (Jiang et al., "Focal Frequency Loss for Image Reconstruction and
Synthesis", ICCV 2021).

It needs no pretrained network, so it is prod9's default perceptual term: no perceptual weights can be downloaded
on the machines prod9 targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FocalFrequencyLoss(nn.Module):
    """Focal frequency loss applied slice-wise (2.5D) to 3D volumes.

    For every spatial axis listed in ``axes``, each slice orthogonal to that axis is transformed with an orthonormal
    2D FFT. The squared spectral error ``|F(pred) - F(target)|^2`` is weighted by a "focus" matrix
    ``|F(pred) - F(target)|^alpha`` scaled to [0, 1] per slice (and per channel) and detached, so training spends its
    effort on the frequencies that are currently reconstructed worst. The loss is the mean over the spectrum, averaged
    over the axes.

    With an orthonormal FFT, Parseval's theorem makes ``alpha=0`` (all weights 1) exactly the voxel-wise MSE; a
    positive ``alpha`` keeps the MSE for an error concentrated in one frequency and discounts broadband errors.

    Args:
        alpha: exponent of the spectral weight (the paper's default is 1).
        axes: spatial axes of the (B, C, D, H, W) input whose orthogonal slices are transformed; each of 2, 3, 4.
        log_weight: apply ``log(1 + w)`` to the weight before scaling it, which flattens the focus.

    Shapes:
        pred, target: (B, C, D, H, W), any sizes (non-cubic allowed).
        output: scalar.
    """

    def __init__(self, alpha: float = 1.0, axes: Sequence[int] = (2, 3, 4), log_weight: bool = False) -> None:
        super().__init__()
        axes = tuple(int(a) for a in axes)
        if not axes or any(a not in (2, 3, 4) for a in axes):
            raise ValueError(f"axes must be a non-empty subset of (2, 3, 4) for (B, C, D, H, W) input, got {axes}.")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        self.alpha = float(alpha)
        self.axes = axes
        self.log_weight = log_weight

    def _axis_loss(self, diff_spectrum_dims: tuple[int, int], pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # FFT over the two dims orthogonal to the slicing axis = one 2D FFT per slice, no reshaping needed.
        diff = torch.fft.fft2(pred, dim=diff_spectrum_dims, norm="ortho") - torch.fft.fft2(
            target, dim=diff_spectrum_dims, norm="ortho"
        )
        distance = diff.real.square() + diff.imag.square()

        with torch.no_grad():
            weight = distance.sqrt() ** self.alpha
            if self.log_weight:
                weight = torch.log1p(weight)
            peak = weight.amax(dim=diff_spectrum_dims, keepdim=True)
            # A slice with no error has peak 0: its weight is 0 (its distance is 0 anyway).
            weight = torch.where(peak > 0, weight / peak.clamp_min(torch.finfo(weight.dtype).tiny), 0.0)
            weight = weight.clamp(0.0, 1.0)

        return (weight * distance).mean()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: reconstruction, (B, C, D, H, W).
            target: reference, same shape as ``pred``.

        Returns:
            scalar loss (0 for identical inputs).
        """
        if pred.shape != target.shape or pred.ndim != 5:
            raise ValueError(f"pred and target must both be (B, C, D, H, W), got {pred.shape} and {target.shape}.")
        # FFT in float32: half-precision FFTs only support power-of-two sizes and lose accuracy.
        pred = pred.float()
        target = target.float()
        losses = []
        for axis in self.axes:
            spectrum_dims = tuple(d for d in (2, 3, 4) if d != axis)
            losses.append(self._axis_loss(spectrum_dims, pred, target))  # type: ignore[arg-type]
        return torch.stack(losses).mean()
