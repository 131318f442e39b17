"""The rectified-flow training objective: regress the velocity ``x_0 - noise`` at a noisy point of the path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.schedulers import RFlowScheduler
from torch import nn


def velocity_target(latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d(-t/T) on the straight path ``x_t = (1 - t/T) latent + (t/T) noise``: ``latent - noise``."""
    return latent - noise


def rectified_flow_loss(network: nn.Module, scheduler: RFlowScheduler, latent: torch.Tensor,
                        labels: torch.Tensor | None, noise: torch.Tensor | None = None,
                        timesteps: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity.

    Args:
        network: ``network(x_t, timesteps, class_labels=labels, **model_kwargs)`` -> velocity.
        scheduler: MONAI ``RFlowScheduler`` (timestep sampling - uniform or logit-normal, optionally
            resolution-shifted - and ``add_noise``).
        latent: clean scaled latents x_0 (B, C, d, h, w).
        labels: (B,) class labels (already with the null label where dropped), or None.
        noise / timesteps: drawn here when None (given for reproducible validation).

    Returns:
        scalar float32 loss.
    """
    noise = torch.randn_like(latent) if noise is None else noise
    timesteps = scheduler.sample_timesteps(latent) if timesteps is None else timesteps
    noisy = scheduler.add_noise(latent, noise, timesteps)
    velocity = network(noisy, timesteps, class_labels=labels, **model_kwargs)
    return F.mse_loss(velocity.float(), velocity_target(latent, noise).float())
