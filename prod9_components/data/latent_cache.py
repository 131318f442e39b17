"""MAISI stage-2 latent cache: the KL-VAE latent mean of every case, encoded once, plus the latent scale factor.

One ``.npz`` file per case under ``<cache_dir>/<key>/`` (:mod:`prod9_components.data.case_cache`); ``key`` hashes the
VAE file's bytes, the preprocessing contract and the encoder settings, so a new VAE never reuses stale latents; each
file records the fingerprint of the case's input volumes, so a changed volume is encoded again. The diffusion model
needs one latent size: every case is centre-padded with background to one image canvas before it is encoded
(:func:`latent_canvas` finds the canvas the cases fit in). Each file holds:

    latent     float32 (4, C, d, h, w)  latent mean (never a posterior sample), modality order T1, T1ce, T2, FLAIR
    seg        uint8   (D, H, W)        tumour mask 0..3 on the (padded) image grid, D = d * f, ...
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
GRID_ARRAYS = {"grid": (np.int64, 1)}  # a case's preprocessed grid (D, H, W), for latent_canvas


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


def _check_grid(arrays: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    out = cast_arrays(arrays, GRID_ARRAYS, source, "grid")
    if out["grid"].shape != (3,) or (out["grid"] < 1).any():
        raise ValueError(f"{source}: expected a grid of three positive sizes, got {out['grid'].tolist()}")
    return out


def latent_canvas(cases: Sequence[Mapping], cache_dir: str | os.PathLike, vae_sha256: str, spacing: Sequence[float],
                  intensity_range: Sequence[float], downsample_factor: int, multiple: int) -> list[int]:
    """The latent size (d, h, w) every case of ``cases`` fits in: the largest preprocessed grid over
    ``downsample_factor``, rounded up to ``multiple`` (the UNet's downsampling). The cases are then encoded on this
    canvas (:class:`~prod9_components.engines.case_encoder.CaseLatentEncoder` ``latent_size``).

    A grid is T1's foreground crop under the encoder's preprocessing (the crop every modality shares), so this reads
    one volume per case; each case's grid is cached like its latents (a small file under ``<cache_dir>/<key>``, key
    from the VAE file and the preprocessing), so a rerun loads nothing.
    """
    from monai.transforms import Compose

    from prod9_components.data.transforms import preprocessing, preprocessing_contract

    f, t1 = int(downsample_factor), MODALITIES[0]
    contract = preprocessing_contract(spacing, intensity_range)
    key = latent_cache_key(vae_sha256, contract, {"grid_of": t1, "k_divisible": f})
    pipeline = Compose(preprocessing(image_keys=[t1], spacing=spacing, intensity_range=tuple(intensity_range),
                                     k_divisible=f))

    def grid(case: Mapping) -> dict[str, np.ndarray]:
        return {"grid": np.asarray(pipeline({t1: case[t1]})[t1].shape[1:])}

    items = build_case_cache(cases, cache_dir, key, grid, _check_grid, list(GRID_ARRAYS), "grid", LATENT_CACHE_VERSION,
                             metadata={"grids_of": "preprocessed cases", "preprocessing": contract})
    largest = np.max([load_case_file(item["grid"], _check_grid, "grid")["grid"] for item in items], axis=0)
    return [-(-int(n) // (f * multiple)) * multiple for n in largest]


def checked_latent_size(latent: torch.Tensor, size: Sequence[int], source: object) -> torch.Tensor:
    """``latent`` (C, d, h, w) when its grid is ``size``, else a ValueError naming ``source``."""
    if list(latent.shape[1:]) != list(size):
        raise ValueError(f"{source}: cached latent grid {list(latent.shape[1:])} is not the canvas {list(size)}; "
                         "was the latent cache built for another latent size?")
    return latent


class LoadLatentd(MapTransform):
    """Replace the cache-file path in ``data["latent"]`` by the scaled latent of ``data["modality"]``.

    Output: ``latent`` float32 (C, *latent_size) = ``scale_factor * mean``, ``label`` int64 scalar (the modality
    index, the diffusion model's class label).

    Args:
        scale_factor: from :func:`latent_scale_factor`.
        latent_size: the canvas (d, h, w) the cache was encoded on (:func:`latent_canvas`); another size raises.
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
            d[key] = checked_latent_size(latent, self.latent_size, d[key])
        d["label"] = torch.tensor(int(d["modality"]), dtype=torch.int64)
        return d
