"""Scores of unconditional / label-conditional samples, each beside the same score of real cases (DESIGN §9).

A generated volume has no ground truth, so every score compares it with real volumes, and the same score of held-out
real cases (the evaluated split) against the training cases says what a real brain gets:

=============================  ===================================  ==================================================
score of the samples           the real reference beside it         meaning
=============================  ===================================  ==================================================
``brain_dice``                 ``real_brain_dice``                  Dice of the brain foreground with the closest
                                                                    training brain mask (shape and framing)
``intensity_w1``               ``real_intensity_w1``                W1 of voxel intensities vs the held-out cases
                                                                    (real: held-out vs training cases)
``gradient_w1``                ``real_gradient_w1``                 the same for gradient magnitudes (edges, texture)
``sample_ms_ssim``             ``real_ms_ssim``                     mean MS-SSIM over pairs: 1 = identical (collapse)
``nearest_training_distance``  ``real_nearest_training_distance``   mean |difference| to the closest training volume
``memorised_fraction``         (0 for real cases)                   share of samples flagged by :func:`memorised`
=============================  ===================================  ==================================================

All volumes are (1, D, H, W) on one grid and one intensity scale (real ones preprocessed as the model's data and
centre-padded with background to the generated grid, so both frame the brain alike). :func:`real_reference` computes
what depends on real volumes only, once; :func:`generation_scores` scores one modality's samples against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import combinations

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.transforms import FillHoles
from scipy import ndimage

from prod9_components.metrics.distribution_distance import intensity_distances
from prod9_components.metrics.image_quality import ms_ssim

__all__ = ["RealReference", "brain_mask", "brain_shape_dice", "dice", "generation_scores", "memorised",
           "nearest_training_distance", "pairwise_ms_ssim", "real_reference"]

FOREGROUND_FRACTION = 0.1  # of the intensity range above its low end: real background sits exactly at the low end,
# generated background has faint noise, and brain tissue (even CSF after the robust scaling) lies above it
MEMORISED_BELOW = 0.5  # of the closest held-out case's nearest-training distance
PAIRS_VOXELS = 2**24  # voxels of the volumes one MS-SSIM batch scores (its five local moments: ~320 MB in float32)


def brain_mask(volume: torch.Tensor, intensity_range: Sequence[float] = (0.0, 1.0),
               fraction: float = FOREGROUND_FRACTION) -> torch.Tensor:
    """The brain of a real or generated volume, found the same way for both.

    Voxels above ``low + fraction * (high - low)``, then the largest connected component (drops noise specks and
    blobs outside the head) with its enclosed holes filled (ventricles, dark lesions).

    Args:
        volume: (1, D, H, W), any device.
        intensity_range: (low, high) of the volumes' intensity scale.
        fraction: threshold as a fraction of the range.

    Returns:
        bool (1, D, H, W) on the CPU; all False when nothing is above the threshold.
    """
    low, high = float(intensity_range[0]), float(intensity_range[1])
    foreground = (volume.detach().float() > low + fraction * (high - low)).cpu().numpy()
    # scipy rather than MONAI's KeepLargestConnectedComponent, which needs scikit-image (not a dependency);
    # face connectivity, so noise touching the brain only at an edge or corner stays apart.
    labels, count = ndimage.label(foreground[0])
    if count == 0:
        return torch.zeros(foreground.shape, dtype=torch.bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = torch.from_numpy(labels == sizes.argmax())[None].to(torch.uint8)
    return FillHoles(applied_labels=[1])(largest).as_tensor().bool()


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice ``2 |a & b| / (|a| + |b|)`` of two boolean masks of one shape (e.g. (1, D, H, W)); 1.0 when both are
    empty (MONAI ``compute_dice`` with ``ignore_empty=False``)."""
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(compute_dice(a.float().reshape(1, 1, -1), b.to(a.device).float().reshape(1, 1, -1),
                              ignore_empty=False))


def brain_shape_dice(mask: torch.Tensor, references: Sequence[torch.Tensor]) -> float:
    """Dice of ``mask`` (bool (1, D, H, W)) with the closest of the ``references`` (same shape): the max over them."""
    if not references:
        raise ValueError("brain_shape_dice needs at least one reference mask")
    return max(dice(mask, r) for r in references)


def pairwise_ms_ssim(volumes: Sequence[torch.Tensor], data_range: float = 1.0) -> float:
    """Mean MS-SSIM over every pair of ``volumes`` (each (1, D, H, W), every side >= 28, see
    :func:`~prod9_components.metrics.image_quality.ms_ssim_min_size`): 1 when all are identical, lower = more diverse.
    """
    if len(volumes) < 2:
        raise ValueError(f"MS-SSIM diversity needs at least 2 volumes, got {len(volumes)}")
    device = volumes[0].device
    pairs = list(combinations(range(len(volumes)), 2))
    per_batch = max(1, PAIRS_VOXELS // volumes[0].numel())  # pairs scored in one batch: all of them on demo volumes
    values = []
    for start in range(0, len(pairs), per_batch):
        firsts, seconds = zip(*pairs[start:start + per_batch])
        batch = [torch.stack([volumes[i].to(device).float() for i in indices]) for indices in (firsts, seconds)]
        values.append(ms_ssim(*batch, data_range=data_range))
    return float(torch.cat(values).mean())


def nearest_training_distance(volume: torch.Tensor, training: Sequence[torch.Tensor]) -> float:
    """Mean absolute difference (intensity units) between ``volume`` (1, D, H, W) and the closest ``training`` volume
    (same shape, any device/dtype: each is moved to ``volume``'s device in turn)."""
    if not training:
        raise ValueError("nearest_training_distance needs at least one training volume")
    v = volume.float()
    return min(float((v - t.to(v.device, torch.float32)).abs().mean()) for t in training)


def memorised(distances: Sequence[float], real_distances: Sequence[float],
              fraction: float = MEMORISED_BELOW) -> list[bool]:
    """Which samples look copied from the training set: nearest-training distance below ``fraction`` of the smallest
    such distance of a held-out real case (a real brain the model never saw is at least that far from every training
    case; a sample much closer than that is more likely a copy than a new brain).

    Args:
        distances: :func:`nearest_training_distance` of each sample.
        real_distances: the same of each held-out real case.
    """
    if not real_distances:
        raise ValueError("memorised needs the nearest-training distance of at least one held-out real case")
    threshold = fraction * min(real_distances)
    return [d < threshold for d in distances]


@dataclasses.dataclass(frozen=True)
class RealReference:
    """One modality's real volumes and what samples are compared with; made by :func:`real_reference`.

    Attributes:
        held_out: volumes of the evaluated split, each (1, D, H, W).
        training: volumes of training cases, each (1, D, H, W).
        training_masks: :func:`brain_mask` of each training volume, bool (1, D, H, W).
        held_out_distances: :func:`nearest_training_distance` of each held-out volume.
        intensity_range: (low, high) of the intensity scale.
        scores: the real-vs-real scores (``real_*`` keys of :func:`generation_scores`).
    """

    held_out: tuple[torch.Tensor, ...]
    training: tuple[torch.Tensor, ...]
    training_masks: tuple[torch.Tensor, ...]
    held_out_distances: tuple[float, ...]
    intensity_range: tuple[float, float]
    scores: dict[str, float]

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float16) -> RealReference:
        """The same reference with its volumes on ``device`` as ``dtype`` (float16 on the CPU halves what stays in
        memory between evaluations; its 1e-3 relative precision is far below any score's resolution)."""
        return dataclasses.replace(self, held_out=tuple(v.to(device, dtype) for v in self.held_out),
                                   training=tuple(v.to(device, dtype) for v in self.training))


def real_reference(held_out: Sequence[torch.Tensor], training: Sequence[torch.Tensor],
                   intensity_range: Sequence[float] = (0.0, 1.0)) -> RealReference:
    """Everything :func:`generation_scores` needs from real volumes, computed once.

    Args:
        held_out: >= 1 volumes (1, D, H, W) of the evaluated split (cases the model was not trained on).
        training: >= 1 volumes of training cases, same shape.
        intensity_range: (low, high) of the intensity scale (the brain-mask threshold and MS-SSIM's data range).

    Returns:
        a :class:`RealReference` whose ``scores`` are ``real_brain_dice`` (each held-out case's brain vs the closest
        training mask), ``real_intensity_w1`` / ``real_gradient_w1`` (held-out vs training volumes),
        ``real_ms_ssim`` (pairs of all the real volumes) and ``real_nearest_training_distance`` (held-out cases).
    """
    if not held_out or not training:
        raise ValueError(f"a real reference needs held-out and training volumes, got {len(held_out)} and "
                         f"{len(training)}")
    low, high = float(intensity_range[0]), float(intensity_range[1])
    training_masks = tuple(brain_mask(t, (low, high)) for t in training)
    distances = tuple(nearest_training_distance(h, training) for h in held_out)
    w1 = intensity_distances(list(held_out), list(training))
    scores = {
        "real_brain_dice": float(np.mean([brain_shape_dice(brain_mask(h, (low, high)), training_masks)
                                          for h in held_out])),
        "real_intensity_w1": w1["intensity_w1"],
        "real_gradient_w1": w1["gradient_w1"],
        "real_ms_ssim": pairwise_ms_ssim([*held_out, *training], data_range=high - low),
        "real_nearest_training_distance": float(np.mean(distances)),
    }
    return RealReference(tuple(held_out), tuple(training), training_masks, distances, (low, high), scores)


def generation_scores(samples: Sequence[torch.Tensor], reference: RealReference,
                      memorised_below: float = MEMORISED_BELOW) -> dict[str, float]:
    """Every score of one modality's samples, with the real-vs-real reference beside each (the table above).

    Args:
        samples: >= 2 generated volumes (1, D, H, W) on the reference's grid and intensity scale, any device.
        reference: the modality's :class:`RealReference`.
        memorised_below: the fraction of :func:`memorised`.

    Returns:
        ``{"brain_dice", "intensity_w1", "gradient_w1", "sample_ms_ssim", "nearest_training_distance",
        "memorised_fraction"}`` (means over samples) and the reference's ``real_*`` scores.
    """
    grid = tuple(reference.training[0].shape)
    if any(tuple(s.shape) != grid for s in samples):
        raise ValueError(f"samples must have the real volumes' shape {grid}, got {[tuple(s.shape) for s in samples]}")
    low, high = reference.intensity_range
    distances = [nearest_training_distance(s, reference.training) for s in samples]
    w1 = intensity_distances([s.detach().cpu() for s in samples], list(reference.held_out))
    return {
        "brain_dice": float(np.mean([brain_shape_dice(brain_mask(s, (low, high)), reference.training_masks)
                                     for s in samples])),
        "intensity_w1": w1["intensity_w1"],
        "gradient_w1": w1["gradient_w1"],
        "sample_ms_ssim": pairwise_ms_ssim(samples, data_range=high - low),
        "nearest_training_distance": float(np.mean(distances)),
        "memorised_fraction": float(np.mean(memorised(distances, reference.held_out_distances, memorised_below))),
        **reference.scores,
    }
