"""Generate with a MAISI ControlNet: a tumour mask and/or a source image of another modality steer the latent
diffusion model; each sample is decoded by the VAE and written beside the mask it was steered by."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, ResizeWithPadOrCropd
from torch import nn
from tqdm import tqdm

from prod9_components.data.modalities import MODALITIES, modality_index, modality_name
from prod9_components.data.postprocessing import write_nifti
from prod9_components.data.transforms import mask_preprocessing, preprocessing
from prod9_components.engines.diffusion_generation import decode_latent
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.networks.export import unwrap
from prod9_components.outputs import check_outputs, output_path
from prod9_components.sampling.rectified_flow import sample_rectified_flow
from prod9_components.sampling.steps import check_num_steps

__all__ = ["condition_items", "condition_preprocessing", "generate_with_conditions", "target_modality"]

logger = logging.getLogger("prod9")


def target_modality(target: str | int | None, source: str | int | None, trained_source: str | int | None,
                    modalities: Sequence[str | int]) -> str:
    """The modality to generate: ``target``, or by default the first of ``modalities`` other than the source.
    Refuses a target equal to the source, and a source other than the one the ControlNet was trained with."""
    if source is not None and trained_source is not None and modality_index(source) != modality_index(trained_source):
        raise ValueError(f"this ControlNet was trained to translate from {modality_name(modality_index(trained_source))}"
                         f", not {modality_name(modality_index(source))}")
    source = trained_source if source is None else source
    if target is None:
        target = next(m for m in modalities if source is None or modality_index(m) != modality_index(source))
    if source is not None and modality_index(target) == modality_index(source):
        raise ValueError(f"the source modality {modality_name(modality_index(source))} equals the target modality: "
                         "translation needs another target")
    return modality_name(modality_index(target))


def _paths(value, what: str) -> list[str]:
    paths = [value] if isinstance(value, (str, Path)) else list(value or [])
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such {what} file")
    return [str(Path(p).resolve()) for p in paths]


def condition_items(masks, sources, uses_mask: bool, uses_image: bool, source_modality: str | int | None) -> list[dict]:
    """``[{"case", "seg"?, "source"?}]`` from what a user passes: mask and source files (paired in order), or case
    dicts (the bundle's default ``mask``: the test split), each giving its mask and ``source_modality`` image (for
    condition_type "label" just the case names: one sample each). Source files given beside case dicts win.

    Raises:
        ValueError / FileNotFoundError: a missing file, a condition the ControlNet needs but was not given (or takes
            but was given), unpaired masks and sources.
    """
    masks = [masks] if isinstance(masks, (str, Path)) else masks
    if masks and all(isinstance(m, Mapping) for m in masks):
        if sources is not None:
            masks = None
        else:
            items = [{"case": c["case"], **({"seg": c["seg"]} if uses_mask else {}),
                      **({"source": c[MODALITIES[modality_index(source_modality)]]} if uses_image else {})}
                     for c in masks if not uses_mask or c.get("seg")]
            if not items:
                raise ValueError("no --mask/--source given and the test split has no cases to take them from")
            return items
    masks, sources = _paths(masks, "mask"), _paths(sources, "source image")
    for given, used, flag in ((masks, uses_mask, "--mask"), (sources, uses_image, "--source")):
        if used and not given:
            raise ValueError(f"this ControlNet is steered by {flag} too: pass one per volume")
        if given and not used:
            raise ValueError(f"this ControlNet takes no {flag} (see its condition_type)")
    if not masks and not sources:
        raise ValueError("nothing to generate from: pass --mask and/or --source files, or neither for the test split")
    if masks and sources and len(masks) != len(sources):
        raise ValueError(f"got {len(masks)} mask(s) but {len(sources)} source image(s): pass them in pairs")
    names = [Path(p).name.split(".nii")[0] for p in (masks or sources)]
    return [{"case": name, **({"seg": masks[i]} if masks else {}), **({"source": sources[i]} if sources else {})}
            for i, name in enumerate(names)]


def condition_preprocessing(spacing: Sequence[float], intensity_range: Sequence[float], image_size: Sequence[int],
                            with_mask: bool, with_source: bool) -> Compose:
    """Conditions onto the model's image grid ``image_size``: the source through the training preprocessing (its
    own foreground crop), the mask resampled nearest onto the source's grid when theirs differ, both centre
    padded/cropped to ``image_size``; a mask alone through :func:`~prod9_components.data.transforms.mask_preprocessing`."""
    size = tuple(int(s) for s in image_size)
    if not with_mask and not with_source:  # condition_type "label": nothing spatial to prepare
        return Compose([])
    if not with_source:
        return Compose(mask_preprocessing(spacing, size))
    labels = ["seg"] if with_mask else []
    return Compose([
        *preprocessing(image_keys=["source"], label_keys=labels, spacing=spacing,
                       intensity_range=tuple(intensity_range), k_divisible=1),
        ResizeWithPadOrCropd(["source"], spatial_size=size, value=float(intensity_range[0])),
        *([ResizeWithPadOrCropd(labels, spatial_size=size)] if labels else []),
    ])


@torch.no_grad()
def generate_with_conditions(network: nn.Module, vae: nn.Module, scheduler, modality: str | int,
                             items: Sequence[dict], latent_size: Sequence[int], scale_factor: float, num_steps: int,
                             spacing: Sequence[float], output_dir: str, guidance_scale: float = 1.0, seed: int = 0,
                             sw_config: SlidingWindowConfig | None = None, device: str | torch.device = "cpu",
                             intensity_range: Sequence[float] = (0.0, 1.0), overwrite: bool = False) -> list[str]:
    """Sample ``<case>_<MOD>.nii.gz`` per item (seed ``seed + i``) on the conditions' grid, with the mask it was
    steered by as ``<case>_mask.nii.gz``; every file written atomically. Returns the paths.

    Args:
        network: a :class:`~prod9_components.networks.maisi_controlnet.MaisiControlNet`.
        items: from :func:`condition_items`; latent_size / scale_factor: the diffusion model's.
        overwrite: replace existing outputs (checked before sampling); an output that is a condition file is
            refused regardless.
    """
    check_num_steps(num_steps, scheduler.num_train_timesteps)
    model = unwrap(network).eval()
    factor = int(model.init_args["downsample_factor"])
    image_size = [int(s) * factor for s in latent_size]
    with_mask, with_source = "seg" in items[0], "source" in items[0]
    name = modality_name(modality_index(modality))
    paths = [output_path(output_dir, f"{item['case']}_{name}.nii.gz") for item in items]
    mask_paths = [output_path(output_dir, f"{item['case']}_mask.nii.gz") for item in items] if with_mask else []
    check_outputs([*paths, *mask_paths], inputs=[item[k] for item in items for k in ("seg", "source") if k in item],
                  overwrite=overwrite)
    transform = condition_preprocessing(spacing, intensity_range, image_size, with_mask, with_source)
    label = torch.tensor([modality_index(modality)], device=device)
    written = []
    for i, item in enumerate(tqdm(items, desc=f"sampling {name} under control", unit="volume")):
        data = transform({k: item[k] for k in ("seg", "source") if k in item})
        affine = data["source"].affine if with_source else data["seg"].affine if with_mask else np.diag(
            [*map(float, spacing), 1.0])
        conditions = {}
        if with_mask:
            conditions["control_mask"] = data["seg"].as_tensor()[None].long().to(device)
        if with_source:
            conditions["control_image"] = data["source"].as_tensor()[None].float().to(device)
        noise = torch.randn((1, model.latent_channels, *map(int, latent_size)),
                            generator=torch.Generator().manual_seed(int(seed) + i)).to(device)
        latent = sample_rectified_flow(model, scheduler, noise, label, num_steps, guidance_scale, model.null_label,
                                       **conditions)
        image = decode_latent(vae, latent, scale_factor, sw_config, intensity_range).cpu()
        write_nifti(image, paths[i], affine=affine)
        written.append(str(paths[i]))
        if with_mask:
            write_nifti(data["seg"], mask_paths[i], dtype="uint8")
            written.append(str(mask_paths[i]))
    logger.info(f"wrote {len(items)} controlled {name} sample(s) to {output_dir}")
    return written
