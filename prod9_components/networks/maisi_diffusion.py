"""MAISI stage 2: MONAI's ``DiffusionModelUNetMaisi`` as a modality-conditional velocity model on VAE latents."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

__all__ = ["MaisiDiffusionUNet"]


class MaisiDiffusionUNet(DiffusionModelUNetMaisi):
    """
    ``DiffusionModelUNetMaisi`` with ``init_args`` (so checkpoints rebuild it), a class label per modality and one
    extra null label for classifier-free guidance. Weights and parameter names are MONAI's.

    Class labels: 0..``num_modalities - 1`` the modalities (BraTS: T1, T1ce, T2, FLAIR, ``data.modalities``),
    ``null_label`` = ``num_modalities`` = "any modality" (the label dropped during training; the unconditional branch
    of guidance).

    Args:
        spatial_dims: only 3.
        latent_channels: channels of the VAE latent (in and out).
        num_channels: feature channels per level; ``len(num_channels) - 1`` downsamplings by 2, so latent grids
            must be multiples of ``downsample_factor``.
        num_res_blocks: residual blocks per level.
        attention_levels: self-attention per level.
        norm_num_groups: group-norm groups (divides every ``num_channels``).
        num_head_channels: channels per attention head.
        use_flash_attention: fused attention; None means "on CUDA only" (MONAI refuses it without CUDA).
        num_modalities: number of modality labels (the null label comes after them); the bundles pass 4.

    Shapes:
        ``forward(x (B, C, d, h, w), timesteps (B,) float in [0, T], class_labels (B,) int64)`` -> velocity
        (B, C, d, h, w).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        latent_channels: int = 4,
        num_channels: Sequence[int] = (64, 128, 256, 256),
        num_res_blocks: Sequence[int] = (2, 2, 2, 2),
        attention_levels: Sequence[bool] = (False, False, True, True),
        norm_num_groups: int = 32,
        num_head_channels: int | Sequence[int] = 32,
        use_flash_attention: bool | None = None,
        num_modalities: int = 4,
    ) -> None:
        if spatial_dims != 3:
            raise ValueError(f"MaisiDiffusionUNet supports spatial_dims=3 only, got {spatial_dims}.")
        init_args = {
            "spatial_dims": int(spatial_dims),
            "latent_channels": int(latent_channels),
            "num_channels": [int(c) for c in num_channels],
            "num_res_blocks": [int(n) for n in num_res_blocks],
            "attention_levels": [bool(a) for a in attention_levels],
            "norm_num_groups": int(norm_num_groups),
            "num_head_channels": num_head_channels if isinstance(num_head_channels, int)
            else [int(n) for n in num_head_channels],
            "use_flash_attention": use_flash_attention,  # None stays None: rebuilt on CPU or CUDA alike
            "num_modalities": int(num_modalities),
        }
        flash = torch.cuda.is_available() if use_flash_attention is None else bool(use_flash_attention)
        super().__init__(
            spatial_dims=spatial_dims, in_channels=latent_channels, out_channels=latent_channels,
            num_res_blocks=list(num_res_blocks), num_channels=list(num_channels),
            attention_levels=list(attention_levels), norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels, num_class_embeds=int(num_modalities) + 1, use_flash_attention=flash,
        )
        self.init_args = init_args

    @property
    def null_label(self) -> int:
        """The class label of "no modality given" (classifier-free guidance)."""
        return self.init_args["num_modalities"]

    @property
    def latent_channels(self) -> int:
        return self.init_args["latent_channels"]

    @property
    def downsample_factor(self) -> int:
        """Latent grids must be multiples of this."""
        return 2 ** (len(self.init_args["num_channels"]) - 1)
