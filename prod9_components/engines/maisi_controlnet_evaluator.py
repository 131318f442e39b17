"""Ignite evaluator of a MAISI ControlNet: the velocity loss under control, plus what the control does to samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from prod9_components.engines.maisi_diffusion_evaluator import RectifiedFlowEvaluator
from prod9_components.engines.translation_baselines import baseline_predictions
from prod9_components.generation.decode import decode_latent
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.metrics.tumour import control_scores, segmentation_scores
from prod9_components.networks.export import unwrap
from prod9_components.sampling.rectified_flow import sample_rectified_flow
from prod9_components.sampling.steps import check_count, check_num_steps, check_scale


class MaisiControlNetEvaluator(RectifiedFlowEvaluator):
    """``val_loss`` of base + control on every held-out item and, with a ``vae``, one whole volume per item sampled
    from seeded noise under the item's conditions and decoded, for the metric handlers:

    - always: ``pred`` (B, 1, D, H, W) the sample, ``label`` the real target image (batch ``"image"``), ``tumour``
      ({0, 1}) and ``seg`` (labels / 3) for region metrics and TensorBoard;
    - with a source image (``control_image``): ``source`` (the copy-the-source baseline), ``histogram_source`` and
      ``regression_source`` (the other translation baselines: the source histogram-matched to the target modality's
      training intensities, and a polynomial of the source fitted on the training split) and ``roundtrip`` (the VAE
      decode of the real target's cached latent: the upper bound), so PSNR/SSIM of each against ``label`` compare the
      translation BraSyn style (:func:`~prod9_components.metrics.image_quality.translation_metrics`);
    - with a mask (``control_mask``): ``pred_without_mask`` (the same noise, an empty mask) and every
      :data:`~prod9_components.metrics.tumour.CONTROL_METRICS` score, the keys MaskGiT stage 3 reports, and with a
      ``segmenter`` ``seg_dice_generated`` / ``seg_dice_real``: its Dice on the sample (the mean over
      ``segmentation_samples`` of them) and on the real target image against the conditioning mask's ``seg > 0`` (NaN
      for a case without tumour).

    Args:
        vae: the stage-1 VAE (None: ``val_loss`` only); scale_factor: the latents' scale.
        num_steps: Euler steps of each sample; sw_config / intensity_range: as the VAE decode's.
        conditioning_scale: the ControlNet residuals' multiplier in the samples (1: as trained); ``val_loss`` is the
            training objective's, always at 1.
        segmentation_samples: mask-steered samples per case that the segmenter scores (other noise after the first;
            ``seg_dice_generated`` is their mean): a small tumour in one sample is a coin toss.
        translation_baselines: target modality index -> fitted
            :class:`~prod9_components.metrics.baselines.TranslationBaselines`
            (:func:`~prod9_components.engines.translation_baselines.fit_translation_baselines` on the training
            split); required when the network reads a source image and a ``vae`` is given.
        segmenter: segment-the-synthetic (DESIGN §9): an object with ``predict(images (B, 1, D, H, W), modalities
            (B,)) -> (B, 1, D, H, W) bool``, e.g. a
            :class:`~prod9_components.engines.tumour_segmenter.CachedTumourSegmenter`; None: no ``seg_dice_*``.
        the rest: as :class:`~prod9_components.engines.maisi_diffusion_evaluator.RectifiedFlowEvaluator`.
    """

    def __init__(self, *args, vae: nn.Module | None = None, scale_factor: float = 1.0, num_steps: int = 10,
                 sw_config: SlidingWindowConfig | None = None, intensity_range: Sequence[float] = (0.0, 1.0),
                 translation_baselines: Mapping | None = None, segmenter: object | None = None,
                 conditioning_scale: float = 1.0, segmentation_samples: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conditioning_scale = check_scale("conditioning_scale", conditioning_scale)
        self.segmentation_samples = check_count("segmentation_samples", segmentation_samples)
        self.vae, self.scale_factor = vae, float(scale_factor)
        self.num_steps = check_num_steps(num_steps, self.scheduler.num_train_timesteps)
        self.sw_config, self.intensity_range = sw_config, tuple(intensity_range)
        self.translation_baselines, self.segmenter = translation_baselines, segmenter
        if vae is not None and "control_image" in self.control_keys.values() and translation_baselines is None:
            raise ValueError("a ControlNet that reads a source image is scored against the translation baselines: "
                             "pass translation_baselines (fit_translation_baselines on the training split)")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, D, H, W) of scaled latents (B, C, d, h, w): one tiled decode of the batch."""
        return decode_latent(self.vae, latents, self.scale_factor, self.sw_config, self.intensity_range)

    def outputs(self, engine: MaisiControlNetEvaluator, batchdata: dict, generator: torch.Generator) -> dict:
        output = super().outputs(engine, batchdata, generator)
        if self.vae is None:
            return output
        device = engine.state.device
        latent = batchdata["latent"].to(device)
        labels = batchdata["label"].to(device).long()
        controls = self.controls(batchdata, device)
        network = unwrap(self.network)
        noise = torch.randn(latent.shape, generator=generator)  # the sample's noise: after the val_loss draws

        def sample(conditions: dict, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with engine.mode(network), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                sampled = sample_rectified_flow(network, self.scheduler, noise.to(latent), labels, self.num_steps,
                                                conditioning_scale=self.conditioning_scale, **conditions)
            return self.decode(sampled.float())

        real, seg = batchdata["image"].to(device).float(), batchdata["seg"].to(device)
        if "control_mask" in controls:
            # Every sample of these items in one batch: the mask-steered ones (the first from ``noise``, the rest for
            # the segmenter), then ``noise`` again under an empty mask. A batch of one runs these small grids' 3D
            # convolutions on PyTorch's native path instead of oneDNN's: two such calls of the demo's ControlNet took
            # 2.6x one call on both.
            noises = [noise] + [torch.randn(latent.shape, generator=generator)
                                for _ in range(self.segmentation_samples - 1 if self.segmenter is not None else 0)]
            empty = {**controls, "control_mask": torch.zeros_like(controls["control_mask"])}
            both = {key: torch.cat([value] * len(noises) + [empty[key]]) for key, value in controls.items()}
            *steered, without = sample(both, torch.cat([*noises, noise]), labels.repeat(len(noises) + 1)).split(
                latent.shape[0])
            pred = steered[0]
        else:
            pred = sample(controls, noise, labels)
        output.update(pred=pred, label=real, tumour=(seg > 0).float(), seg=seg.float() / 3)
        if "control_image" in controls:
            source = controls["control_image"].float()
            output.update(source=source, roundtrip=self.decode(latent),
                          **baseline_predictions(self.translation_baselines, source, labels))
        if "control_mask" in controls:
            output.update(pred_without_mask=without, **control_scores(pred, without, real, seg, self.intensity_range))
            if self.segmenter is not None:
                found = [self.segmenter.predict(image, labels) for image in steered]
                output.update(segmentation_scores(found, self.segmenter.predict(real, labels), seg))
        return output
