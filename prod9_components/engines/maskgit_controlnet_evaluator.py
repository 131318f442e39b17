"""Ignite evaluator for the MaskGiT ControlNet: the stage-2 scores plus what the tumour mask does to samples."""

from __future__ import annotations

import torch

from prod9_components.engines.maskgit_evaluator import MaskGiTEvaluator
from prod9_components.metrics.tumour import control_scores, segmentation_scores
from prod9_components.networks.export import unwrap
from prod9_components.sampling.steps import check_count, check_scale


class MaskGiTControlNetEvaluator(MaskGiTEvaluator):
    """``val_loss`` / ``token_accuracy`` of base + control given each held-out case's mask, and per case and target
    modality two whole-volume samples from the same seed: one steered by the case's mask, one by an empty mask.

    Outputs for the metric handlers (see :mod:`prod9_components.metrics.tumour`): ``contrast_error_<label>`` |
    generated - real| tumour-vs-healthy contrast per BraTS label (NaN when the case lacks the label),
    ``contrast_<label>`` / ``real_contrast_<label>``, ``sensitivity`` (mean change inside the tumour minus in the
    healthy brain), ``change_inside`` / ``change_outside``; with a ``segmenter``, ``seg_dice_generated`` (its Dice on
    the mask-steered samples against the case's ``seg > 0``, the mean over ``segmentation_samples`` seeds) and
    ``seg_dice_real`` (on the real image of the same case and modality), NaN for a case without tumour; and ``pred`` /
    ``pred_without_mask`` / ``label`` / ``seg`` images for TensorBoard. Needs ``sampler``, ``autoencoder`` and
    ``control_mask_key``; the images of every modality and ``seg`` come from the batch, on the token grid times the
    downsampling.

    Args:
        segmenter: segment-the-synthetic (DESIGN §9): an object with ``predict(images (B, 1, D, H, W), modalities
            (B,)) -> (B, 1, D, H, W) bool``, e.g. a
            :class:`~prod9_components.engines.tumour_segmenter.CachedTumourSegmenter`; None: no ``seg_dice_*``.
        conditioning_scale: the control branch's multiplier in the samples (1: as trained); ``val_loss`` and
            ``token_accuracy`` are the training objective's, always at 1.
        segmentation_samples: mask-steered samples per case and modality that the segmenter scores (other seeds
            after the first; ``seg_dice_generated`` is their mean): a small tumour in one sample is a coin toss.
        the rest: as :class:`~prod9_components.engines.maskgit_evaluator.MaskGiTEvaluator`.
    """

    def __init__(self, *args, segmenter: object | None = None, conditioning_scale: float = 1.0,
                 segmentation_samples: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.segmenter = segmenter
        self.conditioning_scale = check_scale("conditioning_scale", conditioning_scale)
        self.segmentation_samples = check_count("segmentation_samples", segmentation_samples)

    def _generate(self, batchdata: dict, inputs: dict, generator: torch.Generator) -> dict:
        if self.sampler is None or self.autoencoder is None:
            return {}
        device = inputs["target_tokens"].device
        network = unwrap(self.network)
        seg = batchdata[self.control_mask_key].to(device)[inputs["rows"], 0].long()  # (B', D, H, W)
        seed = int(torch.randint(2**62, (1,), generator=generator))

        def sample(mask: torch.Tensor, seed: int = seed) -> torch.Tensor:  # one seed: the same noise with and without
            grid = inputs["target_tokens"].shape[1:]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                control = ({"mask_embedding": network.encode_mask(mask, grid)}  # once, not every step
                           if network.mask_encoder is not None else {})
                tokens = self.sampler.sample(network, inputs["target_tokens"].shape, inputs["target_label"],
                                             inputs["source_tokens"], inputs["source_labels"],
                                             generator=torch.Generator().manual_seed(seed),
                                             model_kwargs={**control, "conditioning_scale": self.conditioning_scale})
            return self.decode(tokens)

        pred, without = sample(seg), sample(torch.zeros_like(seg))
        label = self.images(batchdata, device)[inputs["rows"], inputs["target_label"]].unsqueeze(1)
        output = {"pred": pred, "pred_without_mask": without, "label": label, "seg": seg[:, None].float() / 3}
        output.update(control_scores(pred, without, label, seg))
        if self.segmenter is not None:
            modalities = inputs["target_label"]
            seeds = [int(torch.randint(2**62, (1,), generator=generator)) for _ in range(self.segmentation_samples - 1)]
            found = [self.segmenter.predict(image, modalities) for image in (pred, *(sample(seg, s) for s in seeds))]
            output.update(segmentation_scores(found, self.segmenter.predict(label, modalities), seg))
        return output
