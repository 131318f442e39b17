"""Label-conditional samples at every evaluation: mid slices to TensorBoard and their scores against real volumes.

:class:`SampleScorer` (real reference volumes, scores, ``engine.state.metrics`` keys) serves both generation handlers,
this one (MaskGiT) and :class:`~prod9_components.handlers.diffusion_samples.DiffusionSamplesHandler` (MAISI).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

from prod9_components.data.modalities import MODALITIES, modality_index, modality_name
from prod9_components.data.token_cache import pad_or_crop
from prod9_components.generation.maskgit import sample_volumes
from prod9_components.handlers.tensorboard_images import MidSliceWriter
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.metrics.generation import MEMORISED_BELOW, RealReference, generation_scores, real_reference
from prod9_components.networks.export import unwrap

__all__ = ["GeneratedSamplesHandler", "SampleScorer", "real_volumes"]


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


class GeneratedSamplesHandler:
    """After each evaluation, sample ``num_samples`` volumes per modality, score them against real cases and log
    mid slices.

    The scores (:class:`SampleScorer`; the same seeds ``seed``, ``seed + 1``, ... every epoch, so epochs compare) go
    to ``engine.state.metrics`` as ``<score>_<MOD>`` and, averaged over modalities, ``<score>``, so the metric writers
    that run after this handler (TensorBoard, ``MetricsJSONWriter``) report them: ``brain_dice``, ``intensity_w1``,
    ``gradient_w1``, ``sample_ms_ssim`` (diversity: MS-SSIM between samples, 1 = mode collapse),
    ``nearest_training_distance``, ``memorised_fraction`` and beside them the same scores of real held-out cases,
    ``real_*`` (:mod:`prod9_components.metrics.generation`).

    Args:
        network: the transformer (possibly DDP-wrapped); autoencoder: the stage-1 model that decodes its tokens.
        sampler: a ``MaskGiTSampler``.
        modalities: modalities to sample (names or indices).
        token_grid: (d, h, w) token grid of each sample; volume_grid: the training volume grid (see
            :func:`~prod9_components.generation.maskgit.sample_volumes`).
        encoder: the stage-1 tokenizer (a ``CaseEncoder``: the preprocessing of the real cases).
        held_out_cases: real cases of the evaluated split; training_cases: real cases of the training split.
        num_samples: samples per modality, >= 2 (diversity needs pairs).
        seed: seed of the first sample.
        sw_config: sliding window for decoding.
        memorised_below: see :func:`~prod9_components.metrics.generation.memorised`.
        log_dir: TensorBoard directory for the mid slices (one row per sample), None for metrics only.
        tag: TensorBoard tag prefix; the modality is appended.
    """

    def __init__(self, network: nn.Module, autoencoder: nn.Module, sampler, modalities: Sequence[str | int],
                 token_grid: Sequence[int], encoder, held_out_cases: Sequence[Mapping],
                 training_cases: Sequence[Mapping], volume_grid: Sequence[int] | None = None, num_samples: int = 2,
                 seed: int = 0, sw_config: SlidingWindowConfig | None = None,
                 memorised_below: float = MEMORISED_BELOW, log_dir: str | None = None,
                 tag: str = "val/samples") -> None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to measure diversity between samples, got {num_samples}")
        self.network, self.autoencoder, self.sampler = network, autoencoder, sampler
        self.modalities = [modality_name(m) for m in modalities]
        self.token_grid, self.volume_grid = list(token_grid), volume_grid
        self.num_samples, self.seed, self.sw_config = int(num_samples), int(seed), sw_config
        self.scorer = SampleScorer(encoder, held_out_cases, training_cases, self.modalities, memorised_below)
        self.log_dir, self.tag = log_dir, tag
        self._slices = MidSliceWriter(log_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        network = unwrap(self.network)
        device = next(network.parameters()).device
        scores = {}
        for modality in self.modalities:
            samples = list(sample_volumes(network, self.autoencoder, self.sampler, modality, self.num_samples,
                                          self.token_grid, self.seed, self.sw_config, device, self.volume_grid))
            scores[modality] = self.scorer.scores(modality, samples)
            self._slices.write(f"{self.tag}_{modality}", samples, engine.state.epoch)
        SampleScorer.record(engine.state.metrics, scores)
