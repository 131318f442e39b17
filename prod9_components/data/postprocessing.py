"""Postprocessing that writes network outputs back in the input's space: intensity restore and atomic NIfTI save."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from prod9_components.atomic import atomic_path
from prod9_components.data.modalities import modality_name
from prod9_components.data.transforms import restore_intensity
from prod9_components.outputs import check_outputs, output_path as file_in


class RestoreIntensityd(MapTransform):
    """Map ``keys`` from the network's intensity range back to the input's, using the ``[low, high]`` that
    ``RobustIntensityScaled`` stored under ``f"{source_key}_intensity"``.

    Apply before inverting the spatial preprocessing so voxels the inversion pads (outside the foreground crop)
    stay at 0, like the input's background.
    """

    def __init__(self, keys: KeysCollection, source_key: str = "image",
                 intensity_range: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__(keys)
        self.source_key = source_key
        self.intensity_range = tuple(intensity_range)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        low, high = (float(v) for v in torch.as_tensor(d[f"{self.source_key}_intensity"]).flatten()[:2])
        for key in self.key_iterator(d):
            d[key] = restore_intensity(d[key], low, high, self.intensity_range)
        return d


def reconstruction_items(inputs, output: str | None, output_dir: str, overwrite: bool = False,
                         postfix: str = "recon") -> list[dict]:
    """Items ``{"image": input, "output": file}`` for a reconstruction run, every output checked before the first
    is written (:func:`~prod9_components.outputs.check_outputs`).

    Args:
        inputs: one NIfTI path (then ``output``, if given, is its file), a list of paths
            (``<output_dir>/<file stem>_<postfix>.nii.gz``; two inputs with one stem are refused), or
            :func:`~prod9_components.data.brats.per_modality_items` of a split
            (``<output_dir>/<case>_<MOD>_<postfix>.nii.gz``: unique per case and modality whatever the file names).
        output: the exact output file, for a single path input.
        overwrite: replace existing outputs; an output that is an input is refused regardless.
    """
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if output and len(inputs) != 1:
        raise ValueError(f"--output names one file but there are {len(inputs)} inputs")
    items = []
    for entry in inputs:
        if isinstance(entry, dict):
            image, name = entry["image"], f"{entry['case']}_{modality_name(entry['modality'])}_{postfix}.nii.gz"
        else:
            image, name = entry, f"{Path(str(entry)).name.split('.nii')[0]}_{postfix}.nii.gz"
        target = Path(output) if output else file_in(output_dir, name)
        items.append({"image": os.path.abspath(str(image)), "output": str(target)})
    check_outputs([i["output"] for i in items], inputs=[i["image"] for i in items], overwrite=overwrite)
    return items


class SaveVolumed(MapTransform):
    """Write ``keys`` as NIfTI with their MetaTensor affine, atomically (temp file + rename).

    Args:
        keys: what to write (C=1 channel-first volumes, or label maps).
        output_path: the exact file to write (single-input use), or
        output_dir + output_postfix: ``<output_dir>/<input stem>_<postfix>.nii.gz``, the stem taken from the
            ``filename_or_obj`` meta of ``name_key``, or
        path_key: each item names its own file under this key (see :func:`reconstruction_items`).
        dtype: on-disk dtype (float32 images, uint8 masks).
    """

    def __init__(self, keys: KeysCollection, output_path: str | None = None, output_dir: str | None = None,
                 output_postfix: str = "recon", name_key: str = "image", dtype: str = "float32",
                 path_key: str | None = None) -> None:
        super().__init__(keys)
        if not output_path and not output_dir and not path_key:
            raise ValueError("SaveVolumed needs output_path, output_dir or path_key")
        self.output_path, self.output_dir, self.path_key = output_path, output_dir, path_key
        self.output_postfix, self.name_key, self.dtype = output_postfix, name_key, dtype

    def path_for(self, d: dict, key: str) -> Path:
        if self.path_key:
            return Path(d[self.path_key])
        if self.output_path:
            return Path(self.output_path)
        source = d[self.name_key].meta.get("filename_or_obj", "volume") if isinstance(d[self.name_key], MetaTensor) \
            else "volume"
        stem = Path(str(source)).name.split(".nii")[0]
        return file_in(self.output_dir, f"{stem}_{self.output_postfix}.nii.gz")

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = self.path_for(d, key)
            write_nifti(d[key], path, self.dtype)
            d[f"{key}_path"] = str(path)
        return d


def write_nifti(volume: torch.Tensor | np.ndarray, path: str | os.PathLike, dtype: str = "float32",
                affine: np.ndarray | None = None) -> None:
    """Save a (1, D, H, W) or (D, H, W) volume to ``path`` atomically; the affine comes from the MetaTensor."""
    if affine is None:
        affine = volume.affine if isinstance(volume, MetaTensor) else np.eye(4)
    affine = np.asarray(torch.as_tensor(affine).double().cpu(), dtype=np.float64)
    array = volume.detach().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume)
    array = array.reshape(array.shape[-3:]).astype(dtype)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(array, affine), tmp)
