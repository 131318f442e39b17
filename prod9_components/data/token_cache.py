"""Stage-2 token cache: FSQ token indices of every case, encoded once with a stage-1 export, plus crops on the token grid.

One ``.npz`` file per case under ``<cache_dir>/<key>/`` (:mod:`prod9_components.data.case_cache`); ``key`` hashes the
export file's bytes, the preprocessing contract and the cache format version, so a new autoencoder (or other
preprocessing) never reuses stale tokens, and each file records the fingerprint of the case's input volumes, so a
changed volume is encoded again. Each file holds:

    tokens      int16   (4, d, h, w)  token indices, modality order T1, T1ce, T2, FLAIR (index < 32768)
    seg         uint8   (D, H, W)     tumour mask 0..3 on the same preprocessed grid, D = d * f, ...
    seg_tokens  uint8   (d, h, w)     the mask at token resolution, see ``seg_to_token_grid``
    affine      float64 (4, 4)        voxel -> world (RAS mm) of the preprocessed image grid
    intensity   float32 (4, 2)        the [low, high] each modality was scaled from

This module imports no network code: ``build_token_cache`` receives the function that encodes a case
(``prod9_components.engines.tokenizer.CaseTokenizer``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from prod9_components.data.case_cache import build_case_cache, cache_key, cast_arrays, load_case_file

TOKEN_CACHE_VERSION = 1
CACHE_ARRAYS = {  # name -> (dtype, number of dimensions)
    "tokens": (np.int16, 4),
    "seg": (np.uint8, 3),
    "seg_tokens": (np.uint8, 3),
    "affine": (np.float64, 2),
    "intensity": (np.float32, 2),
}
# Token-grid label of a block holding several labels: the most severe one, enhancing 3 > necrotic 1 > oedema 2 > 0.
LABEL_PRIORITY = (3, 1, 2, 0)


def token_cache_key(autoencoder_sha256: str, preprocessing: Mapping, extra: Mapping | None = None) -> str:
    """:func:`~prod9_components.data.case_cache.cache_key` of a token cache (``autoencoder_sha256``: the export's
    hash)."""
    return cache_key(autoencoder_sha256, preprocessing, extra, TOKEN_CACHE_VERSION)


def seg_to_token_grid(seg: np.ndarray | torch.Tensor, factor: int) -> np.ndarray:
    """The tumour mask (D, H, W) at token resolution (ceil(D / f), ceil(H / f), ceil(W / f)), uint8.

    Each token cell takes the most severe label present in its ``f``^3 block: enhancing 3 > necrotic core 1 >
    oedema 2 > background 0 (so a small enhancing rim is never averaged away). Sizes that are not multiples of
    ``f`` are padded with background at the end, as the tiled encoder pads the image.
    """
    seg = seg.detach().cpu().numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
    if seg.ndim != 3:
        raise ValueError(f"seg must be (D, H, W), got shape {seg.shape}")
    f = int(factor)
    rank_of = np.zeros(256, np.uint8)  # label -> severity rank (higher wins)
    for rank, label in enumerate(reversed(LABEL_PRIORITY)):
        rank_of[label] = rank
    rank = rank_of[seg.astype(np.uint8)]
    rank = np.pad(rank, [(0, -s % f) for s in rank.shape])
    d, h, w = (s // f for s in rank.shape)
    block_max = rank.reshape(d, f, h, f, w, f).max(axis=(1, 3, 5))
    return np.asarray(list(reversed(LABEL_PRIORITY)), np.uint8)[block_max]


def most_frequent_token(tokens: np.ndarray | torch.Tensor) -> int:
    """The most frequent index in ``tokens`` (any shape); for the background of a volume, pass its background."""
    values = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
    return int(torch.bincount(values.reshape(-1).to(torch.int64).cpu()).argmax())


# --- the cache ---------------------------------------------------------------------------------------------------


def _check_arrays(arrays: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Cast to the stored dtypes and check names and shapes; returns the arrays to store."""
    out = cast_arrays(arrays, {**CACHE_ARRAYS, "tokens": (np.int64, 4)}, source, "token")  # range check first
    tokens = out["tokens"]
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int16).max):
        raise ValueError(f"{source}: token indices {tokens.min()}..{tokens.max()} do not fit int16")
    out["tokens"] = tokens.astype(np.int16)
    if out["tokens"].shape[0] != 4 or out["intensity"].shape != (4, 2):
        raise ValueError(f"{source}: expected 4 modalities, got tokens {out['tokens'].shape}, "
                         f"intensity {out['intensity'].shape}")
    if out["seg_tokens"].shape != out["tokens"].shape[1:]:
        raise ValueError(f"{source}: seg_tokens {out['seg_tokens'].shape} and tokens {out['tokens'].shape} differ")
    return out


def load_token_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read one cache file (no pickle).

    Raises:
        ValueError: ``"{path}: cannot read token cache file (...)"`` for a truncated or foreign file.
    """
    return load_case_file(path, _check_arrays, "token")


def build_token_cache(
    cases: Sequence[Mapping],
    cache_dir: str | os.PathLike,
    key: str,
    encode_case: Callable[[Mapping], Mapping[str, np.ndarray]],
    metadata: Mapping | None = None,
) -> list[dict]:
    """Encode every case not yet cached under ``<cache_dir>/<key>/`` and list the cache items
    (:func:`~prod9_components.data.case_cache.build_case_cache`).

    Args:
        cases: case dicts ``{"case": name, "t1": path, ...}`` (see ``data.brats``).
        cache_dir: root of all token caches.
        key: from :func:`token_cache_key`.
        encode_case: ``case -> {"tokens", "seg", "seg_tokens", "affine", "intensity"}`` arrays (module docstring).
        metadata: JSON-able description of what the tokens come from, stored in ``cache.json``.

    Returns:
        ``[{"case": name, "tokens": path_to_npz, **the case's other keys}]`` in the order of ``cases``.
    """
    return build_case_cache(cases, cache_dir, key, encode_case, _check_arrays, CACHE_ARRAYS, "tokens",
                            TOKEN_CACHE_VERSION, metadata)


def largest_token_grid(items: Sequence[Mapping], max_grid_size: Sequence[int] | None = None) -> list[int]:
    """Per-axis largest token grid (d, h, w) of cached cases: the whole-volume grid label-mode samples use.

    Raises:
        ValueError: naming the case whose grid exceeds ``max_grid_size`` (the transformer's position tables), so
            a too-small model fails before training instead of at its first whole-volume validation.
    """
    largest = [0, 0, 0]
    for item in items:
        grid = load_token_file(item["tokens"])["tokens"].shape[1:]
        if max_grid_size is not None and any(g > m for g, m in zip(grid, max_grid_size)):
            raise ValueError(f"{item['tokens']}: token grid {tuple(grid)} exceeds the transformer's max_grid_size "
                             f"{tuple(max_grid_size)}; raise network_def#max_grid_size")
        largest = [max(a, int(g)) for a, g in zip(largest, grid)]
    return largest


class LoadTokensd(MapTransform):
    """Replace the cache-file path in ``data[key]`` by its arrays, as tensors.

    For ``key == "tokens"``: ``tokens`` int64 (4, d, h, w), ``seg`` uint8 (1, D, H, W), ``seg_tokens`` int64
    (d, h, w), ``affine`` float64 (4, 4), ``intensity`` float32 (4, 2). For any other key the extra arrays are
    named ``f"{key}_seg"`` etc.

    Raises:
        ValueError: naming the file when it cannot be read (e.g. truncated).
    """

    def __init__(self, keys: Sequence[str] | str = ("tokens",), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arrays = load_token_file(d[key])
            prefix = "" if key == "tokens" else f"{key}_"
            d[key] = torch.from_numpy(arrays["tokens"].astype(np.int64))
            d[f"{prefix}seg"] = torch.from_numpy(arrays["seg"])[None]
            d[f"{prefix}seg_tokens"] = torch.from_numpy(arrays["seg_tokens"].astype(np.int64))
            d[f"{prefix}affine"] = torch.from_numpy(arrays["affine"])
            d[f"{prefix}intensity"] = torch.from_numpy(arrays["intensity"])
        return d


# --- pad / crop on the token grid ------------------------------------------------------------------------------


def _shift_window(array, size: Sequence[int], offsets: Sequence[int], fill):
    """Output of spatial ``size`` (the last ``len(size)`` axes) with ``out[i] = array[i - offset]``, ``fill`` outside."""
    size, offsets = [int(s) for s in size], [int(o) for o in offsets]
    lead = tuple(array.shape[: array.ndim - len(size)])
    if isinstance(array, torch.Tensor):
        out = torch.full(lead + tuple(size), fill, dtype=array.dtype, device=array.device)
    else:
        out = np.full(lead + tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for n_in, n_out, o in zip(array.shape[len(lead):], size, offsets):
        lo, hi = max(0, o), min(n_out, n_in + o)
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo - o, hi - o))
    out[(..., *dst)] = array[(..., *src)]
    return out


def pad_or_crop(array, size: Sequence[int], pad_value) -> tuple[object, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Centre-pad or centre-crop the last ``len(size)`` axes of ``array`` (numpy or torch) to ``size``.

    Returns ``(array, info)`` with ``info = (offsets, original_size)``: ``out[i] = array[i - offset]`` per axis
    (offset > 0 padded, < 0 cropped). :func:`restore` undoes it; for an image decoded from the tokens scale
    ``info`` by the downsample factor with :func:`scale_crop_info`.
    """
    original = tuple(int(s) for s in array.shape[array.ndim - len(size):])
    offsets = tuple((int(s) - n) // 2 for s, n in zip(size, original))
    return _shift_window(array, size, offsets, pad_value), (offsets, original)


def restore(array, info: tuple[Sequence[int], Sequence[int]], fill):
    """Inverse of :func:`pad_or_crop`: back to the original size, ``fill`` where the crop had cut."""
    offsets, original = info
    return _shift_window(array, original, [-o for o in offsets], fill)


def scale_crop_info(info: tuple[Sequence[int], Sequence[int]], factor: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``info`` of a token-grid pad/crop expressed on the image grid (``factor`` voxels per token)."""
    offsets, original = info
    return tuple(int(o) * factor for o in offsets), tuple(int(n) * factor for n in original)


class _TokenCropd(MapTransform):
    """Crop ``tokens`` (C, d, h, w), ``seg_tokens`` (d, h, w) and ``seg`` (1, f*d, f*h, f*w) with one window.

    Adds ``grid_origin``: int64 (3,), the case-grid index of the window's first cell (negative where the window is
    padded), which the transformer adds to its positions so a crop keeps its place in the whole grid.
    """

    def __init__(self, roi_tokens: Sequence[int], downsample_factor: int, pad_token: int = 0,
                 tokens_key: str = "tokens", seg_tokens_key: str = "seg_tokens", seg_key: str = "seg") -> None:
        super().__init__([tokens_key, seg_tokens_key, seg_key], allow_missing_keys=True)
        self.roi_tokens = tuple(int(r) for r in roi_tokens)
        if len(self.roi_tokens) != 3 or min(self.roi_tokens) < 1:
            raise ValueError(f"roi_tokens must be three positive ints, got {roi_tokens!r}")
        self.factor = int(downsample_factor)
        self.pad_token = int(pad_token)
        self.tokens_key, self.seg_tokens_key, self.seg_key = tokens_key, seg_tokens_key, seg_key

    def offsets(self, grid: Sequence[int]) -> list[int]:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        grid = tuple(d[self.tokens_key].shape[-3:])
        offsets = self.offsets(grid)
        d[self.tokens_key] = _shift_window(d[self.tokens_key], self.roi_tokens, offsets, self.pad_token)
        d["grid_origin"] = torch.tensor([-o for o in offsets], dtype=torch.int64)
        if self.seg_tokens_key in d:
            d[self.seg_tokens_key] = _shift_window(d[self.seg_tokens_key], self.roi_tokens, offsets, 0)
        if self.seg_key in d:
            seg = d[self.seg_key]
            if tuple(seg.shape[-3:]) != tuple(n * self.factor for n in grid):
                raise ValueError(f"seg {tuple(seg.shape)} is not the token grid {grid} times {self.factor}")
            f = self.factor
            d[self.seg_key] = _shift_window(seg, [r * f for r in self.roi_tokens], [o * f for o in offsets], 0)
        return d


class RandTokenCropd(Randomizable, _TokenCropd):
    """One random ``roi_tokens`` window of the token grid, the same for tokens, seg_tokens and seg.

    Axes shorter than the window are centre-padded (tokens with ``pad_token`` - pass the background's most
    frequent token, :func:`most_frequent_token` - masks with 0); longer axes get a uniform random start.
    ``seg`` at image resolution gets the window scaled by ``downsample_factor``.

    Args:
        roi_tokens: window size on the token grid (d, h, w).
        downsample_factor: image voxels per token along each axis.
        pad_token: token index used to pad tokens.
        tokens_key, seg_tokens_key, seg_key: data keys (seg_tokens and seg may be absent).
    """

    def randomize(self, grid: Sequence[int]) -> None:
        self._offsets = [(r - n) // 2 if n <= r else -int(self.R.randint(0, n - r + 1))
                         for n, r in zip(grid, self.roi_tokens)]

    def offsets(self, grid: Sequence[int]) -> list[int]:
        self.randomize(grid)
        return self._offsets


class CenterTokenCropd(_TokenCropd):
    """The centred ``roi_tokens`` window (padded where the grid is smaller): deterministic :class:`RandTokenCropd`.

    Same as :func:`pad_or_crop` on each array.
    """

    def offsets(self, grid: Sequence[int]) -> list[int]:
        return [(r - n) // 2 for n, r in zip(grid, self.roi_tokens)]
