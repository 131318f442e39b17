"""Diffusion samples at every evaluation: mid slices to TensorBoard and their scores against real volumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from monai.networks.schedulers import RFlowScheduler
from torch import nn

from prod9_components.generation.maisi import sample_volumes
from prod9_components.handlers.sample_scorer import ScoredSamplesHandler
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.metrics.generation import MEMORISED_BELOW

__all__ = ["MaisiSamplesHandler"]


class MaisiSamplesHandler(ScoredSamplesHandler):
    """After each evaluation, sample ``num_samples`` volumes per modality, log mid slices and score them.

    Scores (:class:`~prod9_components.handlers.sample_scorer.SampleScorer`, the same for the MaskGiT samples), in
    ``engine.state.metrics`` so metric writers that run later report them, as ``<score>_<MOD>`` and their means over
    modalities ``<score>``: ``brain_dice``, ``intensity_w1`` and ``gradient_w1`` (Wasserstein-1 distances between the
    generated and the real held-out voxel intensities and gradient magnitudes), ``sample_ms_ssim``,
    ``nearest_training_distance``, ``memorised_fraction``, and beside them the same scores of real held-out cases,
    ``real_*`` (:mod:`prod9_components.metrics.generation`). The same seeds every epoch.

    Args:
        network: the velocity model (the EMA copy); vae: the KL-VAE that decodes its latents.
        scheduler: ``RFlowScheduler``; num_steps / guidance_scale: sampling settings.
        modalities: modalities to sample (names or indices).
        encoder: the VAE's ``CaseLatentEncoder`` (the preprocessing of the real cases).
        held_out_cases: real cases of the evaluated split; training_cases: real cases of the training split.
        latent_size: (d, h, w) of each sample; scale_factor: the latent scale the model was trained with.
        num_samples: samples per modality, >= 2 (diversity needs pairs); seed: seed of the first.
        sw_config: sliding window for decoding; intensity_range: the VAE's training intensity range.
        memorised_below: see :func:`~prod9_components.metrics.generation.memorised`.
        log_dir: TensorBoard directory for the mid slices, None for metrics only; tag: tag prefix.
        enabled: False attaches nothing (a validation on the loss alone).
    """

    def __init__(self, network: nn.Module, vae: nn.Module, scheduler: RFlowScheduler, modalities: Sequence[str | int],
                 encoder, held_out_cases: Sequence[Mapping], training_cases: Sequence[Mapping],
                 latent_size: Sequence[int], scale_factor: float, num_samples: int = 2, num_steps: int = 10,
                 guidance_scale: float = 1.0, seed: int = 0, sw_config: SlidingWindowConfig | None = None,
                 intensity_range: Sequence[float] = (0.0, 1.0), memorised_below: float = MEMORISED_BELOW,
                 log_dir: str | None = None, tag: str = "val/samples", enabled: bool = True) -> None:
        super().__init__(modalities, encoder, held_out_cases, training_cases, num_samples, memorised_below, log_dir,
                         tag, enabled)
        self.network, self.vae, self.scheduler = network, vae, scheduler
        self.latent_size, self.scale_factor = list(latent_size), float(scale_factor)
        self.num_steps, self.guidance_scale = int(num_steps), guidance_scale
        self.seed, self.sw_config, self.intensity_range = int(seed), sw_config, intensity_range

    def sample(self, modality: str) -> list:
        device = next(self.network.parameters()).device
        return list(sample_volumes(self.network, self.vae, self.scheduler, modality, self.num_samples,
                                   self.latent_size, self.scale_factor, self.num_steps, self.guidance_scale, self.seed,
                                   self.sw_config, device, self.intensity_range))
