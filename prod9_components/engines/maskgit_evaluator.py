"""Ignite evaluator for the MaskGiT transformer.

Every held-out case gives ``val_loss`` and ``token_accuracy`` at masks drawn from the training schedule with a fixed
seed (so epochs compare). With a sampler and the stage-1 autoencoder it also translates whole volumes, the BraSyn
way: sample the target modality from the source tokens (or take its expected codes), decode it, and hand ``pred``
(translation), ``label`` (the real target image), ``roundtrip`` (stage-1 round trip of the real target: the upper
bound), ``source`` (the source image itself: the copy baseline), ``histogram_source`` / ``regression_source`` (the
translation baselines fitted on the training split, when given) and ``tumour`` (mask) to the metric handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from torch import nn

from prod9_components.data.settings import bool_setting
from prod9_components.data.modalities import MODALITIES
from prod9_components.data.sharding import validation_generator
from prod9_components.engines.base_trainer import cuda_amp
from prod9_components.engines.maskgit_context import TokenContextBuilder, control_inputs
from prod9_components.engines.translation_baselines import baseline_predictions
from prod9_components.generation.decode import decode_codes, decode_tokens
from prod9_components.inference.sliding_window import SlidingWindowConfig
from prod9_components.losses.masked_token import masked_token_loss
from prod9_components.networks.export import unwrap
from prod9_components.sampling.schedules import sample_training_mask


class MaskGiTEvaluator(Evaluator):
    """Score a transformer on cached token grids (and, optionally, whole-volume translations).

    Args:
        device: where the networks live.
        val_data_loader: yields ``"tokens"`` (B, 4, d, h, w); for translation also the preprocessed images under
            the modality keys (``"t1"``, ...: (B, 1, D, H, W)) and ``"seg"``, on the same grid as the tokens.
        network: the transformer (possibly DDP-wrapped).
        context_builder: the same builder the trainer uses (evaluation expands every target modality).
        schedule: masking schedule for the validation masks.
        seed: seed of the validation masks and samples.
        sampler: a ``MaskGiTSampler``; with ``autoencoder`` it turns on translation metrics.
        autoencoder: the stage-1 FSQ autoencoder that decodes tokens.
        sw_config: sliding window for decoding.
        epoch_length / key_val_metric / additional_metrics / val_handlers: as in MONAI's ``Evaluator``.
        amp: bfloat16 autocast on CUDA only.
        control_mask_key: batch key of the tumour mask a ControlNet is steered by (``"seg"``), else None.
        translation_baselines: target modality index -> fitted
            :class:`~prod9_components.metrics.baselines.TranslationBaselines` (see
            :func:`~prod9_components.engines.translation_baselines.fit_translation_baselines`); translation then also
            outputs ``histogram_source`` and ``regression_source``.
        expected_codes: translate to the code each token is expected to take (``sampler.expected_codes``) instead
            of a sample; ``sampled_token_accuracy`` then scores the nearest grid codes.
    """

    def __init__(self, device: torch.device | str, val_data_loader: Iterable, network: nn.Module,
                 context_builder: TokenContextBuilder, schedule: str = "cosine", seed: int = 0,
                 sampler: object | None = None, autoencoder: nn.Module | None = None,
                 sw_config: SlidingWindowConfig | None = None, epoch_length: int | None = None,
                 key_val_metric: dict | None = None, additional_metrics: dict | None = None,
                 metric_cmp_fn: Callable | None = None, val_handlers: Sequence | None = None,
                 amp: bool = False, control_mask_key: str | None = None,
                 translation_baselines: dict | None = None, expected_codes: bool = False) -> None:
        amp = cuda_amp(amp, device)
        kwargs = {"metric_cmp_fn": metric_cmp_fn} if metric_cmp_fn is not None else {}
        super().__init__(device=device, val_data_loader=val_data_loader, epoch_length=epoch_length,
                         key_val_metric=key_val_metric, additional_metrics=additional_metrics,
                         val_handlers=val_handlers, amp=amp, decollate=False, **kwargs)
        self.network = network
        self.context_builder = context_builder
        self.schedule = schedule
        self.seed = seed
        self.sampler = sampler
        self.autoencoder = autoencoder
        self.sw_config = sw_config or SlidingWindowConfig()
        self.control_mask_key = control_mask_key
        self.translation_baselines = translation_baselines
        self.expected_codes = bool_setting("expected_codes", expected_codes)

    @property
    def translates(self) -> bool:
        return self.sampler is not None and self.autoencoder is not None and self.context_builder.in_context

    def _iteration(self, engine: MaskGiTEvaluator, batchdata: dict) -> dict:
        device = engine.state.device
        tokens = batchdata["tokens"].to(device)
        generator = validation_generator(self.seed, engine.state.iteration, batchdata)
        inputs = self.context_builder(tokens, train=False)
        target = inputs["target_tokens"]
        mask = sample_training_mask(target.shape, self.schedule, generator=generator).to(device)
        network = unwrap(self.network)
        with engine.mode(network), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            logits = network(target.masked_fill(mask, network.mask_token_id), inputs["target_label"],
                             inputs["source_tokens"], inputs["source_labels"],
                             **control_inputs(batchdata, inputs["rows"], self.control_mask_key))
        losses = masked_token_loss(logits.float(), target, mask)
        output = {"val_loss": losses["loss"], "token_accuracy": losses["token_accuracy"]}
        output.update(self._generate(batchdata, inputs, generator))
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _generate(self, batchdata: dict, inputs: dict, generator: torch.Generator) -> dict:
        """Outputs of sampled volumes for the metric handlers: in-context translations, or nothing."""
        return self._translate(batchdata, inputs, generator) if self.translates else {}

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, D, H, W) of token grids (B, d, h, w), through the stage-1 sliding window."""
        return decode_tokens(self.autoencoder, tokens, self.sw_config)

    @staticmethod
    def images(batchdata: dict, device: torch.device) -> torch.Tensor:
        """The preprocessed images of every modality (B, 4, D, H, W), modality order T1, T1ce, T2, FLAIR."""
        return torch.cat([batchdata[m] for m in MODALITIES], dim=1).to(device).float()

    def _translate(self, batchdata: dict, inputs: dict, generator: torch.Generator) -> dict:
        device = inputs["target_tokens"].device
        network = unwrap(self.network)
        context = (inputs["target_tokens"].shape, inputs["target_label"], inputs["source_tokens"],
                   inputs["source_labels"])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            if self.expected_codes:
                fsq = self.autoencoder.fsq
                codes = self.sampler.expected_codes(network, fsq.codebook().to(device), *context)
                sampled, pred = fsq.quantize(codes), decode_codes(self.autoencoder, codes, self.sw_config)
            else:
                sampled = self.sampler.sample(network, *context, generator=generator)
                pred = self.decode(sampled)
        roundtrip = self.decode(inputs["target_tokens"])
        images = self.images(batchdata, device)
        rows, first_source = inputs["rows"], inputs["source_labels"][:, 0]
        label = images[rows, inputs["target_label"]].unsqueeze(1)
        output = {
            "pred": pred, "label": label, "roundtrip": roundtrip,
            "source": images[rows, first_source].unsqueeze(1),
            "tumour": (batchdata["seg"].to(device)[rows] > 0).float(),
            "sampled_token_accuracy": (sampled == inputs["target_tokens"]).float().mean(),
        }
        if self.translation_baselines is not None:
            sources = images[rows][:, self.context_builder.sources]  # every source: evaluation uses all of them
            output.update(baseline_predictions(self.translation_baselines, sources, inputs["target_label"]))
        return output
