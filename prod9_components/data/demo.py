"""Synthetic BraTS-like demo dataset built from real anatomy (nilearn's MNI152 tissue maps).

Per case: a seeded smooth deformation of the MNI152 grey/white-matter/CSF probability maps, four contrasts
computed from tissue intensities (partial-volume mixing), a nested synthetic tumour (necrotic core 1,
enhancing rim 4, oedema 2: the BraTS 2021 convention), a smooth bias field and Rician noise. Volumes are
written in the BraTS 2021 layout on a 240 x 240 x 155 mm field of view (1 mm at the default shape).

Everything is a function of (seed, case index, shape), so a case is reproducible on its own and a cache
directory can be completed case by case.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from prod9_components.atomic import write_json
from prod9_components.data.modalities import MODALITIES

logger = logging.getLogger("prod9")

DEMO_VERSION = 1
BRATS_SHAPE = (240, 240, 155)
FIELD_OF_VIEW_MM = (240.0, 240.0, 155.0)
# Field-of-view centre in MNI world mm: the brain mask's bounding-box centre (x, y) and MNI z voxels 0..154.
FOV_CENTRE_MM = (0.5, -16.5, 5.0)
INTENSITY_SCALE = 1000.0  # stored as int16 counts, like most BraTS releases

# Relative tissue intensities per contrast (why: T1 CSF < GM < WM; T2 inverts; FLAIR suppresses CSF).
TISSUE_INTENSITY = {  # (csf, gm, wm)
    "t1": (0.25, 0.55, 0.80),
    "t1ce": (0.25, 0.55, 0.80),
    "t2": (1.00, 0.60, 0.40),
    "flair": (0.12, 0.62, 0.45),
}
# Tumour intensities per contrast: necrosis dark on T1 / bright on T2, enhancing rim bright on T1ce only,
# oedema bright on T2/FLAIR and slightly dark on T1.
TUMOUR_INTENSITY = {  # (necrosis, enhancing, oedema)
    "t1": (0.15, 0.55, 0.55),
    "t1ce": (0.18, 1.25, 0.55),
    "t2": (0.95, 0.65, 0.85),
    "flair": (0.50, 0.75, 0.95),
}
NECROSIS, OEDEMA, ENHANCING = 1, 2, 4
MARKER_NAME = "prod9_demo.json"  # marks make_demo_dataset's folders: seed, shape, version and the cases it made


@dataclass(frozen=True, eq=False)
class TissueTemplates:
    """MNI152 1 mm tissue probability maps, each (197, 233, 189) float32, and their voxel->world affine."""

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray

    @functools.cached_property
    def stacked(self) -> torch.Tensor:
        """(3, X, Y, Z) float32 tensor of csf, gm, wm (the layout grid sampling wants)."""
        return torch.from_numpy(np.stack([self.csf, self.gm, self.wm]))

    @functools.cached_property
    def brain_box_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """World-mm corners (low, high) of the voxels with any tissue."""
        voxels = np.argwhere(self.wm + self.gm + self.csf > 0.05)
        return (
            nib.affines.apply_affine(self.affine, voxels.min(0)),
            nib.affines.apply_affine(self.affine, voxels.max(0)),
        )

    @functools.cached_property
    def deep_white_matter_mm(self) -> np.ndarray:
        """World-mm positions (N, 3) of voxels that are almost surely white matter (tumour seeds)."""
        return nib.affines.apply_affine(self.affine, np.argwhere(self.wm > 0.95)).astype(np.float32)


@dataclass(frozen=True)
class DemoCase:
    """One synthetic case. ``images[m]`` is float32 (X, Y, Z) in relative intensity units (0 = background);
    ``seg`` uint8 (X, Y, Z) in {0, 1, 2, 4}; ``tissue`` holds the deformed csf/gm/wm probabilities (X, Y, Z)."""

    images: dict
    seg: np.ndarray
    tissue: dict
    affine: np.ndarray


@functools.lru_cache(maxsize=1)
def _mni_templates() -> TissueTemplates:
    from nilearn import datasets  # slow import (~4 s): only when a demo case is built

    def load(fn):
        return np.asarray(fn(resolution=1).dataobj, dtype=np.float32)

    image = datasets.load_mni152_template(resolution=1)
    brain = load(datasets.load_mni152_brain_mask)
    gm = load(datasets.load_mni152_gm_template) * brain
    wm = load(datasets.load_mni152_wm_template) * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)  # the rest of the brain mask: ventricles and sulci
    return TissueTemplates(csf=csf, gm=gm, wm=wm, affine=np.asarray(image.affine, dtype=np.float64))


@functools.lru_cache(maxsize=4)
def load_tissue_templates(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> TissueTemplates:
    """MNI152 tissue maps, pre-smoothed for sampling at ``spacing`` mm (anti-aliasing for coarse grids)."""
    templates = _mni_templates()
    sigma = [max(0.0, (s - 1.0) / 2.0) for s in spacing]
    if max(sigma) == 0.0:
        return templates
    smooth = lambda a: ndimage.gaussian_filter(a, sigma, mode="constant")  # noqa: E731
    return TissueTemplates(smooth(templates.csf), smooth(templates.gm), smooth(templates.wm), templates.affine)


def demo_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """RAS voxel->world affine of the demo grid: spacing = 240x240x155 mm / shape, centred on the brain."""
    spacing = np.asarray(FIELD_OF_VIEW_MM) / np.asarray(shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(FOV_CENTRE_MM) - (np.asarray(shape) - 1) / 2.0 * spacing
    return affine


def _smooth_noise(rng, count: int, shape, sigma_voxels: float) -> np.ndarray:
    """``count`` smooth random fields (count, *shape), float32, zero mean and unit std."""
    noise = rng.standard_normal((count, *shape)).astype(np.float32)
    for field in noise:
        field[...] = ndimage.gaussian_filter(field, sigma_voxels, mode="reflect")
        field -= field.mean()
        field /= field.std() + 1e-8
    return noise


def _sample_trilinear(volumes: torch.Tensor, voxels: np.ndarray) -> np.ndarray:
    """Sample ``volumes`` (C, X, Y, Z) at voxel coordinates ``voxels`` (3, N): (C, N) float32, zero outside.

    torch's grid_sample: one multi-threaded pass for all channels (scipy's map_coordinates is ~3x slower).
    """
    size = torch.tensor(volumes.shape[1:], dtype=torch.float32)
    grid = torch.from_numpy(np.ascontiguousarray(voxels.T)) * (2.0 / (size - 1)) - 1.0  # (N, 3) in [-1, 1]
    grid = grid.flip(-1).reshape(1, 1, 1, -1, 3)  # grid_sample wants (z, y, x) order for (N, C, X, Y, Z)
    out = F.grid_sample(volumes[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(volumes.shape[0], -1).numpy()


def _rotation(rng, max_degrees: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


CONTROL_SPACING_MM = 6.0  # deformation, bias field and tumour-border noise live on this coarse grid


def synthesize_case(seed: int, case_index: int, shape: tuple[int, int, int] = BRATS_SHAPE,
                    bias_seed: int | None = None) -> DemoCase:
    """Build one synthetic case in memory (deterministic for ``(seed, case_index, shape)``).

    ``bias_seed`` rebuilds the same case (anatomy, tumour, contrasts, noise) under other bias fields, drawn from
    ``(seed, case_index, bias_seed)``: what no translation from another modality can predict, so the distance
    between a case and its rebuild bounds how close a sampled translation can get (``scripts/translation_check.py``).

    Speed (why it is built this way): everything smooth is computed on a 6 mm control grid and
    trilinearly upsampled; tissue maps are sampled and contrasts computed only at voxels near the brain.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"demo shape must be 3 sizes >= 8, got {shape}")
    rng = np.random.default_rng([seed, case_index])
    affine = demo_affine(shape)
    spacing = np.diag(affine)[:3]
    templates = load_tissue_templates(tuple(float(s) for s in spacing))

    # Sub-grid around the brain (+15 mm for the deformation): the rest of the BraTS box stays air.
    inv_affine = np.linalg.inv(affine)
    brain_lo, brain_hi = templates.brain_box_mm
    lo = np.clip(np.floor(nib.affines.apply_affine(inv_affine, brain_lo - 15.0)).astype(int), 0, shape)
    hi = np.clip(np.ceil(nib.affines.apply_affine(inv_affine, brain_hi + 15.0)).astype(int) + 1, 0, shape)
    sub_shape = tuple(int(h - l) for l, h in zip(lo, hi))
    box = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))

    # Control grid spanning the sub-grid's corner voxel centres exactly (align_corners upsampling).
    control_shape = [max(2, int(np.ceil((n - 1) * s / CONTROL_SPACING_MM)) + 1) for n, s in zip(sub_shape, spacing)]
    corner_lo = nib.affines.apply_affine(affine, lo)
    corner_hi = nib.affines.apply_affine(affine, hi - 1)
    axes = [np.linspace(a, b, n, dtype=np.float32) for a, b, n in zip(corner_lo, corner_hi, control_shape)]
    world = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, *control_shape) mm

    # Deformation: global scale + small rotation about the brain centre, plus a smooth displacement (mm).
    centre = np.asarray(FOV_CENTRE_MM, dtype=np.float32)[:, None, None, None]
    inverse_linear = np.linalg.inv(_rotation(rng, 6.0) @ np.diag(rng.uniform(0.92, 1.08, size=3)))
    displacement = _smooth_noise(rng, 3, control_shape, 14.0 / CONTROL_SPACING_MM) * rng.uniform(2.0, 4.0)
    source_mm = np.einsum("ij,j...->i...", inverse_linear.astype(np.float32), world - centre) + centre
    source_mm += displacement
    log_bias = 0.12 * _smooth_noise(rng, len(MODALITIES), control_shape, 40.0 / CONTROL_SPACING_MM)
    if bias_seed is not None:  # drawn after the case's own fields, so every later draw stays the case's
        bias_rng = np.random.default_rng([seed, case_index, int(bias_seed)])
        log_bias = 0.12 * _smooth_noise(bias_rng, len(MODALITIES), control_shape, 40.0 / CONTROL_SPACING_MM)
    border_noise = 0.12 * _smooth_noise(rng, 1, control_shape, 1.0)

    # Voxels that can hold brain: control points whose source lies in the brain, dilated by 2 points.
    mni_to_voxel = np.linalg.inv(templates.affine)
    to_voxels = lambda mm: (  # noqa: E731
        np.einsum("ij,j...->i...", mni_to_voxel[:3, :3].astype(np.float32), mm)
        + mni_to_voxel[:3, 3].astype(np.float32).reshape(3, *([1] * (mm.ndim - 1)))
    )
    control_brain = _sample_trilinear(templates.stacked, to_voxels(source_mm).reshape(3, -1)).sum(0)
    control_brain = ndimage.binary_dilation(control_brain.reshape(control_shape) > 0.01, iterations=2)

    control = np.concatenate([source_mm, log_bias, border_noise, control_brain[None].astype(np.float32)])
    fine = F.interpolate(torch.from_numpy(control)[None], size=sub_shape, mode="trilinear", align_corners=True)[0]
    candidates = fine[-1] > 0  # (sub_shape) bool
    fine = fine[:-1, candidates].numpy()  # (8, N): source mm (3), log bias (4), border noise (1)
    source_mm, log_bias, border_noise = fine[:3], fine[3:7], fine[7]

    csf, gm, wm = _sample_trilinear(templates.stacked, to_voxels(source_mm))
    brain_probability = csf + gm + wm
    labels = _synthetic_tumour(rng, source_mm, border_noise, spacing)
    labels[brain_probability <= 0.5] = 0

    jitter = rng.uniform(0.95, 1.05, size=(len(MODALITIES), 3)).astype(np.float32)
    noise_sigma = np.float32(rng.uniform(0.015, 0.03))
    in_brain = brain_probability >= 0.1  # skull-stripped, like BraTS: the rest stays exactly 0
    n_brain = int(in_brain.sum())
    images = {}
    for m_index, modality in enumerate(MODALITIES):
        csf_i, gm_i, wm_i = np.asarray(TISSUE_INTENSITY[modality], dtype=np.float32) * jitter[m_index]
        signal = csf * csf_i + gm * gm_i + wm * wm_i
        for label, value in zip((NECROSIS, ENHANCING, OEDEMA), TUMOUR_INTENSITY[modality]):
            region = labels == label
            signal[region] = np.float32(value) * brain_probability[region]
        signal *= np.exp(log_bias[m_index])
        # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
        real = signal[in_brain] + noise_sigma * rng.standard_normal(n_brain, dtype=np.float32)
        imag = noise_sigma * rng.standard_normal(n_brain, dtype=np.float32)
        signal[:] = 0.0
        signal[in_brain] = np.sqrt(real * real + imag * imag)
        images[modality] = _scatter(signal, candidates, box, shape)

    seg = _scatter(labels, candidates, box, shape)
    tissue = {name: _scatter(p, candidates, box, shape) for name, p in (("csf", csf), ("gm", gm), ("wm", wm))}
    return DemoCase(images=images, seg=seg, tissue=tissue, affine=affine)


def _scatter(values: np.ndarray, candidates: torch.Tensor, box, shape) -> np.ndarray:
    """Place per-candidate ``values`` (N,) into a zero volume of ``shape`` (candidates mask the box)."""
    full = np.zeros(shape, dtype=values.dtype)
    full[box][candidates.numpy()] = values
    return full


def _synthetic_tumour(rng, source_mm, border_noise, spacing) -> np.ndarray:
    """Nested ellipsoidal tumour defined in MNI (source) space, with irregular borders.

    Args:
        source_mm: (3, N) MNI coordinates of the voxels; border_noise: (N,) smooth noise (about +-0.1).

    Returns:
        (N,) uint8 labels: 1 necrotic core, 4 enhancing rim, 2 oedema, 0 elsewhere.
    """
    # Centre in deep white matter, so the tumour sits inside the brain (unsmoothed maps: on coarse grids
    # the anti-aliased white matter never reaches 0.95).
    deep_wm = _mni_templates().deep_white_matter_mm
    centre_mm = deep_wm[rng.integers(len(deep_wm))]
    axes_mm = rng.uniform(16.0, 28.0) * rng.uniform(0.8, 1.2, size=3)
    # Each shell must be at least ~1.2 voxels thick to exist on coarse test grids.
    min_shell = 1.2 * float(np.max(spacing))
    axes_mm = np.maximum(axes_mm, 3.0 * min_shell / 0.8)
    shell = min_shell / axes_mm.min()
    necrosis_fraction = max(rng.uniform(0.3, 0.42), shell)
    enhancing_fraction = max(rng.uniform(0.55, 0.7), necrosis_fraction + shell)
    distance = np.zeros(source_mm.shape[1], dtype=np.float32)
    for axis in range(3):
        distance += ((source_mm[axis] - centre_mm[axis]) / np.float32(axes_mm[axis])) ** 2
    np.sqrt(distance, out=distance)
    distance *= 1.0 + border_noise
    labels = np.zeros(distance.shape, dtype=np.uint8)
    labels[distance < 1.0] = OEDEMA
    labels[distance < enhancing_fraction] = ENHANCING
    labels[distance < necrosis_fraction] = NECROSIS
    return labels


def _case_name(index: int) -> str:
    return f"BraTS2021_{index:05d}"


def _case_complete(case_dir: Path) -> bool:
    name = case_dir.name
    return all((case_dir / f"{name}_{role}.nii.gz").is_file() for role in (*MODALITIES, "seg"))


def write_case(case: DemoCase, case_dir: str | os.PathLike) -> str:
    """Write a DemoCase in the BraTS 2021 layout: into a temp dir, then renamed (never half-written).

    When ``case_dir`` already exists (a case of this generator with files deleted) only the missing files are
    moved in: an existing file is never replaced. The temp dir is the only thing ever removed.
    """
    case_dir = Path(case_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{case_dir.name}.", dir=case_dir.parent))
    try:
        for modality, image in case.images.items():
            counts = np.clip(np.rint(image * INTENSITY_SCALE), 0, np.iinfo(np.int16).max).astype(np.int16)
            _save_nifti(counts, case.affine, tmp_dir / f"{case_dir.name}_{modality}.nii.gz")
        _save_nifti(case.seg.astype(np.uint8), case.affine, tmp_dir / f"{case_dir.name}_seg.nii.gz")
        if not case_dir.exists():
            try:
                os.replace(tmp_dir, case_dir)
                return str(case_dir)
            except OSError:  # another process built this case first: fill in whatever it still lacks
                pass
        for written in tmp_dir.iterdir():
            if not (case_dir / written.name).exists():
                os.replace(written, case_dir / written.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # our own temp dir (already gone after the whole-dir rename)
    return str(case_dir)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def make_demo_dataset(
    output_dir: str | os.PathLike,
    num_cases: int = 8,
    seed: int = 0,
    shape: tuple[int, int, int] = BRATS_SHAPE,
) -> list[str]:
    """Build (or complete) a demo dataset of ``num_cases`` cases in ``output_dir``; returns the case dirs.

    Only a new or empty folder, or one this function made (its ``prod9_demo.json`` marker records seed, shape,
    version and the cases it wrote), is written into. There, complete cases are reused and missing cases, or missing
    files of cases it made, are written; nothing already in the folder is deleted or replaced, and a folder built
    with other settings is never mixed in.

    Raises:
        ValueError: ``output_dir`` is not empty and has no marker (e.g. a user's own dataset), holds a demo
            dataset built with other settings or an incomplete case it did not make, or bad arguments.
    """
    if int(num_cases) < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"demo shape must be 3 sizes >= 8, got {shape}")
    root = Path(output_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    settings = {"version": DEMO_VERSION, "seed": int(seed), "shape": list(shape)}
    marker = root / MARKER_NAME
    if marker.is_file():
        try:
            existing = json.loads(marker.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{marker}: not valid JSON ({error}); use another dir") from None
        if not isinstance(existing, dict):
            raise ValueError(f"{marker}: expected a JSON object with version, seed and shape; use another dir")
        made = set(existing.pop("cases", []))  # markers written before the list existed have none
        if existing != settings:
            raise ValueError(f"{root}: holds a demo dataset built with {existing}, not {settings}; use another dir")
    else:
        # Why: a folder without our marker may hold a user's data (e.g. real BraTS cases without seg); the
        # generator writes only into a new or empty folder, then marks it as its own.
        entries = sorted(p.name for p in root.iterdir() if not p.name.startswith(f".{MARKER_NAME}."))
        if entries:
            raise ValueError(
                f"{root}: not empty and not a prod9 demo dataset (no {MARKER_NAME}; holds {', '.join(entries[:3])}"
                f"{', ...' if len(entries) > 3 else ''}); give a new or empty folder"
            )
        made = set()
        write_json(settings, marker)

    case_dirs = [root / _case_name(index) for index in range(int(num_cases))]
    missing = [index for index, case_dir in enumerate(case_dirs) if not _case_complete(case_dir)]
    for case_dir in (case_dirs[index] for index in missing):
        if case_dir.exists() and case_dir.name not in made:  # e.g. a user's case copied in: never write into it
            raise ValueError(f"{case_dir}: an incomplete case this generator did not make (not listed in "
                             f"{marker}); move it out of {root} or use another dir")

    def build(index: int) -> int:
        logger.info("demo dataset: building case %d/%d in %s", index + 1, num_cases, case_dirs[index])
        write_case(synthesize_case(int(seed), index, shape), case_dirs[index])  # adds missing files, deletes none
        return index

    # Threads: torch's grid sampling, numpy and gzip release the GIL, so the cores build cases side by side
    # (6 cases on 2 cores: 15.8 s one at a time, 9.3 s two at a time; the arrays are the same).
    with ThreadPoolExecutor(max(1, min(len(missing), os.cpu_count() or 1))) as pool:
        futures = [pool.submit(build, index) for index in missing]
        try:
            for future in as_completed(futures):
                made.add(case_dirs[future.result()].name)
                write_json({**settings, "cases": sorted(made)}, marker)
        except BaseException:  # a failed case (or Ctrl-C) stops the cases not yet started
            pool.shutdown(cancel_futures=True)
            raise
    return [str(case_dir) for case_dir in case_dirs]
