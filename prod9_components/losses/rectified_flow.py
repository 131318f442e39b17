"""The rectified-flow training objective: regress the velocity ``x_0 - noise`` at a noisy point of the path."""

from __future__ import annotations

import torch
from monai.networks.schedulers import RFlowScheduler
from torch import nn


def velocity_target(latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d(-t/T) on the straight path ``x_t = (1 - t/T) latent + (t/T) noise``: ``latent - noise``."""
    return latent - noise


def noisy_latent(scheduler: RFlowScheduler, latent: torch.Tensor, noise: torch.Tensor | None = None,
                 timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, timesteps, velocity target)`` of clean latents (B, C, d, h, w): noise and timesteps (B,) are drawn by
    the scheduler when None (uniform or logit-normal, optionally resolution-shifted)."""
    noise = torch.randn_like(latent) if noise is None else noise
    timesteps = scheduler.sample_timesteps(latent) if timesteps is None else timesteps
    return scheduler.add_noise(latent, noise, timesteps), timesteps, velocity_target(latent, noise)


def velocity_loss(velocity: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of velocities (B, C, d, h, w), float32; with ``weight`` (B, 1, d, h, w) >= 0 the
    weighted mean ``sum(weight * error^2) / (C * sum(weight))``."""
    squared_error = (velocity.float() - target.float()).square()
    if weight is None:
        return squared_error.mean()
    return (squared_error * weight).mean() / weight.mean()


def rectified_flow_loss(network: nn.Module, scheduler: RFlowScheduler, latent: torch.Tensor,
                        labels: torch.Tensor | None, noise: torch.Tensor | None = None,
                        timesteps: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity.

    Args:
        network: ``network(x_t, timesteps, class_labels=labels, **model_kwargs)`` -> velocity.
        scheduler: MONAI ``RFlowScheduler`` (timestep sampling and ``add_noise``), see :func:`noisy_latent`.
        latent: clean scaled latents x_0 (B, C, d, h, w).
        labels: (B,) class labels (already with the null label where dropped), or None.
        noise / timesteps: drawn here when None (given for reproducible validation).

    Returns:
        scalar float32 loss.
    """
    noisy, timesteps, target = noisy_latent(scheduler, latent, noise, timesteps)
    velocity = network(noisy, timesteps, class_labels=labels, **model_kwargs)
    return velocity_loss(velocity, target)
