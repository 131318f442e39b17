"""Diffusion samples at every evaluation: mid slices to TensorBoard and their distance to real volumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.networks.schedulers import RFlowScheduler
from torch import nn

from prod9_components.data.modalities import MODALITIES, modality_index, modality_name
from prod9_components.data.token_cache import pad_or_crop
from prod9_components.engines.diffusion_generation import sample_volumes
from prod9_components.handlers.tensorboard_images import MidSliceWriter
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.metrics.distribution_distance import intensity_distances


def real_volumes(encoder, cases: Sequence[Mapping], modalities: Sequence[str | int], size: Sequence[int],
                 ) -> dict[str, list[torch.Tensor]]:
    """The preprocessed real volumes of ``cases`` per modality name, each (1, *size): centre-padded with the
    background (the low end of the intensity range) or cropped to the generated grid, so both sides frame the
    brain alike.

    Args:
        encoder: a :class:`~prod9_components.engines.case_encoder.CaseEncoder` (its preprocessing).
    """
    volumes: dict[str, list[torch.Tensor]] = {modality_name(modality_index(m)): [] for m in modalities}
    for case in cases:
        data = encoder.preprocess(case)
        for name in volumes:
            image = data[MODALITIES[modality_index(name)]].as_tensor().float()
            volumes[name].append(pad_or_crop(image, size, encoder.intensity_range[0])[0])
    return volumes


class DiffusionSamplesHandler:
    """After each evaluation, sample ``num_samples`` volumes per modality, log mid slices and score them.

    Scores (``engine.state.metrics``, so metric writers that run later report them): ``intensity_w1_<MOD>`` and
    ``gradient_w1_<MOD>`` - Wasserstein-1 distances between the generated and the real voxel intensities and
    gradient magnitudes (:mod:`prod9_components.metrics.distribution_distance`) - and their means over modalities,
    ``intensity_w1`` and ``gradient_w1``. Lower is closer to the real data. The same seeds every epoch.

    Args:
        network: the velocity model (the EMA copy); vae: the KL-VAE that decodes its latents.
        scheduler: ``RFlowScheduler``; num_steps / guidance_scale: sampling settings.
        reference: real volumes per modality name (:func:`real_volumes`), padded to the generated grid.
        latent_size: (d, h, w) of each sample; scale_factor: the latent scale the model was trained with.
        num_samples: samples per modality; seed: seed of the first.
        sw_config: sliding window for decoding; intensity_range: the VAE's training intensity range.
        log_dir: TensorBoard directory for the mid slices, None for metrics only; tag: tag prefix.
    """

    def __init__(self, network: nn.Module, vae: nn.Module, scheduler: RFlowScheduler,
                 reference: Mapping[str, Sequence[torch.Tensor]], latent_size: Sequence[int], scale_factor: float,
                 num_samples: int = 1, num_steps: int = 10, guidance_scale: float = 1.0, seed: int = 0,
                 sw_config: SlidingWindowConfig | None = None, intensity_range: Sequence[float] = (0.0, 1.0),
                 log_dir: str | None = None, tag: str = "val/samples") -> None:
        self.network, self.vae, self.scheduler, self.reference = network, vae, scheduler, dict(reference)
        self.latent_size, self.scale_factor = list(latent_size), float(scale_factor)
        self.num_samples, self.num_steps, self.guidance_scale = int(num_samples), int(num_steps), guidance_scale
        self.seed, self.sw_config, self.intensity_range = int(seed), sw_config, intensity_range
        self.log_dir, self.tag = log_dir, tag
        self._slices = MidSliceWriter(log_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        device = next(self.network.parameters()).device
        scores: dict[str, list[float]] = {"intensity_w1": [], "gradient_w1": []}
        for name, real in self.reference.items():
            samples = list(sample_volumes(self.network, self.vae, self.scheduler, name, self.num_samples,
                                          self.latent_size, self.scale_factor, self.num_steps, self.guidance_scale,
                                          self.seed, self.sw_config, device, self.intensity_range))
            for metric, value in intensity_distances([s.cpu() for s in samples], real).items():
                engine.state.metrics[f"{metric}_{name}"] = value
                scores[metric].append(value)
            self._slices.write(f"{self.tag}_{name}", samples, engine.state.epoch)
        for metric, values in scores.items():
            engine.state.metrics[metric] = sum(values) / len(values)
