"""MAISI stage-3 training items: a cached target latent with the tumour mask and source image on its image grid.

The ControlNet reads its spatial condition at image resolution (the conditioning encoder strides it down to the
latent grid), so each item needs, beside the scaled target latent of :class:`~.latent_cache.LoadLatentd`, the mask
and - for translation - the source modality on exactly the canvas the latent was encoded from. Both come from the
stage's own run of the joint preprocessing (:func:`~.transforms.preprocessing` with the canvas as ``spatial_size``,
the call the latent cache used, so latent cell ``i`` covers image voxels ``f*i .. f*i + f - 1``;
:class:`LoadControlLatentd` checks that the grids agree).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from monai.data import CacheDataset
from monai.transforms import MapTransform
from torch.utils.data import Dataset

from prod9_components.data.latent_cache import checked_latent_size, load_latent_file
from prod9_components.data.modalities import MODALITIES, modality_index, modality_name

__all__ = ["ControlDataset", "LoadControlLatentd", "control_items"]

# What tells the items of one case apart: the target, the source and (on a validation shard) the item's position.
PER_ITEM_KEYS = ("modality", "source_modality", "val_index")


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


class ControlDataset(Dataset):
    """The items of :func:`control_items` (one per case x target modality), each case preprocessed and cached once
    instead of once per target: the joint preprocessing loads and resamples all four modalities and the mask whichever
    target an item trains (the demo's test, 8 cases x 4 targets at 4 mm, 2 CPU cores: 33 s item by item, 12 s now).

    Args:
        data: the items (a validation shard's, ``val_index`` kept); every item has ``"case"``.
        preprocessing: maps a case (its items without :data:`PER_ITEM_KEYS`) to its preprocessed images; a MONAI
            ``Compose`` of deterministic transforms, whose output a ``CacheDataset`` caches (it caches nothing from
            the first random transform or plain callable on).
        transform: maps a preprocessed case plus an item's :data:`PER_ITEM_KEYS` to the item
            (:class:`LoadControlLatentd`), at every access.
        cache_rate, num_workers: of the cases' ``CacheDataset``.
    """

    def __init__(self, data: Sequence[Mapping], preprocessing: Callable, transform: Callable, cache_rate: float = 1.0,
                 num_workers: int = 0) -> None:
        self.data = [dict(item) for item in data]
        self.transform = transform
        cases: dict[str, dict] = {}
        for item in self.data:
            cases.setdefault(str(item["case"]), {k: v for k, v in item.items() if k not in PER_ITEM_KEYS})
        self.position = {name: index for index, name in enumerate(cases)}
        self.cases = CacheDataset(list(cases.values()), preprocessing, cache_rate=cache_rate, num_workers=num_workers)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = self.data[index]
        case = self.cases[self.position[str(item["case"])]]
        return self.transform({**case, **{k: item[k] for k in PER_ITEM_KEYS if k in item}})


class LoadControlLatentd(MapTransform):
    """Turn a preprocessed case (the four modality images and ``"seg"``, MONAI dict) plus its cache file into a
    ControlNet training item, dropping the images it does not need.

    Output:
        ``latent`` float32 (C, *latent_size) and ``label`` int64 scalar, as :class:`~.latent_cache.LoadLatentd`;
        ``seg`` int64 (1, *image_size) tumour labels 0..3; ``source`` float32 (1, *image_size) (items with
        ``"source_modality"``) and, with ``keep_target_image``, ``image`` float32 (1, *image_size) the real target
        modality (for evaluation). ``image_size = f * latent_size``.

    Args:
        scale_factor / latent_size: as :class:`~.latent_cache.LoadLatentd`.
        downsample_factor: image voxels per latent cell (the VAE's).
        keep_target_image: also output the real target image.

    Raises:
        ValueError: naming the case when its preprocessed grid is not ``f`` times its cached latent grid, or the
            latent grid is not ``latent_size`` (a cache built with other preprocessing or another canvas).
    """

    def __init__(self, scale_factor: float, latent_size: Sequence[int], downsample_factor: int,
                 keep_target_image: bool = False) -> None:
        super().__init__(["latent"])
        self.scale_factor = float(scale_factor)
        self.latent_size = [int(s) for s in latent_size]
        self.factor = int(downsample_factor)
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

        def image(key: str) -> torch.Tensor:
            return torch.as_tensor(d[key].as_tensor() if hasattr(d[key], "as_tensor") else d[key]).float()

        out = {k: v for k, v in d.items() if k not in (*MODALITIES, "seg") and not str(k).endswith("_intensity")}
        out["latent"] = checked_latent_size(latent, self.latent_size, f"case {d.get('case')}")
        out["label"] = torch.tensor(target, dtype=torch.int64)
        out["seg"] = image("seg").long()
        if "source_modality" in d:
            out["source"] = image(MODALITIES[int(d["source_modality"])])
        if self.keep_target_image:
            out["image"] = image(MODALITIES[target])
        return out
