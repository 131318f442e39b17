"""Tumour scores of mask-controlled generation (stage 3 of both families, so they compare on one table).

- Tumour fidelity: per BraTS label, the contrast between the tumour region and healthy brain tissue, in the
  generated image and in the real one; the score is the absolute difference (0 = the tumour stands out from the
  brain exactly as much as in the real image).
- Control sensitivity: two samples from the same noise, one with the mask and one with an empty mask. The mean
  absolute change inside the tumour minus the mean change in the healthy brain: > 0 when the mask changes the
  tumour region more than the rest (an untrained, zero-initialised control branch scores exactly 0).
- Brain shape and intensities of the mask-controlled sample (``brain_dice``, ``intensity_w1``: the generators' scores
  of :mod:`prod9_components.metrics.generation`, here against the real image of the same case): a control amplified
  until the tumour shows can wash out the rest of the brain, which the tumour scores alone do not see.
- Segment-the-synthetic (DESIGN §9): a small segmenter trained on real images of the training split
  (:mod:`prod9_components.engines.tumour_segmenter`) segments the mask-controlled sample and the real image of the
  same case and modality; the Dice of each against the conditioning mask's whole tumour (``seg > 0``) is reported,
  and their ratio at the end of the epoch (1 = the generated tumour is found as well as the real one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.metrics import compute_dice

from prod9_components.metrics.derived import DerivedMetric
from prod9_components.metrics.distribution_distance import intensity_distances
from prod9_components.metrics.generation import brain_mask, dice

__all__ = ["CONTROL_METRICS", "SEGMENTATION_METRICS", "TUMOUR_LABELS", "NanMean", "SegDiceRatio", "control_metrics",
           "control_scores", "control_sensitivity", "segmentation_metrics", "segmentation_scores", "tumour_contrast",
           "tumour_dice"]

TUMOUR_LABELS = {1: "necrosis", 2: "oedema", 3: "enhancing"}
# Output keys of MaskGiTControlNetEvaluator (and the MAISI one): reported as metrics of the same names.
CONTROL_METRICS = ("sensitivity", "change_inside", "change_outside", "brain_dice", "intensity_w1") + tuple(
    f"{kind}_{name}" for name in TUMOUR_LABELS.values() for kind in ("contrast_error", "contrast", "real_contrast"))
# Output keys of the evaluators given a tumour segmenter; segmentation_metrics() adds "seg_dice_ratio".
SEGMENTATION_METRICS = ("seg_dice_generated", "seg_dice_real")


def _masks(seg: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seg = seg.reshape(seg.shape[-3:])
    healthy = brain.reshape(brain.shape[-3:]).bool() & (seg == 0)
    return seg, healthy


def tumour_contrast(image: torch.Tensor, seg: torch.Tensor, brain: torch.Tensor) -> dict[int, float]:
    """Mean intensity of each tumour label minus that of healthy brain; labels absent from ``seg`` give NaN.

    Args:
        image: (D, H, W) or (1, D, H, W) intensities.
        seg: same grid, labels 0..3 (0 = no tumour).
        brain: same grid, bool brain mask (e.g. the real image > 0).
    """
    seg, healthy = _masks(seg, brain)
    image = image.reshape(seg.shape).float()
    reference = image[healthy].mean() if healthy.any() else torch.tensor(float("nan"))
    return {label: float(image[seg == label].mean() - reference) if (seg == label).any() else math.nan
            for label in TUMOUR_LABELS}


def control_sensitivity(with_mask: torch.Tensor, without_mask: torch.Tensor, seg: torch.Tensor,
                        brain: torch.Tensor) -> dict[str, float]:
    """Mean |change| inside the tumour, in the healthy brain, and their difference (``score``); NaN without tumour."""
    seg, healthy = _masks(seg, brain)
    change = (with_mask.reshape(seg.shape).float() - without_mask.reshape(seg.shape).float()).abs()
    tumour = seg > 0
    inside = float(change[tumour].mean()) if tumour.any() else math.nan
    outside = float(change[healthy].mean()) if healthy.any() else math.nan
    return {"inside": inside, "outside": outside, "score": inside - outside}


def control_scores(pred: torch.Tensor, without: torch.Tensor, real: torch.Tensor, seg: torch.Tensor,
                   intensity_range: Sequence[float] = (0.0, 1.0)) -> dict[str, float]:
    """Every :data:`CONTROL_METRICS` score of a batch, each averaged over its samples skipping NaN (a label absent
    from a case); the brain is ``real > 0``. ``brain_dice``: Dice of the sample's brain with the real image's
    (:func:`~prod9_components.metrics.generation.brain_mask` of each); ``intensity_w1``: W1 of their intensities.

    Args:
        pred: (B, 1, D, H, W) generated with the mask; without: the same noise with an empty mask.
        real: (B, 1, D, H, W) the real image of the generated modality; seg: (B, D, H, W) or (B, 1, D, H, W) labels.
        intensity_range: (low, high) of the images' intensity scale (the brain masks' threshold).
    """
    rows = []
    for b in range(len(seg)):
        brain = real[b] > 0
        generated, truth = tumour_contrast(pred[b], seg[b], brain), tumour_contrast(real[b], seg[b], brain)
        sensitivity = control_sensitivity(pred[b], without[b], seg[b], brain)
        row = {"sensitivity": sensitivity["score"], "change_inside": sensitivity["inside"],
               "change_outside": sensitivity["outside"],
               "brain_dice": dice(brain_mask(pred[b], intensity_range), brain_mask(real[b], intensity_range)),
               "intensity_w1": intensity_distances([pred[b]], [real[b]])["intensity_w1"]}
        for value, name in TUMOUR_LABELS.items():
            row[f"contrast_{name}"] = generated[value]
            row[f"real_contrast_{name}"] = truth[value]
            row[f"contrast_error_{name}"] = abs(generated[value] - truth[value])
        rows.append(row)
    scores = {}
    for key in CONTROL_METRICS:
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        scores[key] = float(values.nanmean()) if not values.isnan().all() else math.nan
    return scores


def tumour_dice(pred: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Dice of predicted whole-tumour masks against ``seg > 0`` (MONAI ``compute_dice``), per sample.

    Args:
        pred: (B, 1, D, H, W) or (B, D, H, W) bool / {0, 1} prediction.
        seg: same grid, tumour labels (any value > 0 is tumour).

    Returns:
        (B,) float: 1 for a perfect prediction, 0 for a disjoint one, NaN where ``seg`` has no tumour.
    """
    pred = pred.reshape(len(pred), 1, *pred.shape[-3:]).float()
    truth = (seg.reshape(len(seg), 1, *seg.shape[-3:]) > 0).float()
    return compute_dice(pred, truth.to(pred.device), include_background=True, ignore_empty=True)[:, 0]


def segmentation_scores(generated: torch.Tensor | Sequence[torch.Tensor], real: torch.Tensor,
                        seg: torch.Tensor) -> dict[str, float]:
    """Every :data:`SEGMENTATION_METRICS` score of a batch, each averaged over its samples skipping NaN (no tumour).

    Args:
        generated: (B, 1, D, H, W) the segmenter's tumour masks of the mask-controlled samples, or a sequence of them:
            several samples of the same cases (other noise), all averaged, so one lucky draw does not decide.
        real: (B, 1, D, H, W) its masks of the real images of the same cases and modalities.
        seg: (B, D, H, W) or (B, 1, D, H, W) the conditioning masks' labels.
    """
    draws = [generated] if isinstance(generated, torch.Tensor) else list(generated)
    scores = {}
    for key, preds in zip(SEGMENTATION_METRICS, (draws, [real])):
        values = torch.cat([tumour_dice(pred, seg).double() for pred in preds])
        scores[key] = float(values.nanmean()) if not values.isnan().all() else math.nan
    return scores


class NanMean(Metric):
    """Mean of a scalar in the engine output over the epoch, skipping NaN (a label absent from a case).

    ``output_transform`` returns a float or a 0-d tensor. Computes NaN when every value was NaN.
    """

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, device=self._device)

    @reinit__is_reduced
    def update(self, output) -> None:
        value = float(output)
        if not math.isnan(value):
            self._sum += value
            self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count) if self._count > 0 else math.nan


def control_metrics() -> dict[str, NanMean]:
    """One :class:`NanMean` per key of :data:`CONTROL_METRICS`, for an evaluator's ``additional_metrics``."""
    return {key: NanMean(output_transform=lambda output, key=key: output[key]) for key in CONTROL_METRICS}


class SegDiceRatio(DerivedMetric):
    """``seg_dice_generated / seg_dice_real`` of the epoch: how well the segmenter finds the tumour in the
    mask-controlled samples relative to the real images (1 = as well; NaN when either is NaN or the real Dice is 0).
    Attach it after the two :class:`NanMean` it reads (last in ``additional_metrics``).
    """

    def __init__(self, generated: str = "seg_dice_generated", real: str = "seg_dice_real") -> None:
        self.generated, self.real = generated, real
        super().__init__()

    def ratio(self, metrics: dict) -> float:
        generated, real = (float(metrics.get(k, math.nan)) for k in (self.generated, self.real))
        return generated / real if math.isfinite(generated) and math.isfinite(real) and real > 0 else math.nan

    def derive(self, metrics: dict) -> tuple[float, dict[str, float]]:
        return self.ratio(metrics), {}


def segmentation_metrics() -> dict[str, Metric]:
    """``seg_dice_generated`` and ``seg_dice_real`` (:class:`NanMean` of the evaluator outputs) and, last,
    ``seg_dice_ratio`` (:class:`SegDiceRatio`), for an evaluator's ``additional_metrics``."""
    metrics: dict[str, Metric] = {key: NanMean(output_transform=lambda output, key=key: output[key])
                                  for key in SEGMENTATION_METRICS}
    metrics["seg_dice_ratio"] = SegDiceRatio()
    return metrics
