"""Stage-2 outputs back to images through the stage-1 decoder, tiled by the sliding window: MaskGiT token grids (or
their expected codes) and MAISI latents. One function each, shared by generation, the evaluators and the sampling
handlers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prod9_components.inference.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig

__all__ = ["decode_codes", "decode_latent", "decode_tokens"]


@torch.no_grad()
def decode_tokens(autoencoder: nn.Module, tokens: torch.Tensor, sw_config: SlidingWindowConfig | None = None,
                  ) -> torch.Tensor:
    """Images (B, 1, f * d, f * h, f * w) float32 of token grids (B, d, h, w) int64: FSQ codes of the indices
    (``fsq.embed``), then the tiled decode of the stage-1 ``autoencoder`` (put in eval mode)."""
    return decode_codes(autoencoder, autoencoder.fsq.embed(tokens), sw_config)


@torch.no_grad()
def decode_codes(autoencoder: nn.Module, codes: torch.Tensor, sw_config: SlidingWindowConfig | None = None,
                 ) -> torch.Tensor:
    """Images (B, 1, f * d, f * h, f * w) float32 of FSQ code grids (B, C, d, h, w): the tiled decode of the stage-1
    ``autoencoder`` (put in eval mode); codes between the grid values (expected codes) decode as well."""
    wrapper = AutoencoderInferenceWrapper(autoencoder.eval(), sw_config)
    return wrapper.decode(codes).float()


@torch.no_grad()
def decode_latent(vae: nn.Module, latent: torch.Tensor, scale_factor: float, sw_config: SlidingWindowConfig | None,
                  intensity_range: Sequence[float] = (0.0, 1.0)) -> torch.Tensor:
    """Images (B, 1, f * d, f * h, f * w) float32 of scaled latents (B, C, d, h, w): un-scale, tiled decode of the
    ``vae`` (put in eval mode), clip to its training intensity range."""
    wrapper = AutoencoderInferenceWrapper(vae.eval(), sw_config)
    image = wrapper.decode(latent / float(scale_factor)).float()
    return image.clamp(float(intensity_range[0]), float(intensity_range[1]))
