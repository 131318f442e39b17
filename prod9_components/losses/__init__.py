"""Training objectives that are functions of tensors (no training or data code)."""

from prod9_components.losses.autoencoder_gan import AutoencoderGANLoss, kl_divergence
from prod9_components.losses.focal_frequency import FocalFrequencyLoss

__all__ = ["AutoencoderGANLoss", "FocalFrequencyLoss", "kl_divergence"]
