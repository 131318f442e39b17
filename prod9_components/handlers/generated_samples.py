"""Label-conditional samples at every evaluation: mid slices to TensorBoard and how diverse they are."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
from ignite.engine import Engine, Events
from torch import nn

from prod9_components.data.modalities import modality_name
from prod9_components.engines.maskgit_generation import sample_volumes
from prod9_components.handlers.tensorboard_images import MidSliceWriter
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.metrics.image_quality import ms_ssim
from prod9_components.networks.export import unwrap


class GeneratedSamplesHandler:
    """After each evaluation, sample ``num_samples`` volumes per modality, score their diversity, log mid slices.

    Diversity is the MS-SSIM between every pair of samples of one modality (seeds ``seed``, ``seed + 1``, ...; the
    same every epoch, so epochs compare): 1 means the samples are identical (mode collapse), lower is more diverse.
    It is stored as ``engine.state.metrics["sample_ms_ssim_<MOD>"]`` and, averaged over modalities,
    ``"sample_ms_ssim"``, so metrics handlers that run after this one (``MetricsJSONWriter``) report it.

    Args:
        network: the transformer (possibly DDP-wrapped); autoencoder: the stage-1 model that decodes its tokens.
        sampler: a ``MaskGiTSampler``.
        modalities: modalities to sample (names or indices).
        token_grid: (d, h, w) token grid of each sample; volume_grid: the training volume grid (see
            :func:`~prod9_components.engines.maskgit_generation.sample_volumes`).
        num_samples: samples per modality, >= 2 (diversity needs pairs).
        seed: seed of the first sample.
        sw_config: sliding window for decoding.
        log_dir: TensorBoard directory for the mid slices (one row per sample), None for metrics only.
        tag: TensorBoard tag prefix; the modality is appended.
    """

    def __init__(self, network: nn.Module, autoencoder: nn.Module, sampler, modalities: Sequence[str | int],
                 token_grid: Sequence[int], volume_grid: Sequence[int] | None = None, num_samples: int = 2,
                 seed: int = 0, sw_config: SlidingWindowConfig | None = None, log_dir: str | None = None,
                 tag: str = "val/samples") -> None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to measure diversity between samples, got {num_samples}")
        self.network, self.autoencoder, self.sampler = network, autoencoder, sampler
        self.modalities = [modality_name(m) for m in modalities]
        self.token_grid, self.volume_grid = list(token_grid), volume_grid
        self.num_samples, self.seed, self.sw_config = int(num_samples), int(seed), sw_config
        self.log_dir, self.tag = log_dir, tag
        self._slices = MidSliceWriter(log_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        network = unwrap(self.network)
        device = next(network.parameters()).device
        scores = []
        for modality in self.modalities:
            samples = list(sample_volumes(network, self.autoencoder, self.sampler, modality, self.num_samples,
                                          self.token_grid, self.seed, self.sw_config, device, self.volume_grid))
            pairs = [ms_ssim(a[None], b[None]) for a, b in combinations(samples, 2)]
            score = float(torch.cat(pairs).mean())
            engine.state.metrics[f"sample_ms_ssim_{modality}"] = score
            scores.append(score)
            self._slices.write(f"{self.tag}_{modality}", samples, engine.state.epoch)
        engine.state.metrics["sample_ms_ssim"] = sum(scores) / len(scores)
