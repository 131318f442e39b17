"""MAISI stage 1: MONAI's ``AutoencoderKlMaisi`` made self-describing and fast on CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from prod9_components.networks.maisi_blocks import adapt_maisi_blocks

__all__ = ["MaisiVAE"]


class MaisiVAE(AutoencoderKlMaisi):
    """
    MONAI's MAISI KL-VAE with ``init_args`` (so checkpoints rebuild it), ``downsample_factor`` (for tiled inference)
    and ``get_last_layer`` (for the adaptive GAN weight). Weights and parameter names are MONAI's: a state dict
    loads into ``AutoencoderKlMaisi`` unchanged.

    Args:
        spatial_dims: only 3.
        in_channels / out_channels: image channels.
        num_channels: feature channels per level; ``len(num_channels) - 1`` downsamplings by 2 (MAISI: 4x, 3 levels).
        num_res_blocks: residual blocks per level.
        latent_channels: latent channels (MAISI: 4).
        norm_num_groups / norm_eps: group norm.
        attention_levels: self-attention per level.
        with_encoder_nonlocal_attn / with_decoder_nonlocal_attn: attention at the lowest resolution.
        num_splits: split each convolution into this many chunks along depth (exact; saves memory on big volumes).
        use_flash_attention: fused attention; None means "on CUDA only" (MONAI refuses it without CUDA).
        use_convtranspose: upsample in the decoder with a stride-2 transposed convolution instead of interpolation
            followed by a full-resolution convolution (8x fewer multiply-adds in each upsampling layer).

    Shapes:
        image (B, in_channels, D, H, W), D, H, W divisible by ``downsample_factor``;
        ``encode`` -> z_mu, z_sigma (B, latent_channels, D / f, H / f, W / f); ``forward`` -> (reconstruction,
        z_mu, z_sigma) with the reconstruction decoded from a posterior sample.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        num_channels: Sequence[int] = (64, 128, 256),
        num_res_blocks: Sequence[int] = (2, 2, 2),
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        attention_levels: Sequence[bool] = (False, False, False),
        with_encoder_nonlocal_attn: bool = False,
        with_decoder_nonlocal_attn: bool = False,
        num_splits: int = 1,
        use_flash_attention: bool | None = None,
        use_convtranspose: bool = False,
    ) -> None:
        if spatial_dims != 3:
            raise ValueError(f"MaisiVAE supports spatial_dims=3 only (MAISI blocks), got {spatial_dims}.")
        self_args = {
            "spatial_dims": int(spatial_dims),
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "num_channels": [int(c) for c in num_channels],
            "num_res_blocks": [int(n) for n in num_res_blocks],
            "latent_channels": int(latent_channels),
            "norm_num_groups": int(norm_num_groups),
            "norm_eps": float(norm_eps),
            "attention_levels": [bool(a) for a in attention_levels],
            "with_encoder_nonlocal_attn": bool(with_encoder_nonlocal_attn),
            "with_decoder_nonlocal_attn": bool(with_decoder_nonlocal_attn),
            "num_splits": int(num_splits),
            "use_flash_attention": use_flash_attention,  # None stays None: rebuilt on CPU or CUDA alike
            "use_convtranspose": bool(use_convtranspose),
        }
        flash = torch.cuda.is_available() if use_flash_attention is None else bool(use_flash_attention)
        # save_mem=False: MAISI otherwise empties the CUDA cache after every block, which is slow.
        super().__init__(
            spatial_dims, in_channels, out_channels, list(num_res_blocks), list(num_channels), list(attention_levels),
            latent_channels=latent_channels, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
            with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=with_decoder_nonlocal_attn, use_flash_attention=flash,
            num_splits=num_splits, save_mem=False, use_convtranspose=use_convtranspose,
        )
        self.init_args = self_args
        adapt_maisi_blocks(self)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.init_args["num_channels"]) - 1)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_mu, z_sigma)``, each (B, latent_channels, D / f, H / f, W / f)."""
        f = self.downsample_factor
        if any(s % f for s in image.shape[2:]):  # MONAI would silently floor the size; refuse instead
            raise ValueError(f"input spatial shape {tuple(image.shape[2:])} is not divisible by the downsample "
                             f"factor {f}.")
        return super().encode(image)

    def get_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final convolution (for the adaptive GAN loss weight)."""
        return self.decoder.blocks[-1].conv.conv.weight
