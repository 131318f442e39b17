"""MAISI stage-3 training items: a cached target latent with the tumour mask and source image on its image grid.

The ControlNet reads its spatial condition at image resolution (the conditioning encoder strides it down to the
latent grid), so each item needs, beside the scaled target latent of :class:`~.latent_cache.LoadLatentd`, the mask
and - for translation - the source modality on exactly the grid the latent was encoded from. Both come from the
stage's own run of the joint preprocessing (:func:`~.transforms.preprocessing`, the call the latent cache used, so
the grids agree; :class:`LoadControlLatentd` checks that they do) and are padded by ``f`` times the latent's padding,
so latent cell ``i`` still covers image voxels ``f*i .. f*i + f - 1``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.transforms import MapTransform

from prod9_components.data.latent_cache import load_latent_file, pad_latent
from prod9_components.data.modalities import MODALITIES, modality_index, modality_name

__all__ = ["LoadControlLatentd", "control_items"]


def control_items(items: Sequence[Mapping], targets: Sequence[str | int], source_modality: str | int | None = None,
                  uses_source: bool = True) -> list[dict]:
    """One item per (case, target modality): the latent cache item (raw paths + ``"latent"``) with ``"modality"``
    and, for a ControlNet that reads a source image (``uses_source``), ``"source_modality"``; a target equal to the
    source is skipped (a source can only be translated into the other modalities)."""
    if uses_source and source_modality is None:
        raise ValueError("this condition_type reads a source image: set source_modality (e.g. T1)")
    source = modality_index(source_modality) if uses_source else None
    indices = [modality_index(m) for m in targets if source is None or modality_index(m) != source]
    if not indices:
        raise ValueError(f"no target modality is left once the source {modality_name(source)} is removed from "
                         f"{list(targets)}")
    extra = {} if source is None else {"source_modality": source}
    return [{**item, "modality": i, **extra} for item in items for i in indices]


def _image_padding(grid: Sequence[int], size: Sequence[int], factor: int) -> list[int]:
    """F.pad amounts (last axis first) that centre an image of latent grid ``grid`` in latent ``size`` the way
    :func:`~.latent_cache.pad_latent` centres the latent, in image voxels."""
    pad: list[int] = []
    for g, s in reversed(list(zip(grid, size))):
        pad += [(s - g) // 2 * factor, (s - g - (s - g) // 2) * factor]
    return pad


class LoadControlLatentd(MapTransform):
    """Turn a preprocessed case (the four modality images and ``"seg"``, MONAI dict) plus its cache file into a
    ControlNet training item, dropping the images it does not need.

    Output:
        ``latent`` float32 (C, *latent_size) and ``label`` int64 scalar, as :class:`~.latent_cache.LoadLatentd`;
        ``seg`` int64 (1, *image_size) tumour labels 0..3, zero-padded; ``source`` float32 (1, *image_size) (items
        with ``"source_modality"``) and, with ``keep_target_image``, ``image`` float32 (1, *image_size) the real
        target modality (for evaluation), both padded with ``background``. ``image_size = f * latent_size``.

    Args:
        scale_factor / latent_size: as :class:`~.latent_cache.LoadLatentd`.
        downsample_factor: image voxels per latent cell (the VAE's).
        background: the intensity padded images get (the preprocessing range's minimum).
        keep_target_image: also output the real target image.

    Raises:
        ValueError: naming the case when its preprocessed grid is not ``f`` times its cached latent grid (a cache
            built with other preprocessing).
    """

    def __init__(self, scale_factor: float, latent_size: Sequence[int], downsample_factor: int,
                 background: float = 0.0, keep_target_image: bool = False) -> None:
        super().__init__(["latent"])
        self.scale_factor = float(scale_factor)
        self.latent_size = [int(s) for s in latent_size]
        self.factor = int(downsample_factor)
        self.background = float(background)
        self.keep_target_image = bool(keep_target_image)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        target = int(d["modality"])
        latent = torch.from_numpy(load_latent_file(d["latent"])["latent"][target]) * self.scale_factor
        grid = list(latent.shape[1:])
        image_grid = list(d[MODALITIES[target]].shape[1:])
        if image_grid != [g * self.factor for g in grid]:
            raise ValueError(f"case {d.get('case')}: preprocessed grid {image_grid} is not {self.factor} x the cached "
                             f"latent grid {grid}; was the latent cache built with other preprocessing?")
        pad = _image_padding(grid, self.latent_size, self.factor)

        def image(key: str, value: float) -> torch.Tensor:
            array = d[key].as_tensor() if hasattr(d[key], "as_tensor") else torch.as_tensor(d[key])
            return F.pad(array.float()[None], pad, value=value)[0]

        out = {k: v for k, v in d.items() if k not in (*MODALITIES, "seg") and not str(k).endswith("_intensity")}
        out["latent"] = pad_latent(latent, self.latent_size)
        out["label"] = torch.tensor(target, dtype=torch.int64)
        out["seg"] = image("seg", 0.0).long()
        if "source_modality" in d:
            out["source"] = image(MODALITIES[int(d["source_modality"])], self.background)
        if self.keep_target_image:
            out["image"] = image(MODALITIES[target], self.background)
        return out
