"""Euler sampler of a rectified-flow velocity model, on the timesteps of MONAI's ``RFlowScheduler``.

Convention (MONAI): ``x_t = (1 - t/T) * x_0 + (t/T) * noise``, t = 0 data, t = T noise; the model predicts the
velocity ``v = x_0 - noise``, so ``x_{t'} = x_t + v * (t - t') / T`` walks from noise (t = T) to data (t = 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.schedulers import RFlowScheduler
from torch import nn

from prod9_components.sampling.steps import check_num_steps

__all__ = ["guided_velocity", "sample_rectified_flow", "sampling_timesteps"]


def sampling_timesteps(scheduler: RFlowScheduler, num_steps: int, latent_size: Sequence[int],
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """The ``num_steps + 1`` timesteps T = t_0 > t_1 > ... > t_K = 0 the sampler visits (float32).

    The scheduler's ``set_timesteps`` gives t_0..t_{K-1}, resolution-shifted when it uses MAISI-v2's timestep
    transform (``input_img_size_numel`` = the latent's voxel count); the final 0 closes the interval.
    """
    check_num_steps(num_steps, scheduler.num_train_timesteps)
    scheduler.set_timesteps(num_steps, device=device, input_img_size_numel=math.prod(int(s) for s in latent_size))
    return torch.cat([scheduler.timesteps.float().to(device), torch.zeros(1, device=device)])


def guided_velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                    guidance_scale: float, null_label: int | None, **model_kwargs) -> torch.Tensor:
    """Classifier-free guidance ``v_null + s * (v_label - v_null)``: s = 1 is the conditional model, s = 0 the
    unconditional one (computed alone, so it equals the null-label model exactly). The same convention as the
    MaskGiT sampler's :func:`~prod9_components.sampling.maskgit.guided_logits`.

    Args:
        model: ``model(x, timesteps, class_labels=..., **model_kwargs)`` -> velocity.
        x: (B, C, d, h, w); t: scalar timestep; labels: (B,) int64 class labels, or None (no conditioning).
        guidance_scale: s; null_label: the unconditional label (needed unless s == 1 or labels is None).
    """
    timesteps = t.reshape(1).expand(x.shape[0]).to(x.device)
    if labels is None or guidance_scale == 1.0:
        return model(x, timesteps, class_labels=labels, **model_kwargs)
    if null_label is None:
        raise ValueError("guidance_scale != 1 needs the model's null label")
    null = torch.full_like(labels, int(null_label))
    if guidance_scale == 0.0:
        return model(x, timesteps, class_labels=null, **model_kwargs)
    both = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), class_labels=torch.cat([labels, null]),
                 **{k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in model_kwargs.items()})
    v_label, v_null = both.chunk(2)
    return v_null + guidance_scale * (v_label - v_null)


@torch.no_grad()
def sample_rectified_flow(model: nn.Module, scheduler: RFlowScheduler, noise: torch.Tensor,
                          labels: torch.Tensor | None, num_steps: int, guidance_scale: float = 1.0,
                          null_label: int | None = None, **model_kwargs) -> torch.Tensor:
    """Integrate the velocity field from ``noise`` (t = T) to a latent (t = 0) in ``num_steps`` Euler steps.

    MONAI's ``RFlowScheduler.step`` truncates ``next_timestep`` to an integer, which drifts from the interval's end
    with continuous timesteps; the Euler update is one line, so it is done here with float timesteps.

    Args:
        model: the velocity model (``model.eval()`` is the caller's job).
        scheduler: supplies T and the (possibly resolution-shifted) timesteps.
        noise: (B, C, d, h, w) standard normal.
        labels: (B,) class labels or None.
        num_steps: Euler steps K (1..T).
        guidance_scale / null_label: classifier-free guidance, see :func:`guided_velocity`.
        model_kwargs: extra model inputs (e.g. ControlNet residuals), batched like ``noise``.

    Returns:
        the latent (B, C, d, h, w) at t = 0.
    """
    timesteps = sampling_timesteps(scheduler, num_steps, noise.shape[2:], noise.device)
    x = noise
    total = float(scheduler.num_train_timesteps)
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        v = guided_velocity(model, x, t, labels, guidance_scale, null_label, **model_kwargs)
        x = x + v.to(x.dtype) * (t - t_next) / total
    return x
