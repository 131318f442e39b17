"""MaskGiT generation: label-conditional samples and in-context translation of NIfTI volumes.

Both sample token grids with :class:`~prod9_components.sampling.maskgit.MaskGiTSampler`, decode them with the
stage-1 autoencoder through the sliding window and write NIfTI files atomically. Translation maps the result back
onto the source volume's own grid (shape, affine) by inverting the preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from torch import nn
from tqdm import tqdm

from prod9_components.data.modalities import MODALITIES, modality_index, modality_name
from prod9_components.data.postprocessing import write_nifti
from prod9_components.data.token_cache import pad_or_crop, restore
from prod9_components.data.transforms import mask_preprocessing
from prod9_components.inference.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_components.outputs import check_outputs, output_path as file_in

logger = logging.getLogger("prod9")


def sample_volumes(network: nn.Module, autoencoder: nn.Module, sampler, modality: str | int, num_samples: int,
                   token_grid: Sequence[int], seed: int = 0, sw_config: SlidingWindowConfig | None = None,
                   device: str | torch.device = "cpu", volume_grid: Sequence[int] | None = None):
    """Yield ``num_samples`` decoded label-conditional samples, each (1, D, H, W) float32 on ``device``.

    Args:
        network: the transformer; autoencoder: the stage-1 FSQ autoencoder it was trained on.
        sampler: a ``MaskGiTSampler`` (steps, schedule, guidance).
        modality: the modality to generate (name or index).
        token_grid: (d, h, w) token grid of each sample (the image is ``f`` times larger).
        volume_grid: the whole-volume token grid the model was trained in (checkpoint ``volume_grid``); a smaller
            ``token_grid`` is sampled as its centre (positions are absolute). None: ``token_grid`` is the volume.
        seed: sample ``i`` uses seed ``seed + i`` (reproducible, independent of ``num_samples``).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    label = torch.tensor([modality_index(modality)], device=device)
    wrapper = AutoencoderInferenceWrapper(autoencoder.eval(), sw_config)
    volume_grid = token_grid if volume_grid is None else volume_grid
    origin = torch.tensor([[max(0, (v - t) // 2) for v, t in zip(volume_grid, token_grid)]], device=device)
    for i in range(num_samples):
        generator = torch.Generator().manual_seed(int(seed) + i)
        tokens = sampler.sample(network, (1, *token_grid), label, generator=generator, grid_origin=origin)
        with torch.no_grad():
            yield wrapper.decode(autoencoder.fsq.embed(tokens))[0].float()


def generate_samples(network: nn.Module, autoencoder: nn.Module, sampler, modality: str | int, num_samples: int,
                     token_grid: Sequence[int], output_dir: str, spacing: Sequence[float], seed: int = 0,
                     sw_config: SlidingWindowConfig | None = None, device: str | torch.device = "cpu",
                     volume_grid: Sequence[int] | None = None, overwrite: bool = False) -> list[str]:
    """Write :func:`sample_volumes` as ``sample_0001_<MOD>.nii.gz``, ... (RAS, ``spacing`` mm); returns the paths.
    Existing samples are refused unless ``overwrite`` (checked before sampling)."""
    name = modality_name(modality_index(modality))
    affine = np.diag([*map(float, spacing), 1.0])
    paths = check_outputs([file_in(output_dir, f"sample_{i + 1:04d}_{name}.nii.gz") for i in range(num_samples)],
                          overwrite=overwrite)
    samples = sample_volumes(network, autoencoder, sampler, modality, num_samples, token_grid, seed, sw_config, device,
                             volume_grid)
    written = []
    for path, image in zip(paths, tqdm(samples, total=num_samples, desc=f"sampling {name}", unit="volume")):
        write_nifti(image, path, affine=affine)
        written.append(str(path))
    return written


def translate_volumes(network: nn.Module, autoencoder: nn.Module, sampler, items: Sequence[dict],
                      source_modalities: Sequence[str | int], target_modality: str | int, preprocessing: list,
                      output_dir: str, output_path: str | None = None, pad_token: int = 0, seed: int = 0,
                      sw_config: SlidingWindowConfig | None = None, device: str | torch.device = "cpu",
                      overwrite: bool = False, num_samples: int | None = None) -> list[str]:
    """Translate source volumes into the target modality; write ``<case>_<TARGET>.nii.gz`` on the source's grid
    (``<case>_sample_0001_<TARGET>.nii.gz``, ... for several samples of one source).

    Args:
        items: dicts with a path per source modality key (``"t1"``, ...) and optionally ``"case"``.
        num_samples: how many translations: of several items the first ``num_samples``, of one item that many
            samples (seeds ``seed``, ``seed + 1``, ...). None: one per item.
        source_modalities / target_modality: names or indices; the target must not be a source.
        preprocessing: ``data.preprocessing(image_keys=<source keys>, ...)`` — the same contract as the tokens.
        output_path: exact output file (one item only); else ``output_dir``.
        pad_token: token that fills grid cells cropped away when a volume exceeds the model's grid.
        overwrite: replace existing outputs; an output that is one of the sources is refused regardless.
    """
    sources = [modality_index(m) for m in source_modalities]
    target = modality_index(target_modality)
    if target in sources:
        raise ValueError(f"{modality_name(target)} is both a source and the target modality")
    if num_samples is not None and int(num_samples) < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    repeats = 1
    if num_samples is not None and len(items) == 1:
        repeats = int(num_samples)  # several samples of one source
    elif num_samples is not None:
        if int(num_samples) > len(items):
            raise ValueError(f"--num-samples {num_samples}: only {len(items)} inputs to translate")
        items = items[:int(num_samples)]
    if output_path and len(items) * repeats != 1:
        raise ValueError(f"--output names one file but there are {len(items) * repeats} translations "
                         "(name a directory)")
    keys = [MODALITIES[s] for s in sources]
    for index, item in enumerate(items):
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"input {index} has no {', '.join(missing)} volume (sources: {', '.join(keys)})")
    # Every output is named (inside output_dir) and checked before the first volume is translated.
    cases = [item.get("case") or Path(str(item[keys[0]])).name.split(".nii")[0] for item in items]
    names = ([f"{cases[0]}_sample_{i + 1:04d}_{modality_name(target)}.nii.gz" for i in range(repeats)] if repeats > 1
             else [f"{case}_{modality_name(target)}.nii.gz" for case in cases])
    paths = check_outputs([Path(output_path)] if output_path else [file_in(output_dir, name) for name in names],
                          inputs=[item[k] for item in items for k in keys], overwrite=overwrite)
    items = list(items) * repeats  # translation ``index`` writes ``paths[index]`` with seed ``seed + index``
    transform = Compose(preprocessing)
    wrapper = AutoencoderInferenceWrapper(autoencoder.eval(), sw_config)
    max_grid = list(network.init_args["max_grid_size"])
    written = []
    for index, item in enumerate(tqdm(items, desc=f"translating to {modality_name(target)}", unit="volume")):
        data = transform({k: item[k] for k in keys})
        with torch.no_grad():
            grids = [wrapper.quantize_stage_2_inputs(data[k].as_tensor()[None].to(device))[0] for k in keys]
        grid = list(grids[0].shape)
        size = [min(g, m) for g, m in zip(grid, max_grid)]  # a larger volume is centre-cropped on the token grid
        cropped = [pad_or_crop(g, size, pad_token) for g in grids]
        source_tokens = torch.stack([c[0] for c in cropped])[None]
        origin = torch.tensor([[-o for o in cropped[0][1][0]]], device=device)  # the crop's place in the grid
        generator = torch.Generator().manual_seed(int(seed) + index)
        tokens = sampler.sample(network, (1, *size), torch.tensor([target], device=device), source_tokens,
                                torch.tensor([sources], device=device), generator=generator, grid_origin=origin)
        tokens = restore(tokens[0], cropped[0][1], pad_token)[None]
        with torch.no_grad():
            image = wrapper.decode(autoencoder.fsq.embed(tokens))[0].float().cpu()
        inverted = Invertd(keys="pred", transform=transform, orig_keys=keys[0], nearest_interp=False)(
            {**data, "pred": MetaTensor(image)})["pred"]  # Invertd skips plain tensors
        write_nifti(inverted, paths[index])
        written.append(str(paths[index]))
    logger.info(f"wrote {len(written)} translation(s) to {modality_name(target)}")
    return written


def input_items(inputs, source_modalities: Sequence[str | int]) -> list[dict]:
    """Items for :func:`translate_volumes` from what a user passes.

    ``inputs`` is one NIfTI path (one source modality), a list of paths (one per source modality, in order), or a
    list of case dicts (e.g. the test split).
    """
    keys = [MODALITIES[modality_index(m)] for m in source_modalities]
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if inputs and all(isinstance(p, (str, Path)) for p in inputs):
        if len(inputs) != len(keys):
            raise ValueError(f"got {len(inputs)} input file(s) for {len(keys)} source modalities "
                             f"({', '.join(modality_name(modality_index(m)) for m in source_modalities)})")
        for p in inputs:
            if not Path(p).is_file():
                raise FileNotFoundError(f"{p}: no such input file")
        return [{k: str(Path(p).resolve()) for k, p in zip(keys, inputs)}]
    return [dict(item) for item in inputs]


def mask_items(masks) -> list[dict]:
    """Items for :func:`generate_with_masks` from a mask path, a list of paths, or case dicts (the test split)."""
    masks = [masks] if isinstance(masks, (str, Path)) else list(masks)
    if all(isinstance(m, dict) for m in masks):
        items = [{"seg": m["seg"], "case": m["case"]} for m in masks if m.get("seg")]
        if not items:
            raise ValueError("no --mask given and the test split has no segmentations to take masks from")
        return items
    for p in masks:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such mask file")
    return [{"seg": str(Path(p).resolve()), "case": Path(str(p)).name.split(".nii")[0]} for p in masks]


def generate_with_masks(network: nn.Module, autoencoder: nn.Module, sampler, modality: str | int,
                        items: Sequence[dict], volume_grid: Sequence[int], spacing: Sequence[float], output_dir: str,
                        output_path: str | None = None, seed: int = 0, sw_config: SlidingWindowConfig | None = None,
                        device: str | torch.device = "cpu", source_modalities: Sequence[str] = (),
                        overwrite: bool = False) -> list[str]:
    """Mask-controlled samples: ``<case>_<MOD>.nii.gz`` and the mask used, ``<case>_mask.nii.gz``, on one grid.

    Each mask (any BraTS label convention, any grid) is put on the model's whole-volume grid by
    :func:`~prod9_components.data.transforms.mask_preprocessing`; sample ``i`` uses seed ``seed + i``.

    Args:
        network: a ``MaskGiTControlNet`` around a label-conditional transformer (control_type mask or mask+label).
        items: dicts with ``"seg"`` (a NIfTI path) and ``"case"``, see :func:`mask_items`.
        volume_grid: the token grid of the training volumes (checkpoint ``volume_grid``).
        output_path: exact image file (one mask only; the mask goes beside it); else ``output_dir``.
        source_modalities: those of the base transformer; generation needs a label-conditional base (none).
        overwrite: replace existing outputs; an output that is one of the masks is refused regardless.
    """
    if source_modalities:
        raise ValueError(f"this ControlNet steers an in-context transformer (sources {', '.join(source_modalities)}): "
                         "generating from a mask alone needs one trained on a label-conditional transformer")
    if getattr(network, "mask_encoder", None) is None:
        raise ValueError("this ControlNet has control_type 'label': it takes no mask (train with mask or mask+label)")
    if output_path and len(items) != 1:
        raise ValueError(f"--output names one file but there are {len(items)} masks")
    factor = int(network.init_args["downsample_factor"])
    label = torch.tensor([modality_index(modality)], device=device)
    name = modality_name(int(label))
    paths = [Path(output_path) if output_path else file_in(output_dir, f"{item['case']}_{name}.nii.gz")
             for item in items]
    mask_paths = [p.with_name(p.name.split(".nii")[0].removesuffix(f"_{name}") + "_mask.nii.gz") for p in paths]
    check_outputs([*paths, *mask_paths], inputs=[item["seg"] for item in items], overwrite=overwrite)
    transform = Compose(mask_preprocessing(spacing, [g * factor for g in volume_grid]))
    wrapper = AutoencoderInferenceWrapper(autoencoder.eval(), sw_config)
    written = []
    for i, item in enumerate(tqdm(items, desc=f"sampling {name} with masks", unit="volume")):
        seg = transform({"seg": item["seg"]})["seg"]  # (1, D, H, W) MetaTensor on the output grid
        generator = torch.Generator().manual_seed(int(seed) + i)
        tokens = sampler.sample(network, (1, *volume_grid), label, generator=generator,
                                model_kwargs={"control_mask": seg.as_tensor().long().to(device)})
        with torch.no_grad():
            image = wrapper.decode(autoencoder.fsq.embed(tokens))[0].float().cpu()
        path, mask_path = paths[i], mask_paths[i]
        write_nifti(image, path, affine=seg.affine)
        write_nifti(seg, mask_path, dtype="uint8")
        written += [str(path), str(mask_path)]
    logger.info(f"wrote {len(written) // 2} mask-controlled {name} sample(s) with their masks")
    return written
