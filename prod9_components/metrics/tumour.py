"""Tumour scores of mask-controlled generation (stage 3 of both families, so they compare on one table).

- Tumour fidelity: per BraTS label, the contrast between the tumour region and healthy brain tissue, in the
  generated image and in the real one; the score is the absolute difference (0 = the tumour stands out from the
  brain exactly as much as in the real image).
- Control sensitivity: two samples from the same noise, one with the mask and one with an empty mask. The mean
  absolute change inside the tumour minus the mean change in the healthy brain: > 0 when the mask changes the
  tumour region more than the rest (an untrained, zero-initialised control branch scores exactly 0).
"""

from __future__ import annotations

import math

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

__all__ = ["CONTROL_METRICS", "TUMOUR_LABELS", "NanMean", "control_metrics", "control_scores", "control_sensitivity",
           "tumour_contrast"]

TUMOUR_LABELS = {1: "necrosis", 2: "oedema", 3: "enhancing"}
# Output keys of MaskGiTControlNetEvaluator (and the MAISI one): reported as metrics of the same names.
CONTROL_METRICS = ("sensitivity", "change_inside", "change_outside") + tuple(
    f"{kind}_{name}" for name in TUMOUR_LABELS.values() for kind in ("contrast_error", "contrast", "real_contrast"))


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


def control_scores(pred: torch.Tensor, without: torch.Tensor, real: torch.Tensor, seg: torch.Tensor) -> dict[str, float]:
    """Every :data:`CONTROL_METRICS` score of a batch, each averaged over its samples skipping NaN (a label absent
    from a case); the brain is ``real > 0``.

    Args:
        pred: (B, 1, D, H, W) generated with the mask; without: the same noise with an empty mask.
        real: (B, 1, D, H, W) the real image of the generated modality; seg: (B, D, H, W) or (B, 1, D, H, W) labels.
    """
    rows = []
    for b in range(len(seg)):
        brain = real[b] > 0
        generated, truth = tumour_contrast(pred[b], seg[b], brain), tumour_contrast(real[b], seg[b], brain)
        sensitivity = control_sensitivity(pred[b], without[b], seg[b], brain)
        row = {"sensitivity": sensitivity["score"], "change_inside": sensitivity["inside"],
               "change_outside": sensitivity["outside"]}
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
