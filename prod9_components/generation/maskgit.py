"""MaskGiT generation: label-conditional samples, in-context translation of NIfTI volumes, and mask-controlled samples.

Each samples token grids with :class:`~prod9_components.sampling.maskgit.MaskGiTSampler`, decodes them with the
stage-1 autoencoder (:func:`~prod9_components.generation.decode.decode_tokens`) and runs through the shared loop and
saver (:mod:`prod9_components.generation.loop`). Translation maps the result back onto the source volume's own grid
(shape, affine) by inverting the preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from torch import nn

from prod9_components.data.settings import bool_setting
from prod9_components.data.modalities import MODALITIES, modality_index, modality_name
from prod9_components.data.token_cache import pad_or_crop, restore
from prod9_components.generation.decode import decode_codes, decode_tokens
from prod9_components.generation.inputs import condition_preprocessing
from prod9_components.generation.loop import generate, sample_items, seeded
from prod9_components.generation.saver import GeneratedVolume, VolumeSaver, case_names, sample_names, spacing_affine
from prod9_components.inference.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_components.sampling.steps import check_scale

__all__ = ["generate_samples", "generate_with_masks", "sample_volumes", "translate_volumes"]

logger = logging.getLogger("prod9")


def _label_sample(network: nn.Module, autoencoder: nn.Module, sampler, modality: str | int,
                  token_grid: Sequence[int], sw_config: SlidingWindowConfig | None, device: str | torch.device,
                  volume_grid: Sequence[int] | None):
    """``sample(item, generator) -> (1, D, H, W)`` of a label-conditional transformer (the item is unused)."""
    label = torch.tensor([modality_index(modality)], device=device)
    volume_grid = token_grid if volume_grid is None else volume_grid
    origin = torch.tensor([[max(0, (v - t) // 2) for v, t in zip(volume_grid, token_grid)]], device=device)

    def sample(_, generator: torch.Generator) -> torch.Tensor:
        tokens = sampler.sample(network, (1, *token_grid), label, generator=generator, grid_origin=origin)
        return decode_tokens(autoencoder, tokens, sw_config)[0]

    return sample


def sample_volumes(network: nn.Module, autoencoder: nn.Module, sampler, modality: str | int, num_samples: int,
                   token_grid: Sequence[int], seed: int = 0, sw_config: SlidingWindowConfig | None = None,
                   device: str | torch.device = "cpu", volume_grid: Sequence[int] | None = None,
                   ) -> Iterator[torch.Tensor]:
    """Yield ``num_samples`` decoded label-conditional samples, each (1, D, H, W) float32 on ``device``.

    Args:
        network: the transformer; autoencoder: the stage-1 FSQ autoencoder it was trained on.
        sampler: a ``MaskGiTSampler`` (steps, schedule, guidance).
        modality: the modality to generate (name or index).
        token_grid: (d, h, w) token grid of each sample (the image is ``f`` times larger).
        volume_grid: the whole-volume token grid the model was trained in (checkpoint ``volume_grid``); a smaller
            ``token_grid`` is sampled as its centre (positions are absolute). None: ``token_grid`` is the volume.
        seed: sample ``i`` uses seed ``seed + i`` (:func:`~prod9_components.generation.loop.seeded`).
    """
    sample = _label_sample(network, autoencoder, sampler, modality, token_grid, sw_config, device, volume_grid)
    return seeded(sample, sample_items(num_samples), seed)


def generate_samples(network: nn.Module, autoencoder: nn.Module, sampler, modality: str | int, num_samples: int,
                     token_grid: Sequence[int], output_dir: str, spacing: Sequence[float], seed: int = 0,
                     sw_config: SlidingWindowConfig | None = None, device: str | torch.device = "cpu",
                     volume_grid: Sequence[int] | None = None, overwrite: bool = False) -> list[str]:
    """Write :func:`sample_volumes` as ``sample_0001_<MOD>.nii.gz``, ... (RAS, ``spacing`` mm); returns the paths.
    Existing samples are refused unless ``overwrite`` (checked before sampling)."""
    items, name = sample_items(num_samples), modality_name(modality_index(modality))
    saver = VolumeSaver(output_dir, sample_names(num_samples, name), overwrite=overwrite)
    sample = _label_sample(network, autoencoder, sampler, modality, token_grid, sw_config, device, volume_grid)
    affine = spacing_affine(spacing)
    return generate(lambda item, generator: GeneratedVolume(sample(item, generator), affine), items, saver, seed,
                    desc=f"sampling {name}")


def translate_volumes(network: nn.Module, autoencoder: nn.Module, sampler, items: Sequence[dict],
                      source_modalities: Sequence[str | int], target_modality: str | int, preprocessing: list,
                      output_dir: str, output_path: str | None = None, pad_token: int = 0, seed: int = 0,
                      sw_config: SlidingWindowConfig | None = None, device: str | torch.device = "cpu",
                      overwrite: bool = False, num_samples: int | None = None, expected_codes: bool = False,
                      ) -> list[str]:
    """Translate source volumes into the target modality; write ``<case>_<TARGET>.nii.gz`` on the source's grid
    (``<case>_sample_0001_<TARGET>.nii.gz``, ... for several samples of one source).

    Args:
        items: dicts with a path per source modality key (``"t1"``, ...) and optionally ``"case"``
            (:func:`~prod9_components.generation.inputs.input_items`).
        num_samples: how many translations: of several items the first ``num_samples``, of one item that many
            samples (seeds ``seed``, ``seed + 1``, ...). None: one per item.
        source_modalities / target_modality: names or indices; the target must not be a source.
        preprocessing: ``data.preprocessing(image_keys=<source keys>, ...)`` — the same contract as the tokens.
        output_path: exact output file (one translation only); else ``output_dir``.
        pad_token: token that fills grid cells cropped away when a volume exceeds the model's grid.
        overwrite: replace existing outputs; an output that is one of the sources is refused regardless.
        expected_codes: decode the code each token is expected to take (``sampler.expected_codes``: one
            deterministic pass, the least squared error) instead of a sample.
    """
    expected_codes = bool_setting("expected_codes", expected_codes)
    sources = [modality_index(m) for m in source_modalities]
    target = modality_index(target_modality)
    name = modality_name(target)
    if target in sources:
        raise ValueError(f"{name} is both a source and the target modality")
    if num_samples is not None and int(num_samples) < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    repeats = 1
    if num_samples is not None and len(items) == 1:
        repeats = int(num_samples)  # several samples of one source
    elif num_samples is not None:
        if int(num_samples) > len(items):
            raise ValueError(f"--num-samples {num_samples}: only {len(items)} inputs to translate")
        items = items[:int(num_samples)]
    keys = [MODALITIES[s] for s in sources]
    for index, item in enumerate(items):
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"input {index} has no {', '.join(missing)} volume (sources: {', '.join(keys)})")
    cases = [item.get("case") or Path(str(item[keys[0]])).name.split(".nii")[0] for item in items]
    names = [f"{cases[0]}_{n}" for n in sample_names(repeats, name)] if repeats > 1 else case_names(cases, name)
    saver = VolumeSaver(output_dir, names, output_path, inputs=[item[k] for item in items for k in keys],
                        overwrite=overwrite, what="translations")
    transform = Compose(preprocessing)
    wrapper = AutoencoderInferenceWrapper(autoencoder.eval(), sw_config)
    max_grid = list(network.init_args["max_grid_size"])
    source_labels, target_label = torch.tensor([sources], device=device), torch.tensor([target], device=device)

    def sample(item: dict, generator: torch.Generator) -> GeneratedVolume:
        data = transform({k: item[k] for k in keys})
        grids = [wrapper.quantize_stage_2_inputs(data[k].as_tensor()[None].to(device))[0] for k in keys]
        size = [min(g, m) for g, m in zip(grids[0].shape, max_grid)]  # a larger volume is centre-cropped on the grid
        cropped = [pad_or_crop(g, size, pad_token) for g in grids]
        origin = torch.tensor([[-o for o in cropped[0][1][0]]], device=device)  # the crop's place in the grid
        context = (target_label, torch.stack([c[0] for c in cropped])[None], source_labels)
        if expected_codes:
            fsq = autoencoder.fsq
            codes = sampler.expected_codes(network, fsq.codebook().to(device), (1, *size), *context, grid_origin=origin)
            pad = fsq.embed(torch.tensor([pad_token], device=device))[0]  # (C,): cells cropped away decode as pad
            codes = restore(codes[0] - pad[:, None, None, None], cropped[0][1], 0.0) + pad[:, None, None, None]
            image = decode_codes(autoencoder, codes[None], sw_config)[0].cpu()
        else:
            tokens = sampler.sample(network, (1, *size), *context, generator=generator, grid_origin=origin)
            image = decode_tokens(autoencoder, restore(tokens[0], cropped[0][1], pad_token)[None], sw_config)[0].cpu()
        inverted = Invertd(keys="pred", transform=transform, orig_keys=keys[0], nearest_interp=False)(
            {**data, "pred": MetaTensor(image)})["pred"]  # Invertd skips plain tensors
        return GeneratedVolume(inverted)

    # translation ``i`` writes the saver's file ``i`` with seed ``seed + i``
    written = generate(sample, list(items) * repeats, saver, seed, desc=f"translating to {name}")
    logger.info(f"wrote {len(written)} translation(s) to {name}")
    return written


def generate_with_masks(network: nn.Module, autoencoder: nn.Module, sampler, modality: str | int,
                        items: Sequence[dict], volume_grid: Sequence[int], spacing: Sequence[float], output_dir: str,
                        output_path: str | None = None, seed: int = 0, sw_config: SlidingWindowConfig | None = None,
                        device: str | torch.device = "cpu", source_modalities: Sequence[str] = (),
                        overwrite: bool = False, conditioning_scale: float = 1.0) -> list[str]:
    """Mask-controlled samples: ``<case>_<MOD>.nii.gz`` and the mask used, ``<case>_mask.nii.gz``, on one grid.

    Each mask (any BraTS label convention, any grid) is put on the model's whole-volume grid by
    :func:`~prod9_components.generation.inputs.condition_preprocessing`; sample ``i`` uses seed ``seed + i``.

    Args:
        network: a ``MaskGiTControlNet`` around a label-conditional transformer (control_type mask or mask+label).
        items: dicts with ``"seg"`` (a NIfTI path) and ``"case"``
            (:func:`~prod9_components.generation.inputs.condition_items`).
        volume_grid: the token grid of the training volumes (checkpoint ``volume_grid``).
        output_path: exact image file (one mask only; the mask goes beside it); else ``output_dir``.
        source_modalities: those of the base transformer; generation needs a label-conditional base (none).
        overwrite: replace existing outputs; an output that is one of the masks is refused regardless.
        conditioning_scale: the control branch's multiplier (1: as trained; above 1 amplifies the mask's effect).
    """
    conditioning_scale = check_scale("conditioning_scale", conditioning_scale)
    if source_modalities:
        raise ValueError(f"this ControlNet steers an in-context transformer (sources {', '.join(source_modalities)}): "
                         "generating from a mask alone needs one trained on a label-conditional transformer")
    if getattr(network, "mask_encoder", None) is None:
        raise ValueError("this ControlNet has control_type 'label': it takes no mask (train with mask or mask+label)")
    label = torch.tensor([modality_index(modality)], device=device)
    name = modality_name(int(label))
    saver = VolumeSaver(output_dir, case_names([item["case"] for item in items], name), output_path, modality=name,
                        masks=True, inputs=[item["seg"] for item in items], overwrite=overwrite, what="masks")
    factor = int(network.init_args["downsample_factor"])
    transform = condition_preprocessing(spacing, [g * factor for g in volume_grid], with_mask=True, with_source=False)

    def sample(item: dict, generator: torch.Generator) -> GeneratedVolume:
        seg = transform({"seg": item["seg"]})["seg"]  # (1, D, H, W) MetaTensor on the output grid
        encoded = network.encode_mask(seg.as_tensor().long().to(device), volume_grid)  # once, not every step
        tokens = sampler.sample(network, (1, *volume_grid), label, generator=generator,
                                model_kwargs={"mask_embedding": encoded, "conditioning_scale": conditioning_scale})
        return GeneratedVolume(decode_tokens(autoencoder, tokens, sw_config)[0].cpu(), seg.affine, seg)

    written = generate(sample, items, saver, seed, desc=f"sampling {name} with masks")
    logger.info(f"wrote {len(written) // 2} mask-controlled {name} sample(s) with their masks")
    return written
