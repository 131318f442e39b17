"""MaskGiT label-conditional samples at every evaluation: mid slices to TensorBoard and their scores against real
volumes (:class:`~prod9_components.handlers.sample_scorer.SampleScorer`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from prod9_components.generation.maskgit import sample_volumes
from prod9_components.handlers.sample_scorer import ScoredSamplesHandler
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.metrics.generation import MEMORISED_BELOW
from prod9_components.networks.export import unwrap

__all__ = ["MaskGiTSamplesHandler"]


class MaskGiTSamplesHandler(ScoredSamplesHandler):
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
        enabled: False attaches nothing (a validation on the loss alone).
    """

    def __init__(self, network: nn.Module, autoencoder: nn.Module, sampler, modalities: Sequence[str | int],
                 token_grid: Sequence[int], encoder, held_out_cases: Sequence[Mapping],
                 training_cases: Sequence[Mapping], volume_grid: Sequence[int] | None = None, num_samples: int = 2,
                 seed: int = 0, sw_config: SlidingWindowConfig | None = None,
                 memorised_below: float = MEMORISED_BELOW, log_dir: str | None = None,
                 tag: str = "val/samples", enabled: bool = True) -> None:
        super().__init__(modalities, encoder, held_out_cases, training_cases, num_samples, memorised_below, log_dir,
                         tag, enabled)
        self.network, self.autoencoder, self.sampler = network, autoencoder, sampler
        self.token_grid, self.volume_grid = list(token_grid), volume_grid
        self.seed, self.sw_config = int(seed), sw_config

    def sample(self, modality: str) -> list:
        network = unwrap(self.network)
        device = next(network.parameters()).device
        return list(sample_volumes(network, self.autoencoder, self.sampler, modality, self.num_samples,
                                   self.token_grid, self.seed, self.sw_config, device, self.volume_grid))
