"""3D autoencoder with a finite-scalar-quantized latent, built from MONAI's MAISI encoder and decoder blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiDecoder, MaisiEncoder

from prod9_components.networks.fsq import FiniteScalarQuantizer
from prod9_components.networks.maisi_blocks import adapt_maisi_blocks

__all__ = ["AutoencoderFSQ"]


class AutoencoderFSQ(nn.Module):
    """
    MAISI-style convolutional autoencoder whose latent is quantized by FSQ, giving stage-2 tokens.

    The encoder maps an image to ``len(levels)`` latent channels at ``1 / downsample_factor`` resolution; FSQ
    snaps them to a grid of ``codebook_size`` codes; the decoder maps codes back to an image.

    Args:
        spatial_dims: number of spatial dimensions; only 3 is supported (MAISI's group norm is 3D-only).
        in_channels: number of input image channels.
        out_channels: number of output image channels.
        num_channels: feature channels per resolution level; ``len(num_channels) - 1`` downsamplings by 2.
        num_res_blocks: residual blocks per level.
        levels: FSQ levels per latent channel; ``len(levels)`` is the latent channel count.
        norm_num_groups: group-norm groups (must divide every entry of ``num_channels``).
        norm_eps: group-norm epsilon.
        attention_levels: whether each level has a self-attention block after its residual blocks.
        with_nonlocal_attn: add the residual-attention-residual block at the lowest resolution.
        num_splits: split every MAISI convolution into this many chunks along depth to save memory
            (exact: the chunks overlap by the kernel padding).
        use_flash_attention: use PyTorch's fused attention in the attention blocks (CUDA).
        use_convtranspose: upsample in the decoder with a stride-2 transposed convolution instead of interpolation
            followed by a full-resolution convolution (8x fewer multiply-adds in each upsampling layer).

    Shapes:
        image (B, in_channels, D, H, W) with D, H, W divisible by ``downsample_factor``;
        codes (B, len(levels), D / f, H / f, W / f); indices (B, D / f, H / f, W / f) int64.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        num_channels: Sequence[int] = (64, 128, 256),
        num_res_blocks: Sequence[int] = (2, 2, 2),
        levels: Sequence[int] = (8, 8, 8, 6, 5),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        attention_levels: Sequence[bool] = (False, False, False),
        with_nonlocal_attn: bool = False,
        num_splits: int = 1,
        use_flash_attention: bool = False,
        use_convtranspose: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"AutoencoderFSQ supports spatial_dims=3 only (MAISI blocks), got {spatial_dims}.")
        if not (len(num_channels) == len(num_res_blocks) == len(attention_levels)):
            raise ValueError(
                "num_channels, num_res_blocks and attention_levels must have the same length, got "
                f"{len(num_channels)}, {len(num_res_blocks)}, {len(attention_levels)}."
            )
        # Everything needed to rebuild this network exactly, as JSON-able values: AutoencoderFSQ(**init_args).
        self.init_args = {
            "spatial_dims": int(spatial_dims),
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "num_channels": [int(c) for c in num_channels],
            "num_res_blocks": [int(n) for n in num_res_blocks],
            "levels": [int(lv) for lv in levels],
            "norm_num_groups": int(norm_num_groups),
            "norm_eps": float(norm_eps),
            "attention_levels": [bool(a) for a in attention_levels],
            "with_nonlocal_attn": bool(with_nonlocal_attn),
            "num_splits": int(num_splits),
            "use_flash_attention": bool(use_flash_attention),
            "use_convtranspose": bool(use_convtranspose),
        }
        self.fsq = FiniteScalarQuantizer(levels)
        # save_mem=False: MAISI otherwise empties the CUDA cache after every block, which is slow.
        common = dict(
            spatial_dims=spatial_dims,
            num_channels=list(num_channels),
            num_res_blocks=list(num_res_blocks),
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=list(attention_levels),
            num_splits=num_splits,
            dim_split=0,
            save_mem=False,
            with_nonlocal_attn=with_nonlocal_attn,
            use_flash_attention=use_flash_attention,
        )
        self.encoder = MaisiEncoder(in_channels=in_channels, out_channels=self.fsq.num_channels, **common)
        self.decoder = MaisiDecoder(in_channels=self.fsq.num_channels, out_channels=out_channels,
                                    use_convtranspose=use_convtranspose, **common)
        adapt_maisi_blocks(self.encoder)
        adapt_maisi_blocks(self.decoder)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.init_args["num_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.fsq.num_channels

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    def encode_continuous(self, image: torch.Tensor) -> torch.Tensor:
        """Encoder output before quantization, (B, len(levels), D / f, H / f, W / f)."""
        f = self.downsample_factor
        if any(s % f for s in image.shape[2:]):
            # MONAI would silently floor the size; refuse instead.
            raise ValueError(
                f"input spatial shape {tuple(image.shape[2:])} is not divisible by the downsample factor {f}."
            )
        return self.encoder(image)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Quantized codes (B, len(levels), D / f, H / f, W / f); straight-through gradient."""
        return self.fsq(self.encode_continuous(image))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Image (B, out_channels, D, H, W) from codes (B, len(levels), D / f, H / f, W / f)."""
        return self.decoder(codes)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(reconstruction, codes)``."""
        codes = self.encode(image)
        return self.decode(codes), codes

    def quantize_stage_2_inputs(self, image: torch.Tensor) -> torch.Tensor:
        """Token indices (B, D / f, H / f, W / f) int64 of the codes the decoder would see."""
        return self.fsq.quantize(self.encode(image))

    def decode_stage_2_outputs(self, indices: torch.Tensor) -> torch.Tensor:
        """Image (B, out_channels, D, H, W) from token indices (B, D / f, H / f, W / f)."""
        codes = self.fsq.embed(indices)
        return self.decode(codes.to(next(self.decoder.parameters()).dtype))

    def get_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final convolution (for the adaptive GAN loss weight)."""
        return self.decoder.blocks[-1].conv.conv.weight
