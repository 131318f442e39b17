"""Tiled (sliding-window) encode and decode of whole volumes with an autoencoder, via MONAI's SlidingWindowInferer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import Inferer, SlidingWindowInferer

from prod9_components.limits import check_voxels, voxel_count

__all__ = ["SlidingWindowConfig", "AutoencoderInferenceWrapper", "TiledReconstructionInferer"]


@dataclass
class SlidingWindowConfig:
    """
    Tiling of a volume for autoencoder inference.

    Args:
        roi_size: window size on the image grid (an int means a cube); each entry must be divisible by the
            autoencoder's downsample factor, and the decoder windows are ``roi_size / f`` on the latent grid.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        sw_batch_size: windows run per network call; ``roi_size`` voxels x ``sw_batch_size`` must stay within
            :data:`~prod9_components.limits.MAX_VOXELS` (a memory bound checked before anything is allocated).
        mode: blending of overlapping windows, ``"gaussian"`` (weights fall off from the window centre, which
            hides seams) or ``"constant"`` (plain average); the seed's ``"mean"`` is accepted as ``"constant"``.
        sigma_scale: Gaussian sigma as a fraction of the window size.
    """

    roi_size: Sequence[int] | int = (64, 64, 64)
    overlap: float = 0.5
    sw_batch_size: int = 1
    mode: str = "gaussian"
    sigma_scale: float = 0.125

    def __post_init__(self) -> None:
        roi = (self.roi_size,) * 3 if isinstance(self.roi_size, int) else tuple(self.roi_size)
        if len(roi) != 3 or any(int(r) != r or r <= 0 for r in roi):
            raise ValueError(f"roi_size must be a positive int or three positive ints, got {self.roi_size!r}.")
        self.roi_size = tuple(int(r) for r in roi)
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap!r}.")
        if int(self.sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size!r}.")
        # Checked here, before any window is built: the windows of one network call are allocated together.
        check_voxels(voxel_count(self.roi_size) * int(self.sw_batch_size),
                     f"--roi-size {list(self.roi_size)} x --sw-batch-size {int(self.sw_batch_size)} windows per network "
                     "call", "lower --roi-size or --sw-batch-size")
        if self.mode == "mean":  # the seed's name for MONAI's "constant" blending: overlaps averaged with equal weights
            self.mode = "constant"
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian', 'constant' or 'mean' (= 'constant'), got {self.mode!r}.")
        if float(self.sigma_scale) <= 0:
            raise ValueError(f"sigma_scale must be positive, got {self.sigma_scale!r}.")


def _pad_end(x: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """Replicate-pad the end of each spatial axis of ``x`` (B, C, D, H, W) up to ``target``.

    Padding only at the end keeps voxel (0, 0, 0) of the image on latent cell (0, 0, 0), so cropping back is
    a plain ``[:size]``; replicating avoids inventing an edge (for latents, zero is a real code).
    """
    pad: list[int] = []
    for size, want in reversed(list(zip(x.shape[2:], target))):
        pad += [0, max(want - size, 0)]
    return F.pad(x, pad, mode="replicate") if any(pad) else x


class AutoencoderInferenceWrapper:
    """
    Encode, decode and reconstruct volumes of any size by tiling an autoencoder with MONAI's SlidingWindowInferer.

    Encoding windows lie on the image grid (window ``roi_size``), decoding windows on the latent grid
    (window ``roi_size / f``); along an axis where the volume is smaller than the window, the window shrinks to
    the volume (one exact pass). Inputs are replicate-padded at the end to a multiple of ``f`` and outputs are
    cropped back: ``encode`` gives ``ceil(size / f)`` latent cells per axis, ``decode``
    gives ``f`` voxels per latent cell.

    Quantized autoencoders (those with an ``fsq`` attribute and ``encode_continuous``, e.g. ``AutoencoderFSQ``):
    the windows blend the continuous pre-quantization latent ``z`` and FSQ is applied once to the blended
    result. Blending codes instead would average neighbouring grid values into off-grid values near seams;
    blending ``z`` keeps every code on the grid and lets overlapping windows vote before rounding.

    Other autoencoders (e.g. MONAI's ``AutoencoderKlMaisi``, whose ``encode`` returns ``(z_mu, z_sigma)``):
    ``encode`` returns the blended latent mean ``z_mu``.

    Group norm makes each window's statistics differ from the whole volume's, so tiled results approximate a
    whole-volume pass; larger windows and Gaussian blending keep the seam error small (DESIGN section 4, trap 8).
    Put the autoencoder in eval mode first; all methods run without gradients.

    Args:
        autoencoder: exposes ``encode(image)`` and ``decode(latent)``, and ``downsample_factor`` unless given.
        sw_config: window size, overlap and blending.
        downsample_factor: image-to-latent size ratio, for autoencoders without that attribute.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        sw_config: SlidingWindowConfig | None = None,
        downsample_factor: int | None = None,
    ) -> None:
        self.autoencoder = autoencoder
        self.sw_config = sw_config if sw_config is not None else SlidingWindowConfig()
        f = int(downsample_factor if downsample_factor is not None else autoencoder.downsample_factor)
        self.downsample_factor = f
        roi = tuple(self.sw_config.roi_size)
        if any(r % f for r in roi):
            raise ValueError(f"roi_size {roi} must be divisible by the downsample factor {f}.")
        self.roi_size = roi
        self.latent_roi_size = tuple(r // f for r in roi)
        self.quantizer = getattr(autoencoder, "fsq", None)

    def _window(self, latent_size: Sequence[int]) -> tuple[int, ...]:
        """The encoder window for a volume of ``latent_size`` cells: ``roi_size``, shrunk along any axis where the
        volume is smaller. Padding a small volume up to a large window would change the GroupNorm statistics of
        the whole pass (replicated edges weigh in); a window that fits makes that pass exact instead."""
        f = self.downsample_factor
        return tuple(min(r, n * f) for r, n in zip(self.roi_size, latent_size))

    def _encode_inferer(self, roi: Sequence[int]) -> SlidingWindowInferer:
        cfg, f = self.sw_config, self.downsample_factor
        # Encoder windows must start on multiples of f so their latents land on whole latent cells: snap each
        # step down to a multiple of f. MONAI's step is int(roi * (1 - overlap)); the +0.5 survives that floor.
        steps = [max(f, int(r * (1 - cfg.overlap)) // f * f) for r in roi]
        overlap = [0.0 if s >= r else 1 - (s + 0.5) / r for s, r in zip(steps, roi)]
        return SlidingWindowInferer(roi_size=roi, overlap=overlap, sw_batch_size=cfg.sw_batch_size, mode=cfg.mode,
                                    sigma_scale=cfg.sigma_scale)

    def _decode_inferer(self, roi: Sequence[int]) -> SlidingWindowInferer:
        cfg = self.sw_config
        return SlidingWindowInferer(roi_size=roi, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size,
                                    mode=cfg.mode, sigma_scale=cfg.sigma_scale)

    def _latent(self, image: torch.Tensor) -> torch.Tensor:
        # What the encoder windows produce, before any quantization.
        if self.quantizer is not None:
            return self.autoencoder.encode_continuous(image)
        latent = self.autoencoder.encode(image)
        return latent[0] if isinstance(latent, (tuple, list)) else latent

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Latent (B, C_latent, ceil(D / f), ceil(H / f), ceil(W / f)) of an image (B, C, D, H, W).

        For FSQ autoencoders these are grid codes; otherwise the latent mean.
        """
        f = self.downsample_factor
        latent_size = [math.ceil(s / f) for s in image.shape[2:]]
        padded = _pad_end(image, [n * f for n in latent_size])
        latent = self._encode_inferer(self._window(latent_size))(padded, self._latent)
        latent = latent[(..., *[slice(0, n) for n in latent_size])]
        return self.quantizer(latent) if self.quantizer is not None else latent

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Image (B, C_out, f * d, f * h, f * w) from a latent (B, C_latent, d, h, w)."""
        size = latent.shape[2:]
        window = tuple(min(r, s) for r, s in zip(self.latent_roi_size, size))  # as in encode: fit small volumes
        return self._decode_inferer(window)(latent, self.autoencoder.decode)

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """``decode(encode(image))`` cropped to the input's spatial shape."""
        out = self.decode(self.encode(image))
        return out[(..., *[slice(0, s) for s in image.shape[2:]])]

    @torch.no_grad()
    def quantize_stage_2_inputs(self, image: torch.Tensor) -> torch.Tensor:
        """Token indices (B, ceil(D / f), ceil(H / f), ceil(W / f)) int64 of the codes ``encode`` returns."""
        if self.quantizer is None:
            raise TypeError(f"{type(self.autoencoder).__name__} has no fsq quantizer: it produces no tokens.")
        return self.quantizer.quantize(self.encode(image))


class TiledReconstructionInferer(Inferer):
    """MONAI ``Inferer`` for a stage-1 :class:`~prod9_components.networks.reconstruction.Reconstruction` network:
    the tiled encode -> decode of :class:`AutoencoderInferenceWrapper` (what ``infer`` runs: encoder windows blend
    the latent, FSQ rounds once), for configs that call ``inferer(inputs, network)`` such as an exported bundle's
    ``SupervisedEvaluator``. A plain ``SlidingWindowInferer`` over the whole network would blend reconstructed
    windows instead: another result.

    Args: as :class:`SlidingWindowConfig`. Shapes: inputs (B, C, D, H, W) -> (B, C_out, D, H, W).
    """

    def __init__(self, roi_size: Sequence[int] | int = (64, 64, 64), overlap: float = 0.25, sw_batch_size: int = 4,
                 mode: str = "gaussian", sigma_scale: float = 0.125) -> None:
        super().__init__()
        self.sw_config = SlidingWindowConfig(roi_size, overlap, sw_batch_size, mode, sigma_scale)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        autoencoder = getattr(network, "autoencoder", network)
        return AutoencoderInferenceWrapper(autoencoder.eval(), self.sw_config).reconstruct(inputs)
