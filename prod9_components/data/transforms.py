"""Preprocessing shared by training, evaluation and inference (MONAI dictionary transforms).

One flat list of transforms: load -> RAS -> anti-alias -> resample (one step, :class:`LoadResampled`, whose results a
process remembers) -> robust intensity scaling -> label mapping -> foreground crop -> pad to a multiple of the
network's downsampling. Every spatial step is invertible, so ``monai.transforms.Invertd`` maps an output back to the
input's grid.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader
from scipy.ndimage import gaussian_filter
from monai.transforms import (
    CropForegroundd,
    DivisiblePadd,
    EnsureTyped,
    InvertibleTransform,
    LoadImage,
    MapTransform,
    Orientationd,
    ResampleToMatch,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    Spacingd,
    SpatialPadd,
)

from prod9_components.data.modalities import map_brats_labels
from prod9_components.data.nifti import check_volume_size, read_header
from prod9_components.data.volume_memo import RESAMPLED, Resampled
from prod9_components.limits import MAX_VOXELS, check_voxels, voxel_count


def _source_name(image, fallback: str) -> str:
    """The file an image came from (MetaTensor meta), for error messages."""
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj", fallback))


class NativeNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` for real-world files: a trailing axis of size 1 is dropped (MONAI's
    ``squeeze_non_spatial_dims``) and the data is returned in native byte order (torch refuses big-endian arrays:
    "given numpy array has byte order different from the native byte order").

    Call :func:`~prod9_components.data.nifti.read_header` first: this reader would turn a (X, Y, Z, 3) file into
    three channels.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(squeeze_non_spatial_dims=True, **kwargs)

    def _get_array_data(self, img, filename):
        data = super()._get_array_data(img, filename)
        if not data.dtype.isnative:  # a copy only for the files that need it
            data = data.astype(data.dtype.newbyteorder("="))
        return data


class LoadVolumed(MapTransform):
    """Load 3D NIfTI volumes as channel-first MetaTensors (1, X, Y, Z) with their affine.

    Images become float32; keys in ``label_keys`` keep the file's integer values. The header is read and checked
    first (:mod:`prod9_components.data.nifti`): a trailing axis of size 1 is a 3D volume, and with ``spacing`` the
    grid after resampling to it must stay within ``max_voxels``, so a header claiming billions of voxels fails
    before any allocation. Big-endian, scaled-integer and float64 files load like any other.

    Reader: MONAI's NibabelReader for ``.nii`` and ``.nii.gz``. Not ITK (why, measured with MONAI 1.6.1 /
    itk 5.4 on this machine): ITK silently replaces NaN/Inf voxels with 0, reads a truncated ``.nii.gz``
    without any error, costs ~4 s to import, and was no faster (full 240x240x155 int16: 0.08 s both).

    Args:
        keys / label_keys: volumes to load; which of them are label maps.
        spacing: the run's voxel size (mm) the volumes will be resampled to; None skips that size check.
        max_voxels: the largest grid accepted, on the file and after resampling
            (:data:`~prod9_components.limits.MAX_VOXELS`).

    Raises:
        ValueError: ``"{path}: cannot read (...)"``, ``"{path}: expected a 3D volume, got shape ..."``,
            ``"{path}: ... voxels; the limit is ..."`` or ``"{path}: N NaN/Inf voxels"``.
    """

    def __init__(self, keys, label_keys: Sequence[str] = (), allow_missing_keys: bool = False,
                 spacing: Sequence[float] | None = None, max_voxels: int = MAX_VOXELS) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = tuple(label_keys)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.max_voxels = int(max_voxels)
        self._loader = LoadImage(reader=NativeNibabelReader(), image_only=True, ensure_channel_first=True, dtype=None)

    def load(self, path: str, is_label: bool) -> MetaTensor:
        path = str(path)
        check_volume_size(read_header(path), self.spacing, self.max_voxels)  # header only: before any allocation
        try:
            volume = self._loader(path)
        except Exception as error:  # nibabel raises OSError, EOFError, zlib.error, ValueError, ...
            reason = " ".join(str(error).split()) or type(error).__name__
            # from None: the CLI reports an error's innermost cause, and only this one names the file
            raise ValueError(f"{path}: cannot read ({reason})") from None
        if volume.is_floating_point():
            non_finite = int((~torch.isfinite(volume)).sum())
            if non_finite:
                raise ValueError(f"{path}: {non_finite} NaN/Inf voxels")
        if not is_label:
            volume = volume.float()
        return volume

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.load(d[key], key in self.label_keys)
        return d


def file_grid(volume: MetaTensor) -> tuple[tuple[int, ...], np.ndarray]:
    """A (C, X, Y, Z) volume's grid: (spatial shape, float64 affine)."""
    return tuple(int(n) for n in volume.shape[1:]), np.asarray(volume.affine, np.float64)


def same_grid(a: tuple[tuple[int, ...], np.ndarray], b: tuple[tuple[int, ...], np.ndarray]) -> bool:
    """Whether two :func:`file_grid` s are one: the same shape, affines within 1e-3."""
    return a[0] == b[0] and np.allclose(a[1], b[1], atol=1e-3)


class MatchLabelGridd(MapTransform):
    """Resample label volumes (nearest neighbour) onto the grid of ``reference_key`` when their shape or affine
    differs from it (e.g. a user's mask saved on another grid than the image it goes with); a no-op otherwise.
    Logs one line per resampled file, so the change is never silent."""

    def __init__(self, keys, reference_key: str, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self._resample = ResampleToMatch(mode="nearest")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        reference = d[self.reference_key]
        for key in self.key_iterator(d):
            label = d[key]
            if same_grid(file_grid(label), file_grid(reference)):
                continue
            logging.getLogger("prod9").warning(
                f"{_source_name(label, str(key))}: grid {tuple(label.shape[1:])} differs from "
                f"{_source_name(reference, self.reference_key)} {tuple(reference.shape[1:])}; resampled onto it")
            d[key] = self._resample(label, reference).round().to(label.dtype)
        return d


class AboveThreshold:
    """Picklable foreground selector for CropForegroundd: ``x > threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x):
        return x > self.threshold


class RobustIntensityScaled(MapTransform):
    """Map each volume's [low, high] percentiles to ``output_range``, clipping outside.

    low/high are the ``lower``/``upper`` percentiles of the foreground (voxels above the volume's minimum;
    all voxels if there are none). Stores ``data[f"{key}_intensity"] = tensor([low, high])`` so
    ``restore_intensity`` can undo the mapping.

    Raises:
        ValueError: naming the file when the volume is constant (high == low).
    """

    def __init__(
        self,
        keys,
        lower: float = 0.5,
        upper: float = 99.5,
        output_range: tuple[float, float] = (0.0, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lower, self.upper = float(lower), float(upper)
        self.output_range = (float(output_range[0]), float(output_range[1]))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            array = values.detach().cpu().numpy()
            foreground = array[array > array.min()]
            if foreground.size == 0:
                foreground = array.ravel()
            # numpy's percentile: torch.quantile refuses inputs above 16M elements.
            low, high = (float(v) for v in np.percentile(foreground, (self.lower, self.upper)))
            if not high > low:
                raise ValueError(
                    f"{_source_name(image, str(key))}: constant intensity ({low}) in the foreground; cannot scale"
                )
            a, b = self.output_range
            scaled = ((values.float() - low) / (high - low)).clamp(0.0, 1.0) * (b - a) + a
            if isinstance(image, MetaTensor):
                scaled = MetaTensor(scaled, meta=image.meta, applied_operations=image.applied_operations)
            d[key] = scaled
            d[f"{key}_intensity"] = torch.tensor([low, high], dtype=torch.float32)
        return d


def restore_intensity(
    image: torch.Tensor, low, high, output_range: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """Inverse of RobustIntensityScaled (exact inside the clipped range): output_range -> [low, high]."""
    a, b = (float(v) for v in output_range)
    low = torch.as_tensor(low, dtype=image.dtype, device=image.device)
    high = torch.as_tensor(high, dtype=image.dtype, device=image.device)
    return (image - a) / (b - a) * (high - low) + low


class MapBraTSLabelsd(MapTransform):
    """Map BraTS tumour labels to {0, 1, 2, 3} (enhancing 4 -> 3); see ``map_brats_labels``."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = map_brats_labels(d[key])
            except ValueError as error:
                # from None: the CLI reports an error's innermost cause, and this one names the file
                raise ValueError(f"{_source_name(d[key], str(key))}: {error}") from None
        return d


class AntiAliasd(MapTransform):
    """Gaussian low-pass of images about to be resampled to coarser voxels, so the coarse grid keeps the local mean
    instead of aliased samples of every ``k``-th voxel (MONAI's ``Spacingd`` interpolates without smoothing).

    Per axis ``sigma = (target / source - 1) / 2`` voxels of the source grid (the usual anti-aliasing choice, e.g.
    scikit-image's ``rescale``): 1 mm -> 4 mm gives sigma 1.5; an axis that is not downsampled is left alone, so
    preprocessing at the source resolution is unchanged. Images only: labels are resampled nearest-neighbour.

    Input and output: (C, X, Y, Z) MetaTensors (the source spacing is read from their affine).
    """

    def __init__(self, keys, spacing: Sequence[float], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spacing = tuple(float(s) for s in spacing)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = [float(s) for s in d[key].pixdim[:3]]
            if not all(np.isfinite(s) and s > 0 for s in source):
                raise ValueError(f"{_source_name(d[key], key)}: voxel size {tuple(source)} mm; expected positive "
                                 "finite voxel sizes in the NIfTI header")
            # Capped at the axis length: a wider kernel changes nothing more (edges repeat), and a header claiming
            # micrometre voxels would otherwise ask for a kernel of millions of taps.
            sigma = [min(max(0.0, (t / s - 1.0) / 2.0), float(n))
                     for t, s, n in zip(self.spacing, source, d[key].shape[1:])]
            if any(sg > 0 for sg in sigma):
                image = d[key]
                smooth = np.zeros(image.shape, np.float32)  # written in place: no copy of a 1 mm volume
                for source_channel, channel in zip(image.numpy(), smooth):
                    low_pass(source_channel, sigma, channel)
                d[key] = MetaTensor(torch.from_numpy(smooth), meta=image.meta,
                                    applied_operations=image.applied_operations)
        return d


def low_pass(volume: np.ndarray, sigma: Sequence[float], out: np.ndarray, truncate: float = 3.0) -> None:
    """scipy's separable Gaussian (``mode="nearest"``; ~30x faster than MONAI's GaussianSmooth) of a 3D ``volume``
    into ``out``, which must hold zeros: only the box around the non-zero voxels, grown by the kernel's radius, is
    filtered. Why: a skull-stripped volume's background is zero, about two thirds of a BraTS volume, and a Gaussian
    leaves it zero; the result is the whole volume's to the bit, since every line the filter reads past the box's
    edge holds zeros there in either case ("nearest" repeats the zero at the edge)."""
    nonzero = volume != 0
    box = []
    for axis, s in enumerate(sigma):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(volume.ndim) if a != axis)))
        if hit.size == 0:
            return  # all zero: so is its low-pass
        radius = int(truncate * float(s) + 0.5) if s > 0 else 0  # scipy's own kernel radius
        box.append(slice(max(int(hit[0]) - radius, 0), min(int(hit[-1]) + radius + 1, volume.shape[axis])))
    box = tuple(box)
    gaussian_filter(volume[box], sigma, output=out[box], mode="nearest", truncate=truncate)


def _spacing_input(volume: MetaTensor) -> tuple[tuple[int, ...], np.ndarray]:
    """What ``Spacingd``'s ``ensure_same_shape`` compares between an item's volumes: (spatial shape, voxel size)."""
    return tuple(int(n) for n in volume.peek_pending_shape()), np.asarray(volume.pixdim, np.float64)


def _same_spacing_input(a, b) -> bool:
    """``Spacingd``'s test (MONAI 1.6.1) for giving volume ``b`` the output shape of the item's first volume ``a``."""
    return np.allclose(a[0], b[0]) and np.allclose(a[1], b[1], atol=1e-3)


class LoadResampled(MapTransform, InvertibleTransform):
    """The costly first part of :func:`preprocessing` as one step: :class:`LoadVolumed` -> labels onto the first
    image's grid (:class:`MatchLabelGridd`) -> RAS (``Orientationd``) -> :class:`AntiAliasd` -> ``spacing`` mm
    (``Spacingd``, bilinear for images, nearest for labels).

    Each volume's result is remembered in the process (:data:`~prod9_components.data.volume_memo.RESAMPLED`). An
    item whose every file was resampled before with the same settings is copied from there, provided the couplings
    between its volumes give what they gave then: ``Spacingd`` gives a volume with the first volume's input shape and
    voxel size the first one's output shape, and ``MatchLabelGridd`` moves a label whose file grid is not the first
    image's (what it made of such a label is never remembered, nor a file rewritten while it was read). An item with
    only some volumes remembered resamples the others each on its own first (as an item of one; e.g. the mask a
    stage-2 cache reads beside the images stage 1 read), so they are not read twice when the couplings hold. Anything
    else takes the ordinary path. Invertible like the transforms it runs (``Invertd`` with a ``Compose`` of
    :func:`preprocessing`, whichever path an item took).

    Input: ``{key: path}``; output: ``{key: (1, X, Y, Z) MetaTensor}`` on the RAS ``spacing`` mm grid, images
    float32, labels with their file's values.
    """

    def __init__(self, image_keys: Sequence[str], label_keys: Sequence[str] = (),
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), max_voxels: int = MAX_VOXELS) -> None:
        image_keys, label_keys = list(image_keys), list(label_keys)
        keys = image_keys + label_keys
        super().__init__(keys)
        self.label_keys = frozenset(label_keys)
        self.load = LoadVolumed(keys, label_keys=label_keys, spacing=spacing, max_voxels=max_voxels)
        self.match = MatchLabelGridd(label_keys, image_keys[0]) if image_keys and label_keys else None
        self.orient = Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
        self.anti_alias = AntiAliasd(image_keys, spacing) if image_keys else None  # None: a mask alone
        self.resample = Spacingd(keys, pixdim=tuple(spacing),
                                 mode=["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys))
        self._settings = (tuple(float(s) for s in spacing), int(max_voxels))
        self._alone: dict[Hashable, LoadResampled] = {}

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        memo_keys = [RESAMPLED.key(d[k], (*self._settings, k in self.label_keys)) for k in keys]
        found = [RESAMPLED.get(m) for m in memo_keys]
        if len(keys) > 1 and None in found and any(entry is not None for entry in found):
            for key, memo_key, entry in zip(keys, memo_keys, found):
                if entry is None and memo_key is not None:
                    self.alone(key)({key: d[key]})  # remembers it (what _recall then checks against the others)
            found = [RESAMPLED.get(m) for m in memo_keys]
        recalled = self._recall(keys, found)
        if recalled is not None:
            d.update(recalled)
            return d
        d = self.load(d)
        grids = [file_grid(d[k]) for k in keys]
        if self.match is not None:
            d = self.match(d)
        d = self.orient(d)
        if self.anti_alias is not None:
            d = self.anti_alias(d)
        inputs = [_spacing_input(d[k]) for k in keys]
        d = self.resample(d)
        for i, (key, memo_key) in enumerate(zip(keys, memo_keys)):
            if key in self.label_keys and not same_grid(grids[i], grids[0]):
                continue  # moved onto the image's grid: its result depends on that image
            if memo_key is None or RESAMPLED.key(data[key], memo_key[-1]) != memo_key:
                continue  # rewritten while it was read: what was read is not known by either hash
            forced = i > 0 and _same_spacing_input(inputs[0], inputs[i])
            RESAMPLED.put(memo_key, Resampled.of(d[key], grids[i], inputs[i], forced))
        return d

    def alone(self, key: Hashable) -> LoadResampled:
        """This step for an item of ``key`` only."""
        if key not in self._alone:
            label = key in self.label_keys
            self._alone[key] = LoadResampled([] if label else [key], [key] if label else [], *self._settings)
        return self._alone[key]

    def _recall(self, keys: list, found: list[Resampled | None]) -> dict | None:
        """``{key: copy}`` when every volume is remembered and the item's couplings give the remembered results."""
        if not keys or any(entry is None for entry in found) or found[0].shape_forced:
            return None
        first = found[0]
        for key, entry in zip(keys[1:], found[1:]):
            if key in self.label_keys and not same_grid(entry.file_grid, first.file_grid):
                return None  # MatchLabelGridd would move it now
            if _same_spacing_input(first.resampled_from, entry.resampled_from):  # Spacingd gives it first's shape
                if entry.volume.shape[1:] != first.volume.shape[1:]:
                    return None
            elif entry.shape_forced:  # it was given another volume's shape then, and keeps its own now
                return None
        return {key: entry.copy() for key, entry in zip(keys, found)}

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):  # Invertd inverts one key at a time (allowing the others to be missing)
            d[key] = self.orient.ornt_transform.inverse(self.resample.spacing_transform.inverse(d[key]))
        return d


def preprocessing(
    image_keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    intensity_range: tuple[float, float] = (0.0, 1.0),
    k_divisible: int | Sequence[int] = 8,
    margin: int = 2,
    spatial_size: Sequence[int] | None = None,
) -> list:
    """The deterministic preprocessing, as a FLAT list (CacheDataset caches nothing behind a nested Compose).

    Output: images float32 (1, X, Y, Z) in ``intensity_range``, labels (1, X, Y, Z) in {0, 1, 2, 3} (first
    resampled onto the first image's grid if theirs differs), on a RAS grid of ``spacing`` mm (images low-passed
    first where that is coarser than the file: :class:`AntiAliasd`), cropped to the first image's foreground
    (+``margin`` voxels) and padded to a multiple of ``k_divisible`` (images with the range minimum, labels with 0),
    then, with ``spatial_size``, centre-padded to that grid (a fixed canvas; a larger volume keeps its size, for the
    caller to refuse).
    """
    image_keys, label_keys = list(image_keys), list(label_keys)
    if not image_keys:
        raise ValueError("preprocessing needs at least one image key")
    keys = image_keys + label_keys
    background = float(intensity_range[0])
    transforms = [
        LoadResampled(image_keys, label_keys, spacing),
        RobustIntensityScaled(image_keys, output_range=tuple(intensity_range)),
    ]
    if label_keys:
        transforms.append(MapBraTSLabelsd(label_keys))
    transforms += [
        CropForegroundd(
            keys, source_key=image_keys[0], select_fn=AboveThreshold(background), margin=margin, allow_smaller=True
        ),
        DivisiblePadd(image_keys, k=k_divisible, value=background),
    ]
    if label_keys:
        transforms.append(DivisiblePadd(label_keys, k=k_divisible))
    if spatial_size is not None:
        size = tuple(int(s) for s in spatial_size)
        transforms.append(SpatialPadd(image_keys, spatial_size=size, value=background))
        if label_keys:
            transforms.append(SpatialPadd(label_keys, spatial_size=size))
    transforms.append(EnsureTyped(image_keys, dtype=torch.float32))
    return transforms


def mask_preprocessing(spacing: Sequence[float], image_grid: Sequence[int], key: str = "seg") -> list:
    """A tumour mask on its own onto a model's image grid: load (3D, integer labels), RAS, ``spacing`` mm with
    nearest-neighbour resampling, BraTS labels -> {0, 1, 2, 3} (other values raise, naming the file), then centre
    pad/crop to ``image_grid`` (the training volume: BraTS volumes centre the brain, so the tumour keeps its place).
    Output ``key``: (1, *image_grid) MetaTensor whose affine is the output grid's."""
    return [
        LoadVolumed([key], label_keys=[key], spacing=spacing),
        Orientationd([key], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd([key], pixdim=tuple(spacing), mode="nearest"),
        MapBraTSLabelsd([key]),
        ResizeWithPadOrCropd([key], spatial_size=tuple(int(s) for s in image_grid)),
    ]


def training_crop(
    keys: Sequence[str], roi_size: Sequence[int], background: float = 0.0, label_keys: Sequence[str] = ()
) -> list:
    """Pad to at least ``roi_size`` then take one random ``roi_size`` crop (same crop for all keys).

    ``background`` pads image keys (use the intensity range minimum, e.g. -1); ``label_keys`` pad with 0.

    Raises:
        ValueError: ``roi_size`` above :data:`~prod9_components.limits.MAX_VOXELS` (every volume is padded to it).
    """
    check_voxels(voxel_count(roi_size), f"roi_size {tuple(int(r) for r in roi_size)}", "lower --roi-size")
    image_keys = [k for k in keys if k not in set(label_keys)]
    label_keys = [k for k in keys if k in set(label_keys)]
    transforms = []
    if image_keys:
        transforms.append(SpatialPadd(image_keys, spatial_size=tuple(roi_size), value=float(background)))
    if label_keys:
        transforms.append(SpatialPadd(label_keys, spatial_size=tuple(roi_size)))
    transforms.append(RandSpatialCropd(list(keys), roi_size=tuple(roi_size), random_size=False))
    return transforms


def preprocessing_contract(
    spacing: Sequence[float], intensity_range: tuple[float, float], lower: float = 0.5, upper: float = 99.5
) -> dict:
    """JSON-able description of ``preprocessing`` that exported bundles store beside their weights."""
    return {
        "orientation": "RAS",
        "spacing": [float(s) for s in spacing],
        "anti_aliasing": "gaussian, sigma (target / source spacing - 1) / 2",
        "intensity": {
            "method": "robust_percentile",
            "lower": float(lower),
            "upper": float(upper),
            "range": [float(intensity_range[0]), float(intensity_range[1])],
        },
    }
