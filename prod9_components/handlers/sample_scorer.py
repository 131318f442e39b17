"""Scores of generated samples against real volumes, and the per-evaluation loop of the sampling handlers of both
families (:class:`~prod9_components.handlers.maskgit_samples.MaskGiTSamplesHandler`,
:class:`~prod9_components.handlers.maisi_samples.MaisiSamplesHandler`): only how a sample is made differs.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import torch
from ignite.engine import Engine, Events

from prod9_components.data.modalities import MODALITIES, modality_index, modality_name
from prod9_components.data.settings import bool_setting
from prod9_components.data.token_cache import pad_or_crop
from prod9_components.handlers.tensorboard_images import MidSliceWriter
from prod9_components.metrics.generation import MEMORISED_BELOW, RealReference, generation_scores, real_reference

__all__ = ["SampleScorer", "ScoredSamplesHandler", "real_volumes"]


def real_volumes(encoder, cases: Sequence[Mapping], modalities: Sequence[str | int], size: Sequence[int],
                 ) -> dict[str, list[torch.Tensor]]:
    """The preprocessed real volumes of ``cases`` per modality name, each float32 (1, *size) on the CPU: centre-padded
    with the background (the low end of the intensity range) or cropped to the generated grid, so both sides frame
    the brain alike.

    Args:
        encoder: a :class:`~prod9_components.engines.case_encoder.CaseEncoder` (the model's own preprocessing).
    """
    volumes: dict[str, list[torch.Tensor]] = {modality_name(modality_index(m)): [] for m in modalities}
    for case in cases:
        data = encoder.preprocess(case)
        for name in volumes:
            image = data[MODALITIES[modality_index(name)]].as_tensor().float()
            volumes[name].append(pad_or_crop(image, size, encoder.intensity_range[0])[0])
    return volumes


class SampleScorer:
    """Scores each modality's samples against real volumes (:func:`~prod9_components.metrics.generation
    .generation_scores`) and records them in ``engine.state.metrics``.

    The real volumes (``held_out_cases`` and ``training_cases``, preprocessed by ``encoder`` and framed like the
    samples) and their real-vs-real scores are made on the first call, on the samples' device, at the samples' grid,
    and kept for later evaluations on the CPU as float16 (at 1 mm about 7 MB per case and modality).

    Args:
        encoder: a :class:`~prod9_components.engines.case_encoder.CaseEncoder` (``preprocess``, ``intensity_range``).
        held_out_cases: cases of the evaluated split (>= 1).
        training_cases: cases of the training split (>= 1).
        modalities: the modalities that will be scored (names or indices).
        memorised_below: the fraction of :func:`~prod9_components.metrics.generation.memorised`.
    """

    def __init__(self, encoder, held_out_cases: Sequence[Mapping], training_cases: Sequence[Mapping],
                 modalities: Sequence[str | int], memorised_below: float = MEMORISED_BELOW) -> None:
        if not held_out_cases or not training_cases:
            raise ValueError(f"scoring samples needs held-out and training cases, got {len(held_out_cases)} and "
                             f"{len(training_cases)} (reference_cases / training_reference_cases >= 1)")
        self.encoder, self.memorised_below = encoder, float(memorised_below)
        self.held_out_cases, self.training_cases = list(held_out_cases), list(training_cases)
        self.modalities = [modality_name(modality_index(m)) for m in modalities]
        self.references: dict[str, RealReference] = {}

    def scores(self, modality: str | int, samples: Sequence[torch.Tensor]) -> dict[str, float]:
        """Every score of one modality's ``samples`` (each (1, D, H, W), >= 2) with the real references beside them."""
        name = modality_name(modality_index(modality))
        if name not in self.references:
            self._load(samples[0])
        return generation_scores(samples, self.references[name], self.memorised_below)

    def _load(self, sample: torch.Tensor) -> None:
        size, device = sample.shape[-3:], sample.device
        held_out = real_volumes(self.encoder, self.held_out_cases, self.modalities, size)
        training = real_volumes(self.encoder, self.training_cases, self.modalities, size)
        for name in self.modalities:  # pop: each modality's float32 volumes are freed once stored as float16
            reference = real_reference([v.to(device) for v in held_out.pop(name)],
                                       [v.to(device) for v in training.pop(name)], self.encoder.intensity_range)
            self.references[name] = reference.to("cpu")

    @staticmethod
    def record(metrics: MutableMapping[str, float], scores: Mapping[str, Mapping[str, float]]) -> None:
        """``metrics["<score>_<MOD>"]`` per modality and ``metrics["<score>"]``, the mean over modalities, from
        ``scores`` = {modality name: :meth:`scores`}."""
        for name, values in scores.items():
            for key, value in values.items():
                metrics[f"{key}_{name}"] = value
        for key in next(iter(scores.values()), {}):
            metrics[key] = sum(values[key] for values in scores.values()) / len(scores)


class ScoredSamplesHandler:
    """After each evaluation, ``num_samples`` samples per modality (:meth:`sample`, a family's), their scores
    (:class:`SampleScorer`) in ``engine.state.metrics`` and their mid slices in TensorBoard (one row per sample).

    Args:
        modalities: modalities to sample (names or indices).
        encoder, held_out_cases, training_cases, memorised_below: as :class:`SampleScorer`.
        num_samples: samples per modality, >= 2 (diversity needs pairs).
        log_dir: TensorBoard directory for the mid slices, None for metrics only; tag: tag prefix (the modality is
            appended).
        enabled: False attaches nothing, so the evaluation reports its loss alone (a bundle's
            ``sample_during_validation`` false).
    """

    def __init__(self, modalities: Sequence[str | int], encoder, held_out_cases: Sequence[Mapping],
                 training_cases: Sequence[Mapping], num_samples: int, memorised_below: float = MEMORISED_BELOW,
                 log_dir: str | None = None, tag: str = "val/samples", enabled: bool = True) -> None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to measure diversity between samples, got {num_samples}")
        self.modalities = [modality_name(modality_index(m)) for m in modalities]
        self.num_samples, self.tag = int(num_samples), tag
        self.enabled = bool_setting("enabled", enabled)  # a config's "false" is a string, which bool() counts as true
        self.scorer = SampleScorer(encoder, held_out_cases, training_cases, self.modalities, memorised_below)
        self._slices = MidSliceWriter(log_dir)

    def sample(self, modality: str) -> list[torch.Tensor]:
        """The ``num_samples`` volumes (each (1, D, H, W)) of ``modality``, the same seeds every evaluation."""
        raise NotImplementedError

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scores = {}
        for name in self.modalities:
            samples = self.sample(name)
            scores[name] = self.scorer.scores(name, samples)
            self._slices.write(f"{self.tag}_{name}", samples, engine.state.epoch)
        SampleScorer.record(engine.state.metrics, scores)
