"""Fit the translation baselines (histogram matching, intensity regression) on a run's training split, and apply
them to an evaluator's batch."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from monai.transforms import Compose

from prod9_components.data.modalities import MODALITIES, modality_index, modality_name
from prod9_components.data.transforms import preprocessing
from prod9_components.metrics.baselines import TranslationBaselines

__all__ = ["BASELINE_KEYS", "baseline_predictions", "fit_translation_baselines"]

logger = logging.getLogger("prod9")

# Output keys of the evaluators, next to "source" (copy the source): the metrics are "<key>_psnr", ...
BASELINE_KEYS = ("histogram_source", "regression_source")


def fit_translation_baselines(cases: Sequence[Mapping], source_modalities: Sequence[str | int],
                              target_modalities: Sequence[str | int], spacing: Sequence[float],
                              intensity_range: Sequence[float] = (0.0, 1.0), max_cases: int = 8,
                              degree: int = 3) -> dict[int, TranslationBaselines]:
    """One :class:`~prod9_components.metrics.baselines.TranslationBaselines` per target modality, fitted on the
    first ``max_cases`` training cases through the run's own preprocessing (``spacing`` mm, robust scaling to
    ``intensity_range``).

    Args:
        cases: training-split case dicts (a path per modality key).
        source_modalities: the translation's sources (names or indices), in the model's order.
        target_modalities: the modalities it predicts (names or indices), none of them a source.

    Returns:
        modality index of each target -> its fitted baselines.
    """
    sources = [modality_index(m) for m in source_modalities]
    targets = [modality_index(m) for m in target_modalities if modality_index(m) not in sources]
    if not cases:
        raise ValueError("no training cases to fit the translation baselines on")
    if not sources or not targets:
        raise ValueError("translation baselines need a source and a target modality")
    keys = [MODALITIES[i] for i in dict.fromkeys(sources + targets)]
    transform = Compose(preprocessing(image_keys=keys, spacing=spacing, intensity_range=tuple(intensity_range),
                                      k_divisible=1))
    volumes = [transform({k: case[k] for k in keys}) for case in list(cases)[:max_cases]]
    fitted = {}
    for target in targets:
        source_volumes = [torch.cat([data[MODALITIES[s]].as_tensor() for s in sources]) for data in volumes]
        target_volumes = [data[MODALITIES[target]].as_tensor() for data in volumes]
        fitted[target] = TranslationBaselines(degree=degree, intensity_range=intensity_range).fit(
            source_volumes, target_volumes)
    logger.info(f"translation baselines {'+'.join(modality_name(s) for s in sources)} -> "
                f"{', '.join(modality_name(t) for t in targets)} fitted on {len(volumes)} training case(s)")
    return fitted


def baseline_predictions(baselines: Mapping[int, TranslationBaselines], sources: torch.Tensor,
                         targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"histogram_source", "regression_source"}``: each (B, 1, D, H, W), row ``b`` predicted from
    ``sources[b]`` (S, D, H, W) by the baselines of target modality ``targets[b]``."""
    rows = {key: [] for key in BASELINE_KEYS}
    for source, target in zip(sources, targets.tolist()):
        if int(target) not in baselines:
            raise ValueError(f"no translation baselines fitted for target {modality_name(int(target))}")
        fitted = baselines[int(target)]
        rows["histogram_source"].append(fitted.histogram(source[None]))
        rows["regression_source"].append(fitted.regression(source[None]))
    return {key: torch.cat(values) for key, values in rows.items()}
