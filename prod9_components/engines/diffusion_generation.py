"""Generate whole volumes with a MAISI latent diffusion model: noise -> Euler steps -> VAE decode -> NIfTI."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler
from torch import nn
from tqdm import tqdm

from prod9_components.data.modalities import modality_index, modality_name
from prod9_components.data.postprocessing import write_nifti
from prod9_components.inference.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_components.networks.export import unwrap
from prod9_components.outputs import check_outputs, output_path
from prod9_components.sampling.rectified_flow import sample_rectified_flow
from prod9_components.sampling.steps import check_num_steps

__all__ = ["decode_latent", "generate_samples", "sample_latents", "sample_volumes"]


def sample_latents(network: nn.Module, scheduler: RFlowScheduler, modality: str | int | None, num_samples: int,
                   latent_size: Sequence[int], num_steps: int, guidance_scale: float = 1.0, seed: int = 0,
                   device: str | torch.device = "cpu"):
    """Yield ``num_samples`` scaled latents (1, C, *latent_size); sample ``i`` starts from the noise of seed
    ``seed + i`` (reproducible, independent of ``num_samples``). ``modality`` None samples unconditionally (the
    null label)."""
    check_num_steps(num_steps, scheduler.num_train_timesteps)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    model = unwrap(network).eval()
    label = model.null_label if modality is None else modality_index(modality)
    labels = torch.tensor([label], device=device)
    shape = (1, model.latent_channels, *[int(s) for s in latent_size])
    for i in range(num_samples):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) + i)).to(device)
        yield sample_rectified_flow(model, scheduler, noise, labels, num_steps, guidance_scale, model.null_label)


@torch.no_grad()
def decode_latent(vae: nn.Module, latent: torch.Tensor, scale_factor: float, sw_config: SlidingWindowConfig | None,
                  intensity_range: Sequence[float] = (0.0, 1.0)) -> torch.Tensor:
    """Image (1, D, H, W) float32 of a scaled latent (1, C, d, h, w): un-scale, tiled VAE decode, clip to the
    training intensity range."""
    wrapper = AutoencoderInferenceWrapper(vae.eval(), sw_config)
    image = wrapper.decode(latent / float(scale_factor))[0].float()
    return image.clamp(float(intensity_range[0]), float(intensity_range[1]))


def sample_volumes(network: nn.Module, vae: nn.Module, scheduler: RFlowScheduler, modality: str | int | None,
                   num_samples: int, latent_size: Sequence[int], scale_factor: float, num_steps: int,
                   guidance_scale: float = 1.0, seed: int = 0, sw_config: SlidingWindowConfig | None = None,
                   device: str | torch.device = "cpu", intensity_range: Sequence[float] = (0.0, 1.0)):
    """Yield decoded samples (1, D, H, W), D = f * d, ...: :func:`sample_latents` then :func:`decode_latent`."""
    for latent in sample_latents(network, scheduler, modality, num_samples, latent_size, num_steps, guidance_scale,
                                 seed, device):
        yield decode_latent(vae, latent, scale_factor, sw_config, intensity_range)


def generate_samples(network: nn.Module, vae: nn.Module, scheduler: RFlowScheduler, modality: str | int | None,
                     num_samples: int, latent_size: Sequence[int], scale_factor: float, num_steps: int,
                     output_dir: str, spacing: Sequence[float], guidance_scale: float = 1.0, seed: int = 0,
                     sw_config: SlidingWindowConfig | None = None, device: str | torch.device = "cpu",
                     intensity_range: Sequence[float] = (0.0, 1.0), overwrite: bool = False) -> list[str]:
    """Write :func:`sample_volumes` as ``sample_0001.nii.gz``, ... (``sample_0001_T2.nii.gz`` with a modality):
    RAS, ``spacing`` mm voxels, each file written atomically. Returns the paths. Existing samples are refused
    unless ``overwrite`` (checked before sampling)."""
    name = None if modality is None else modality_name(modality_index(modality))
    check_num_steps(num_steps, scheduler.num_train_timesteps)  # before anything is written
    paths = check_outputs([output_path(output_dir, f"sample_{i + 1:04d}_{name}.nii.gz" if name else
                                       f"sample_{i + 1:04d}.nii.gz") for i in range(num_samples)], overwrite=overwrite)
    affine = np.diag([*map(float, spacing), 1.0])
    samples = sample_volumes(network, vae, scheduler, modality, num_samples, latent_size, scale_factor, num_steps,
                             guidance_scale, seed, sw_config, device, intensity_range)
    written = []
    for path, image in zip(paths, tqdm(samples, total=num_samples, desc=f"sampling {name or 'volumes'}",
                                       unit="volume")):
        write_nifti(image, path, affine=affine)
        written.append(str(path))
    return written
