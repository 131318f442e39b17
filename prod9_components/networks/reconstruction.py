"""The one-input, one-output view of a stage-1 autoencoder: image -> reconstruction."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Reconstruction"]


class Reconstruction(nn.Module):
    """
    ``image -> reconstruction`` with a stage-1 autoencoder, for tools that want ``network(image) -> tensor``:
    MONAI's ``verify_net_in_out`` and ``ckpt_export`` (TorchScript).

    The path is deterministic: FSQ codes (``AutoencoderFSQ``) or the KL-VAE's posterior mean (``MaisiVAE``, no
    sampling). The state dict is the autoencoder's own (no ``autoencoder.`` prefix), so the ``state_dict`` of a
    stage-1 record loads straight into it (``ckpt_export --key_in_ckpt state_dict``).

    Args:
        autoencoder: an ``AutoencoderFSQ`` or ``MaisiVAE`` (anything with ``encode`` and ``decode``).

    Shapes:
        image (B, in_channels, D, H, W), D, H, W divisible by the downsample factor -> (B, out_channels, D, H, W).
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        latent = self.autoencoder.encode(image)
        if isinstance(latent, tuple):  # KL-VAE: (z_mu, z_sigma); reconstruct from the mean
            latent = latent[0]
        return self.autoencoder.decode(latent)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        return self.autoencoder.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.autoencoder.load_state_dict(state_dict, strict=strict, assign=assign)
