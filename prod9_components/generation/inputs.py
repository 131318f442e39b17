"""What a user passes to ``generate`` (files, or the test split's case dicts) as the items the generation loop walks,
and the conditions of an item onto the model's image grid.

Items are dicts: ``"case"`` (the output's name), and per condition a NIfTI path: ``"seg"`` (tumour mask),
``"source"`` (a source image of another modality), or for in-context translation one key per source modality
(``"t1"``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.transforms import Compose, ResizeWithPadOrCropd

from prod9_components.data.modalities import MODALITIES, modality_index, modality_name
from prod9_components.data.transforms import mask_preprocessing, preprocessing

__all__ = ["condition_items", "condition_preprocessing", "input_items"]


def _files(value, what: str) -> list[str]:
    """Absolute paths of one path or a list of them, each an existing file (else FileNotFoundError naming it)."""
    paths = [value] if isinstance(value, (str, Path)) else list(value or [])
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such {what} file")
    return [str(Path(p).resolve()) for p in paths]


def _case(path: str) -> str:
    return Path(str(path)).name.split(".nii")[0]


def condition_items(masks=None, sources=None, uses_mask: bool = True, uses_image: bool = False,
                    source_modality: str | int | None = None) -> list[dict]:
    """``[{"case", "seg"?, "source"?}]`` for a ControlNet of either family from what a user passes: mask and source
    files (paired in order; the case is the first file's name), or case dicts (the bundles' default: the test split),
    each giving its ``"seg"`` and ``source_modality`` image; cases without a segmentation are skipped when a mask is
    needed, and with neither condition (control by label only) each case gives one sample. Source files given beside
    case dicts win.

    Args:
        masks / sources: a path, a list of paths, None; ``masks`` may instead be a list of case dicts.
        uses_mask / uses_image: the conditions the ControlNet takes (its condition or control type).
        source_modality: the modality of the source images (needed for case dicts with ``uses_image``).

    Raises:
        ValueError / FileNotFoundError: a missing file, a condition the ControlNet needs but was not given (or takes
            but was given), unpaired masks and sources, a test split with nothing to take the conditions from.
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
                raise ValueError("no --mask/--source given and the test split has no cases to take them from"
                                 + (" (a mask needs the case's segmentation)" if uses_mask else ""))
            return items
    masks, sources = _files(masks, "mask"), _files(sources, "source image")
    for given, used, flag in ((masks, uses_mask, "--mask"), (sources, uses_image, "--source")):
        if used and not given:
            raise ValueError(f"this ControlNet is steered by {flag} too: pass one per volume")
        if given and not used:
            raise ValueError(f"this ControlNet takes no {flag} (see its condition_type)")
    if not masks and not sources:
        raise ValueError("nothing to generate from: pass --mask and/or --source files, or neither for the test split")
    if masks and sources and len(masks) != len(sources):
        raise ValueError(f"got {len(masks)} mask(s) but {len(sources)} source image(s): pass them in pairs")
    return [{"case": _case(first), **({"seg": masks[i]} if masks else {}),
             **({"source": sources[i]} if sources else {})} for i, first in enumerate(masks or sources)]


def input_items(inputs, source_modalities: Sequence[str | int]) -> list[dict]:
    """Items of in-context translation, ``[{<source key>: path, ..., "case"?}]``: ``inputs`` is one NIfTI path (one
    source modality), a list of paths (one per source modality, in order: one item), or case dicts (the test split).
    """
    keys = [MODALITIES[modality_index(m)] for m in source_modalities]
    inputs = [inputs] if isinstance(inputs, (str, Path)) else inputs
    if inputs and all(isinstance(p, (str, Path)) for p in inputs):
        if len(inputs) != len(keys):
            raise ValueError(f"got {len(inputs)} input file(s) for {len(keys)} source modalities "
                             f"({', '.join(modality_name(modality_index(m)) for m in source_modalities)})")
        return [dict(zip(keys, _files(inputs, "input")))]
    return [dict(item) for item in inputs]


def condition_preprocessing(spacing: Sequence[float], image_size: Sequence[int], with_mask: bool, with_source: bool,
                            intensity_range: Sequence[float] = (0.0, 1.0)) -> Compose:
    """The conditions of an item onto the model's image grid ``image_size``: a mask alone through
    :func:`~prod9_components.data.transforms.mask_preprocessing`; a source through the training preprocessing (its
    own foreground crop, ``intensity_range``), the mask then resampled nearest onto the source's grid, both centre
    padded/cropped to ``image_size``; nothing spatial (control by label only): no transform."""
    size = tuple(int(s) for s in image_size)
    if not with_mask and not with_source:
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
