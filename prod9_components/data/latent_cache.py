"""MAISI stage-2 latent cache: the KL-VAE latent mean of every case, encoded once, plus the latent scale factor.

One ``.npz`` file per case under ``<cache_dir>/<key>/`` (:mod:`prod9_components.data.case_cache`); ``key`` hashes the
VAE file's bytes, the preprocessing contract and the encoder settings, so a new VAE never reuses stale latents; each
file records the fingerprint of the case's input volumes, so a changed volume is encoded again. Each file holds:

    latent     float32 (4, C, d, h, w)  latent mean (never a posterior sample), modality order T1, T1ce, T2, FLAIR
    seg        uint8   (D, H, W)        tumour mask 0..3 on the preprocessed image grid, D = d * f, ...
    affine     float64 (4, 4)           voxel -> world (RAS mm) of the preprocessed image grid
    intensity  float32 (4, 2)           the [low, high] each modality was scaled from

The diffusion model trains on ``scale_factor * latent`` with ``scale_factor = 1 / std`` of the training latents
(so the latent std is about 1, as the noise's), stored beside the files (:func:`latent_scale_factor`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform

from prod9_components.atomic import write_json
from prod9_components.data.case_cache import (build_case_cache, cache_key, cast_arrays, load_case_file,
                                              stored_fingerprint)
from prod9_components.data.modalities import MODALITIES, modality_index

LATENT_CACHE_VERSION = 1
LATENT_ARRAYS = {  # name -> (dtype, number of dimensions)
    "latent": (np.float32, 5),
    "seg": (np.uint8, 3),
    "affine": (np.float64, 2),
    "intensity": (np.float32, 2),
}


def latent_cache_key(vae_sha256: str, preprocessing: Mapping, extra: Mapping | None = None) -> str:
    """:func:`~prod9_components.data.case_cache.cache_key` of a latent cache (``vae_sha256``: the VAE export's hash)."""
    return cache_key(vae_sha256, preprocessing, extra, LATENT_CACHE_VERSION)


def _check_arrays(arrays: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Cast to the stored dtypes and check names and shapes; returns the arrays to store."""
    out = cast_arrays(arrays, LATENT_ARRAYS, source, "latent")
    if out["latent"].shape[0] != len(MODALITIES) or not np.isfinite(out["latent"]).all():
        raise ValueError(f"{source}: expected finite latents of {len(MODALITIES)} modalities, got shape "
                         f"{out['latent'].shape}")
    return out


def load_latent_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read one cache file (no pickle); a ValueError names the file when it cannot be read."""
    return load_case_file(path, _check_arrays, "latent")


def build_latent_cache(cases: Sequence[Mapping], cache_dir: str | os.PathLike, key: str,
                       encode_case: Callable[[Mapping], Mapping[str, np.ndarray]],
                       metadata: Mapping | None = None) -> list[dict]:
    """Encode every case not yet cached; returns ``[{"case": name, "latent": path_to_npz, ...}]`` (see
    :func:`~prod9_components.data.case_cache.build_case_cache`)."""
    return build_case_cache(cases, cache_dir, key, encode_case, _check_arrays, LATENT_ARRAYS, "latent",
                            LATENT_CACHE_VERSION, metadata)


def latent_scale_factor(items: Sequence[Mapping]) -> float:
    """``1 / std`` of every latent value of ``items`` (all modalities and channels), float64 sums.

    Computed once per set of cached latents and stored as ``scale_factor_<hash>.json`` beside the cache files (with
    the mean and std), so every run on the same training split reads the same factor. The hash covers each case's
    name and the input fingerprint its file was encoded from, so a corrected volume (or another dataset with the
    same case names) gets a new factor, never the old one.
    """
    if not items:
        raise ValueError("no cached latents to compute the scale factor from")
    cases = sorted(str(item["case"]) for item in items)
    inputs = sorted([str(item["case"]), stored_fingerprint(item["latent"])] for item in items)
    digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    path = Path(items[0]["latent"]).parent / f"scale_factor_{digest}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["scale_factor"])
    total = total_sq = count = 0.0
    for item in items:
        latent = load_latent_file(item["latent"])["latent"].astype(np.float64)
        total, total_sq, count = total + latent.sum(), total_sq + np.square(latent).sum(), count + latent.size
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
    if not std > 0:
        raise ValueError(f"{path.parent}: the cached latents are constant (std 0); is the VAE trained?")
    write_json({"scale_factor": 1.0 / std, "std": std, "mean": mean, "cases": cases, "inputs": inputs}, path)
    return 1.0 / std


def latent_items(items: Sequence[Mapping], modalities: Sequence[str | int]) -> list[dict]:
    """One training item per (case, modality): ``{"case", "latent": path, "modality": index}``."""
    indices = [modality_index(m) for m in modalities]
    return [{"case": item["case"], "latent": item["latent"], "modality": i} for item in items for i in indices]


def latent_grid(items: Sequence[Mapping], multiple: int) -> list[int]:
    """Per-axis largest latent grid (d, h, w) of ``items``, rounded up to ``multiple`` (the UNet's downsampling):
    the fixed size every latent is padded to for training and every sample is generated at."""
    largest = [0, 0, 0]
    for item in items:
        grid = load_latent_file(item["latent"])["latent"].shape[2:]
        largest = [max(a, int(g)) for a, g in zip(largest, grid)]
    return [-(-n // multiple) * multiple for n in largest]


def check_latent_size(items: Sequence[Mapping], latent_size: Sequence[int], source: str) -> list[int]:
    """``latent_size`` (the grid a diffusion model was trained and samples at, from its checkpoint ``source``) if
    every cached latent of ``items`` fits in it, else a one-line ValueError naming both sizes."""
    needed = latent_grid(items, 1)
    if any(n > int(s) for n, s in zip(needed, latent_size)):
        raise ValueError(f"{source}: the diffusion model was trained on latent size {list(latent_size)}, but these "
                         f"cases need {needed} (another spacing or VAE?); train stage 2 on this data first")
    return [int(s) for s in latent_size]


def pad_latent(latent: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Centre-pad ``latent`` (C, d, h, w) to ``size`` by replicating its edges (the background's latent), or raise
    when it is larger."""
    grid = latent.shape[1:]
    if any(g > s for g, s in zip(grid, size)):
        raise ValueError(f"latent grid {tuple(grid)} is larger than the training latent size {tuple(size)}")
    pad: list[int] = []
    for g, s in reversed(list(zip(grid, size))):
        pad += [(s - g) // 2, s - g - (s - g) // 2]
    return F.pad(latent[None], pad, mode="replicate")[0] if any(pad) else latent


class LoadLatentd(MapTransform):
    """Replace the cache-file path in ``data["latent"]`` by the scaled latent of ``data["modality"]``.

    Output: ``latent`` float32 (C, *latent_size) = ``scale_factor * mean`` centre-padded with its edges,
    ``label`` int64 scalar (the modality index, the diffusion model's class label).

    Args:
        scale_factor: from :func:`latent_scale_factor`.
        latent_size: the fixed (d, h, w) every latent is padded to (:func:`latent_grid`).
    """

    def __init__(self, scale_factor: float, latent_size: Sequence[int], keys: Sequence[str] | str = ("latent",)) -> None:
        super().__init__(keys)
        self.scale_factor = float(scale_factor)
        self.latent_size = [int(s) for s in latent_size]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arrays = load_latent_file(d[key])
            latent = torch.from_numpy(arrays["latent"][int(d["modality"])]) * self.scale_factor
            d[key] = pad_latent(latent, self.latent_size)
        d["label"] = torch.tensor(int(d["modality"]), dtype=torch.int64)
        return d
