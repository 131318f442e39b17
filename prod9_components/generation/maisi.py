"""MAISI generation: modality-conditional latent diffusion samples, and ControlNet samples steered by a tumour mask
and/or a source image of another modality.

Each draws noise, integrates the rectified flow
(:func:`~prod9_components.sampling.rectified_flow.sample_rectified_flow`), decodes the latent with the VAE
(:func:`~prod9_components.generation.decode.decode_latent`) and runs through the shared loop and saver
(:mod:`prod9_components.generation.loop`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from monai.networks.schedulers import RFlowScheduler
from torch import nn

from prod9_components.data.modalities import modality_index, modality_name
from prod9_components.generation.decode import decode_latent
from prod9_components.generation.inputs import condition_preprocessing
from prod9_components.generation.loop import generate, sample_items, seeded
from prod9_components.generation.saver import GeneratedVolume, VolumeSaver, case_names, sample_names, spacing_affine
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.networks.export import unwrap
from prod9_components.sampling.rectified_flow import sample_rectified_flow
from prod9_components.sampling.steps import check_num_steps, check_scale

__all__ = ["generate_samples", "generate_with_conditions", "sample_latents", "sample_volumes", "target_modality"]

logger = logging.getLogger("prod9")


def _latent_sample(network: nn.Module, scheduler: RFlowScheduler, modality: str | int | None,
                   latent_size: Sequence[int], num_steps: int, guidance_scale: float, device: str | torch.device):
    """``sample(conditions, generator) -> scaled latent (1, C, *latent_size)`` from the generator's noise; the
    conditions are the network's keyword arguments (none for the stage-2 model). ``modality`` None: the null label."""
    check_num_steps(num_steps, scheduler.num_train_timesteps)
    guidance_scale = check_scale("guidance_scale", guidance_scale)
    model = unwrap(network).eval()
    labels = torch.tensor([model.null_label if modality is None else modality_index(modality)], device=device)
    shape = (1, model.latent_channels, *[int(s) for s in latent_size])

    def sample(conditions, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator).to(device)
        return sample_rectified_flow(model, scheduler, noise, labels, num_steps, guidance_scale, model.null_label,
                                     **(conditions or {}))

    return sample


def sample_latents(network: nn.Module, scheduler: RFlowScheduler, modality: str | int | None, num_samples: int,
                   latent_size: Sequence[int], num_steps: int, guidance_scale: float = 1.0, seed: int = 0,
                   device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Yield ``num_samples`` scaled latents (1, C, *latent_size); sample ``i`` starts from the noise of seed
    ``seed + i`` (:func:`~prod9_components.generation.loop.seeded`). ``modality`` None samples unconditionally (the
    null label)."""
    sample = _latent_sample(network, scheduler, modality, latent_size, num_steps, guidance_scale, device)
    return seeded(lambda _, generator: sample(None, generator), sample_items(num_samples), seed)


def sample_volumes(network: nn.Module, vae: nn.Module, scheduler: RFlowScheduler, modality: str | int | None,
                   num_samples: int, latent_size: Sequence[int], scale_factor: float, num_steps: int,
                   guidance_scale: float = 1.0, seed: int = 0, sw_config: SlidingWindowConfig | None = None,
                   device: str | torch.device = "cpu", intensity_range: Sequence[float] = (0.0, 1.0),
                   ) -> Iterator[torch.Tensor]:
    """Yield decoded samples (1, D, H, W), D = f * d, ...: :func:`sample_latents` then
    :func:`~prod9_components.generation.decode.decode_latent`."""
    for latent in sample_latents(network, scheduler, modality, num_samples, latent_size, num_steps, guidance_scale,
                                 seed, device):
        yield decode_latent(vae, latent, scale_factor, sw_config, intensity_range)[0]


def generate_samples(network: nn.Module, vae: nn.Module, scheduler: RFlowScheduler, modality: str | int | None,
                     num_samples: int, latent_size: Sequence[int], scale_factor: float, num_steps: int,
                     output_dir: str, spacing: Sequence[float], guidance_scale: float = 1.0, seed: int = 0,
                     sw_config: SlidingWindowConfig | None = None, device: str | torch.device = "cpu",
                     intensity_range: Sequence[float] = (0.0, 1.0), overwrite: bool = False) -> list[str]:
    """Write :func:`sample_volumes` as ``sample_0001.nii.gz``, ... (``sample_0001_T2.nii.gz`` with a modality):
    RAS, ``spacing`` mm voxels, each file written atomically. Returns the paths. Existing samples are refused
    unless ``overwrite`` (checked before sampling)."""
    name = None if modality is None else modality_name(modality_index(modality))
    sample = _latent_sample(network, scheduler, modality, latent_size, num_steps, guidance_scale, device)
    items = sample_items(num_samples)
    saver = VolumeSaver(output_dir, sample_names(num_samples, name), overwrite=overwrite)
    affine = spacing_affine(spacing)

    def volume(_, generator: torch.Generator) -> GeneratedVolume:
        latent = sample(None, generator)
        return GeneratedVolume(decode_latent(vae, latent, scale_factor, sw_config, intensity_range)[0], affine)

    return generate(volume, items, saver, seed, desc=f"sampling {name or 'volumes'}")


def target_modality(target: str | int | None, source: str | int | None, trained_source: str | int | None,
                    modalities: Sequence[str | int]) -> str:
    """The modality a ControlNet generates: ``target``, or by default the first of ``modalities`` other than the
    source. Refuses a target equal to the source, and a source other than the one the ControlNet was trained with."""
    if source is not None and trained_source is not None and modality_index(source) != modality_index(trained_source):
        raise ValueError("this ControlNet was trained to translate from "
                         f"{modality_name(modality_index(trained_source))}, not {modality_name(modality_index(source))}")
    source = trained_source if source is None else source
    if target is None:
        target = next(m for m in modalities if source is None or modality_index(m) != modality_index(source))
    if source is not None and modality_index(target) == modality_index(source):
        raise ValueError(f"the source modality {modality_name(modality_index(source))} equals the target modality: "
                         "translation needs another target")
    return modality_name(modality_index(target))


@torch.no_grad()
def generate_with_conditions(network: nn.Module, vae: nn.Module, scheduler, modality: str | int,
                             items: Sequence[dict], latent_size: Sequence[int], scale_factor: float, num_steps: int,
                             spacing: Sequence[float], output_dir: str, guidance_scale: float = 1.0, seed: int = 0,
                             sw_config: SlidingWindowConfig | None = None, device: str | torch.device = "cpu",
                             intensity_range: Sequence[float] = (0.0, 1.0), overwrite: bool = False,
                             conditioning_scale: float = 1.0) -> list[str]:
    """Sample ``<case>_<MOD>.nii.gz`` per item (seed ``seed + i``) on the conditions' grid, with the mask it was
    steered by as ``<case>_mask.nii.gz``; every file written atomically. Returns the paths.

    Args:
        network: a :class:`~prod9_components.networks.maisi_controlnet.MaisiControlNet`.
        items: from :func:`~prod9_components.generation.inputs.condition_items`; latent_size / scale_factor: the
            diffusion model's.
        overwrite: replace existing outputs (checked before sampling); an output that is a condition file is
            refused regardless.
        conditioning_scale: the ControlNet residuals' multiplier (1: as trained; above 1 amplifies the control).
    """
    conditioning_scale = check_scale("conditioning_scale", conditioning_scale)
    sample = _latent_sample(network, scheduler, modality, latent_size, num_steps, guidance_scale, device)
    factor = int(unwrap(network).init_args["downsample_factor"])
    with_mask, with_source = "seg" in items[0], "source" in items[0]
    name = modality_name(modality_index(modality))
    saver = VolumeSaver(output_dir, case_names([item["case"] for item in items], name), modality=name,
                        masks=with_mask, inputs=[item[k] for item in items for k in ("seg", "source") if k in item],
                        overwrite=overwrite)
    transform = condition_preprocessing(spacing, [int(s) * factor for s in latent_size], with_mask, with_source,
                                        intensity_range)

    def volume(item: dict, generator: torch.Generator) -> GeneratedVolume:
        data = transform({k: item[k] for k in ("seg", "source") if k in item})
        conditions = {"conditioning_scale": conditioning_scale}
        if with_mask:
            conditions["control_mask"] = data["seg"].as_tensor()[None].long().to(device)
        if with_source:
            conditions["control_image"] = data["source"].as_tensor()[None].float().to(device)
        affine = data["source"].affine if with_source else data["seg"].affine if with_mask else spacing_affine(spacing)
        image = decode_latent(vae, sample(conditions, generator), scale_factor, sw_config, intensity_range)[0]
        return GeneratedVolume(image.cpu(), affine, data["seg"] if with_mask else None)

    written = generate(volume, items, saver, seed, desc=f"sampling {name} under control")
    logger.info(f"wrote {len(items)} controlled {name} sample(s) to {output_dir}")
    return written
