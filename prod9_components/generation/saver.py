"""Where the volumes of one ``generate`` call go: every file named and checked before the first sample is drawn, then
each written atomically (DESIGN §10: nothing outside the output folder, no input or existing output overwritten
without ``--overwrite``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prod9_components.data.postprocessing import write_nifti
from prod9_components.outputs import check_outputs, output_path as file_in

__all__ = ["GeneratedVolume", "VolumeSaver", "case_names", "sample_names", "spacing_affine"]


@dataclass
class GeneratedVolume:
    """What a sample function of :func:`~prod9_components.generation.loop.generate` returns for one item.

    Args:
        image: (1, D, H, W) float32; a MONAI ``MetaTensor`` brings its own affine.
        affine: (4, 4) voxel-to-world matrix of ``image``; None: the ``MetaTensor``'s (else identity).
        mask: (1, D, H, W) label ``MetaTensor`` the sample was steered by, written beside it (uint8); None: none.
    """

    image: torch.Tensor
    affine: np.ndarray | torch.Tensor | None = None
    mask: torch.Tensor | None = None


def spacing_affine(spacing: Sequence[float]) -> np.ndarray:
    """The RAS affine of a generated volume with ``spacing`` mm voxels at the origin (4, 4)."""
    return np.diag([*map(float, spacing), 1.0])


def sample_names(num_samples: int, modality: str | None = None) -> list[str]:
    """``sample_0001_<MOD>.nii.gz``, ... (``sample_0001.nii.gz``, ... without a modality)."""
    suffix = f"_{modality}" if modality else ""
    return [f"sample_{i + 1:04d}{suffix}.nii.gz" for i in range(num_samples)]


def case_names(cases: Sequence[str], modality: str) -> list[str]:
    """``<case>_<MOD>.nii.gz`` per case."""
    return [f"{case}_{modality}.nii.gz" for case in cases]


class VolumeSaver:
    """Names and checks the files of one ``generate`` call on construction; :meth:`write` then writes them.

    Args:
        output_dir: the folder the outputs go into; a name must stay directly inside it
            (:func:`~prod9_components.outputs.output_path`).
        names: the file name of each volume (:func:`sample_names`, :func:`case_names`).
        output_path: one exact file instead of ``output_dir`` (one volume only: ``--output``).
        modality: with ``masks``, the name the image files end with: ``<case>_<MOD>.nii.gz`` gets its mask beside it
            as ``<case>_mask.nii.gz``.
        masks: each volume comes with the mask it was steered by (:attr:`GeneratedVolume.mask`).
        inputs: every file the call reads: an output may never replace one, even with ``overwrite``.
        overwrite: replace outputs that exist (``--overwrite``).
        what: what the outputs are, for the ``--output`` error ("translations", "masks").

    Raises:
        ValueError / FileExistsError: see :func:`~prod9_components.outputs.check_outputs`; ``output_path`` with
            several names.
    """

    def __init__(self, output_dir: str | os.PathLike, names: Sequence[str], output_path: str | None = None,
                 modality: str | None = None, masks: bool = False, inputs: Sequence[str] = (),
                 overwrite: bool = False, what: str = "volumes") -> None:
        if output_path and len(names) != 1:
            raise ValueError(f"--output names one file but there are {len(names)} {what} (name a directory)")
        self.paths = [Path(output_path)] if output_path else [file_in(output_dir, name) for name in names]
        self.mask_paths = [p.with_name(p.name.split(".nii")[0].removesuffix(f"_{modality}") + "_mask.nii.gz")
                           for p in self.paths] if masks else []
        check_outputs([*self.paths, *self.mask_paths], inputs=inputs, overwrite=overwrite)

    def __len__(self) -> int:
        return len(self.paths)

    def write(self, index: int, volume: GeneratedVolume) -> list[str]:
        """Write volume ``index`` (and its mask) atomically; returns the paths written."""
        write_nifti(volume.image, self.paths[index], affine=volume.affine)
        if not self.mask_paths:
            return [str(self.paths[index])]
        write_nifti(volume.mask, self.mask_paths[index], dtype="uint8")
        return [str(self.paths[index]), str(self.mask_paths[index])]
