"""MAISI ControlNet: zero-initialised residuals leave the base unchanged, the base stays frozen, every condition type
builds, trains a step and generates; its evaluator scores segment-the-synthetic and the translation baselines."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets.controlnet import ControlNetConditioningEmbedding
from monai.networks.schedulers import RFlowScheduler

from prod9_components.engines.maisi_diffusion_trainer import RectifiedFlowTrainer
from prod9_components.networks.maisi_controlnet import CONDITION_TYPES, MaisiControlNet, ReusedConditioningEmbedding
from prod9_components.networks.maisi_diffusion import MaisiDiffusionUNet
from prod9_components.sampling.rectified_flow import sample_rectified_flow

GRID = (4, 4, 4)  # latent grid; images are 4x larger


def trained_like_base() -> MaisiDiffusionUNet:
    torch.manual_seed(0)
    base = MaisiDiffusionUNet(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, True],
                              norm_num_groups=4, num_head_channels=4)
    with torch.no_grad():  # MONAI zero-initialises the output layer: give it weights, as training would
        for parameter in base.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return base.eval()


def inputs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(batch, 16, 16, 16, dtype=torch.int64)
    mask[:, 4:10, 4:10, 4:10] = 2
    mask[:, 6:8, 6:8, 6:8] = 3
    return {"x": torch.randn(batch, 4, *GRID, generator=g), "timesteps": torch.tensor([300.0, 800.0][:batch]),
            "class_labels": torch.tensor([2, 1][:batch]), "control_mask": mask,
            "control_image": torch.rand(batch, 1, 16, 16, 16, generator=g)}


@pytest.mark.parametrize("condition_type", CONDITION_TYPES)
def test_zero_initialised_controlnet_leaves_the_base_prediction_unchanged(condition_type):
    base = trained_like_base()
    net = MaisiControlNet.from_base(base, condition_type=condition_type).eval()
    data = inputs()
    with torch.no_grad():
        expected = base(data["x"], data["timesteps"], class_labels=data["class_labels"])
        condition = net.condition(data["x"], data["control_mask"], data["control_image"])
        down, mid = net.controlnet(data["x"], data["timesteps"], condition, class_labels=data["class_labels"])
        assert all(not r.any() for r in [*down, mid])  # the injected residuals are exactly zero
        # so the velocity is the base's (to float rounding: the base's convolutions run on new buffers)
        assert (net(**data) - expected).abs().max() < 1e-5
    # the ControlNet's encoder starts as the base's
    assert torch.equal(net.controlnet.conv_in.conv.weight, base.conv_in.conv.weight)


@pytest.mark.parametrize("condition_type", CONDITION_TYPES)
def test_training_moves_the_controlnet_only_and_generation_uses_the_condition(condition_type):
    """Three steps of the stage-3 trainer (batch conditions through control_keys, AdamW with weight decay over the
    trainable parameters, the contrastive loss on for mask types) leave the base bit-identical."""
    base = trained_like_base()
    net = MaisiControlNet.from_base(base, condition_type=condition_type)
    frozen = {k: v.clone() for k, v in net.base.state_dict().items()}
    control_before = {k: v.clone() for k, v in net.controlnet.state_dict().items()}
    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False)
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    assert all(not p.requires_grad for p in net.base.parameters())
    data = inputs()
    latent = torch.randn(2, 4, *GRID, generator=torch.Generator().manual_seed(2))
    batch = {"latent": latent, "label": data["class_labels"], "seg": data["control_mask"][:, None],
             "source": data["control_image"]}
    control_keys = {**({"seg": "control_mask"} if net.uses_mask else {}),
                    **({"source": "control_image"} if net.uses_image else {})}
    trainer = RectifiedFlowTrainer("cpu", 3, [batch], net, optimizer, scheduler, label_dropout=0.0,
                                   control_keys=control_keys, contrastive_weight=1.0 if net.uses_mask else 0.0,
                                   tumour_weight=100.0 if net.uses_mask else 1.0)
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])
    if net.uses_mask:  # a 0.05 margin the untrained residuals cannot meet: the hinge is active
        assert 0.0 < float(trainer.state.output["contrastive_loss"]) <= 0.05
    assert all(torch.equal(frozen[k], v) for k, v in net.base.state_dict().items())  # bit for bit
    assert max(float((control_before[k] - v).abs().max()) for k, v in net.controlnet.state_dict().items()) > 1e-4
    # after training the residuals are no longer zero: the control changes the prediction
    net.eval()
    kwargs = {arg: batch[key] for key, arg in control_keys.items()}
    noise = torch.randn(2, 4, *GRID, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        controlled = sample_rectified_flow(net, scheduler, noise, data["class_labels"], 3, **kwargs)
        plain = sample_rectified_flow(net.base, scheduler, noise, data["class_labels"], 3)
    assert controlled.shape == noise.shape and (controlled - plain).abs().max() > 1e-4


def test_tumour_weight_needs_a_mask_condition_and_is_at_least_one():
    net = MaisiControlNet.from_base(trained_like_base(), condition_type="image+label")
    optimizer = torch.optim.AdamW(net.trainable_parameters())
    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False)
    with pytest.raises(ValueError, match="tumour_weight needs a mask condition"):
        RectifiedFlowTrainer("cpu", 1, [], net, optimizer, scheduler, control_keys={"source": "control_image"},
                             tumour_weight=10.0)
    for bad in (0.5, float("nan"), float("inf"), "abc", None):  # a flag's word fails in one line, not in float()
        with pytest.raises(ValueError, match=f"tumour_weight must be a finite number >= 1, got {bad!r}"):
            RectifiedFlowTrainer("cpu", 1, [], net, optimizer, scheduler, control_keys={"seg": "control_mask"},
                                 tumour_weight=bad)


def test_each_condition_type_reads_exactly_its_inputs():
    data = inputs(batch=1)
    for condition_type, needs in (("mask+label", "control_mask"), ("image+label", "control_image")):
        net = MaisiControlNet(trained_like_base().init_args, condition_type=condition_type)
        with pytest.raises(ValueError, match=needs):
            net(**{**data, needs: None})
    net = MaisiControlNet(trained_like_base().init_args, condition_type="mask+label")
    bad = data["control_mask"].clone()
    bad[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        net(**{**data, "control_mask": bad})
    with pytest.raises(ValueError, match=r"control_mask must be \(1, 16, 16, 16\)"):
        net(**{**data, "control_mask": data["control_mask"][:, :8]})
    with pytest.raises(ValueError, match="unknown control type 'depth'"):
        MaisiControlNet(trained_like_base().init_args, condition_type="depth")
    rebuilt = MaisiControlNet(**net.init_args)
    rebuilt.load_state_dict(net.state_dict())  # a checkpoint record rebuilds it from init_args


class BrightVoxels(torch.nn.Module):
    """A tumour 'segmenter' whose answer is known: tumour wherever the image is above 0.7."""

    def __init__(self) -> None:
        super().__init__()
        self.threshold = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] - self.threshold


def _evaluator_parts():
    from prod9_components.metrics.baselines import TranslationBaselines
    from prod9_components.networks.maisi_vae import MaisiVAE

    net = MaisiControlNet.from_base(trained_like_base(), condition_type="mask+image+label").eval()
    torch.manual_seed(0)
    vae = MaisiVAE(num_channels=[8, 16, 32], num_res_blocks=[1, 1, 1], norm_num_groups=4).eval()
    data = inputs(batch=1)
    seg = data["control_mask"][:, None]
    real = torch.full((1, 1, 16, 16, 16), 0.3)
    real[seg > 0] = 0.9  # the real T2's tumour is exactly the bright voxels: the segmenter finds it perfectly
    batch = {"latent": torch.randn(1, 4, *GRID, generator=torch.Generator().manual_seed(2)),
             "label": torch.tensor([2]), "seg": seg, "source": data["control_image"], "image": real}
    baselines = {2: TranslationBaselines(degree=1).fit([data["control_image"][0]], [real[0]])}
    return net, vae, batch, baselines


def test_evaluator_reports_segment_the_synthetic_and_the_translation_baselines(one_thread):
    """MaisiControlNetEvaluator (condition mask+image+label) with a segmenter whose answer is known and fitted translation baselines:
    ``seg_dice_real`` is exactly 1 (the real tumour is the bright voxels), ``seg_dice_generated`` is the Dice of the
    sample's bright voxels with the mask, their ratio is computed at the end, and the baselines' outputs are the fitted
    maps of the batch's source image."""
    from ignite.metrics import Average

    from prod9_components.engines.maisi_controlnet_evaluator import MaisiControlNetEvaluator
    from prod9_components.engines.tumour_segmenter import TumourSegmenter
    from prod9_components.metrics.image_quality import translation_metrics
    from prod9_components.metrics.tumour import control_metrics, segmentation_metrics

    net, vae, batch, baselines = _evaluator_parts()
    evaluator = MaisiControlNetEvaluator(
        "cpu", [batch], net, RFlowScheduler(1000, use_discrete_timesteps=False),
        control_keys={"seg": "control_mask", "source": "control_image"}, vae=vae, num_steps=2,
        translation_baselines=baselines, segmenter=TumourSegmenter(BrightVoxels(), roi_size=(16, 16, 16)),
        key_val_metric={"val_loss": Average(output_transform=lambda o: o["val_loss"])},
        additional_metrics={**translation_metrics(), **control_metrics(), **segmentation_metrics()})
    evaluator.run()
    output, metrics = evaluator.state.output, evaluator.state.metrics
    assert output["seg_dice_real"] == 1.0
    found, tumour = output["pred"] > 0.7, batch["seg"] > 0
    expected = 2 * float((found & tumour).sum()) / float(found.sum() + tumour.sum())
    assert output["seg_dice_generated"] == pytest.approx(expected, abs=1e-6)
    assert metrics["seg_dice_real"] == 1.0 and metrics["seg_dice_ratio"] == pytest.approx(expected, abs=1e-6)
    assert torch.equal(output["histogram_source"], baselines[2].histogram(batch["source"]))
    assert torch.equal(output["regression_source"], baselines[2].regression(batch["source"]))
    assert all(math.isfinite(metrics[f"{b}_source_{s}"]) for b in ("copy", "histogram", "regression")
               for s in ("psnr", "ssim", "psnr_tumour", "ssim_tumour"))
    assert metrics["beats_baselines"] in (0.0, 1.0)


class RecordingSegmenter:
    """The known-answer segmenter, keeping every image it is asked to segment."""

    def __init__(self) -> None:
        from prod9_components.engines.tumour_segmenter import TumourSegmenter

        self.segmenter, self.images = TumourSegmenter(BrightVoxels(), roi_size=(16, 16, 16)), []

    def predict(self, images: torch.Tensor, modalities) -> torch.Tensor:
        self.images.append(images.clone())
        return self.segmenter.predict(images, modalities)


def test_evaluator_scores_several_samples_per_case_against_the_mask(one_thread):
    """``segmentation_samples=3``: the segmenter sees the first sample (the one scored for contrast and control, as
    with 1), two more from other noise, then the real image; ``seg_dice_generated`` is the mean Dice of the three."""
    from ignite.metrics import Average

    from prod9_components.engines.maisi_controlnet_evaluator import MaisiControlNetEvaluator
    from prod9_components.metrics.tumour import segmentation_metrics, tumour_dice

    _, vae, batch, _ = _evaluator_parts()
    net = MaisiControlNet.from_base(trained_like_base(), condition_type="mask+label").eval()
    runs = {}
    for samples in (1, 3):
        recorder = RecordingSegmenter()
        evaluator = MaisiControlNetEvaluator(
            "cpu", [batch], net, RFlowScheduler(1000, use_discrete_timesteps=False), control_keys={"seg": "control_mask"},
            vae=vae, num_steps=2, segmenter=recorder, segmentation_samples=samples,
            key_val_metric={"val_loss": Average(output_transform=lambda o: o["val_loss"])},
            additional_metrics=segmentation_metrics())
        evaluator.run()
        runs[samples] = (evaluator.state.output, recorder.images)
    (one, seen_one), (three, seen_three) = runs[1], runs[3]
    assert len(seen_one) == 2 and len(seen_three) == 4  # the samples, then the real image
    # the first draw kept (sampled in a batch of 4 instead of 2: the same numbers up to rounding)
    torch.testing.assert_close(three["pred"], one["pred"], rtol=0, atol=1e-5)
    assert torch.equal(seen_three[0], three["pred"])
    assert not torch.equal(seen_three[1], seen_three[0]) and not torch.equal(seen_three[2], seen_three[1])
    assert torch.equal(seen_three[-1], batch["image"])
    dice = [float(tumour_dice(image > 0.7, batch["seg"])) for image in seen_three[:3]]
    assert three["seg_dice_generated"] == pytest.approx(sum(dice) / 3, abs=1e-6)
    assert one["seg_dice_generated"] == pytest.approx(dice[0], abs=1e-6) and three["seg_dice_real"] == 1.0
    for bad in (0, 1.5, "3", True):
        with pytest.raises(ValueError, match=f"segmentation_samples must be a whole number >= 1, got {bad!r}"):
            MaisiControlNetEvaluator("cpu", [batch], net, RFlowScheduler(1000, use_discrete_timesteps=False),
                                     control_keys={"seg": "control_mask"}, segmentation_samples=bad)

def test_evaluator_of_a_source_image_controlnet_needs_the_translation_baselines():
    from prod9_components.engines.maisi_controlnet_evaluator import MaisiControlNetEvaluator

    net, vae, batch, _ = _evaluator_parts()
    with pytest.raises(ValueError, match="pass translation_baselines"):
        MaisiControlNetEvaluator("cpu", [batch], net, RFlowScheduler(1000, use_discrete_timesteps=False),
                            control_keys={"seg": "control_mask", "source": "control_image"}, vae=vae)


@pytest.mark.parametrize("condition_type", ["mask+label", "image+label"])
def test_the_conditioning_encoder_keeps_the_scale_of_its_condition(condition_type):
    """The encoder's hidden layers pass the condition on at its own scale (He initialisation), so the zero output
    layer learns from a signal: under PyTorch's default initialisation, which MONAI keeps, four convolution + SiLU
    layers shrank it ~100x (0.0015-0.0022 of the condition's spread here, against 0.18-0.19) and a trained ControlNet
    ignored its source image."""
    torch.manual_seed(0)
    net = MaisiControlNet(trained_like_base().init_args, condition_type=condition_type)
    encoder = net.controlnet.controlnet_cond_embedding
    hidden = lambda c: torch.nn.Sequential(encoder.conv_in, *encoder.blocks)(c)  # noqa: E731  before the output layer
    data = inputs()
    condition = net.condition(data["x"], data["control_mask"], data["control_image"])
    with torch.no_grad():
        change = (hidden(condition) - hidden(torch.zeros_like(condition))).std()
    assert 0.05 < float(change / condition.std()) < 3.0
    assert not encoder.conv_out.conv.weight.any() and not encoder.conv_out.conv.bias.any()  # the base's velocity


def _trained_like(net: MaisiControlNet) -> MaisiControlNet:
    """The ControlNet's zero-initialised layers given weights, as training would: its residuals reach the base."""
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in net.controlnet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return net.eval()


def test_conditioning_scale_multiplies_the_residuals_zero_is_the_base():
    """``conditioning_scale`` scales what the ControlNet adds: 0 gives the base's velocity, 1 (the default) the
    trained model's, and the velocity's departure from the base grows with the scale."""
    base = trained_like_base()
    net = _trained_like(MaisiControlNet.from_base(base, condition_type="mask+label"))
    data = inputs()
    with torch.no_grad():
        plain = base(data["x"], data["timesteps"], class_labels=data["class_labels"])
        departure = {s: float((net(**data, conditioning_scale=s) - plain).abs().mean()) for s in (0.0, 1.0, 3.0)}
        assert torch.equal(net(**data), net(**data, conditioning_scale=1.0))
    assert departure[0.0] < 1e-5 < departure[1.0] < departure[3.0]


def test_evaluator_samples_at_the_conditioning_scale(one_thread):
    """At conditioning_scale 0 the evaluator's mask-steered sample is the empty-mask one (both are the base's, from
    the same noise); at 1 they differ. ``val_loss`` (the training objective) does not depend on the scale."""
    from ignite.metrics import Average

    from prod9_components.engines.maisi_controlnet_evaluator import MaisiControlNetEvaluator

    net, vae, batch, baselines = _evaluator_parts()
    net = _trained_like(net)
    outputs = {}
    for scale in (0.0, 1.0):
        evaluator = MaisiControlNetEvaluator(
            "cpu", [batch], net, RFlowScheduler(1000, use_discrete_timesteps=False),
            control_keys={"seg": "control_mask", "source": "control_image"}, vae=vae, num_steps=2,
            translation_baselines=baselines, conditioning_scale=scale,
            key_val_metric={"val_loss": Average(output_transform=lambda o: o["val_loss"])})
        evaluator.run()
        outputs[scale] = evaluator.state.output
    assert torch.equal(outputs[0.0]["pred"], outputs[0.0]["pred_without_mask"])
    assert (outputs[1.0]["pred"] - outputs[1.0]["pred_without_mask"]).abs().max() > 1e-3
    assert outputs[0.0]["val_loss"] == outputs[1.0]["val_loss"]


def test_evaluator_samples_with_and_without_the_mask_in_one_batch_each_its_own(one_thread):
    """The mask-steered sample and the empty-mask one are sampled in one batch: each is what the ControlNet gives its
    condition sampled alone from the evaluator's noise (up to the rounding of another batch size), and another mask
    changes ``pred`` and leaves ``pred_without_mask`` as it was."""
    from ignite.metrics import Average

    from prod9_components.data.sharding import validation_generator
    from prod9_components.engines.maisi_controlnet_evaluator import MaisiControlNetEvaluator
    from prod9_components.generation.decode import decode_latent

    net, vae, batch, baselines = _evaluator_parts()
    net, scheduler = _trained_like(net), RFlowScheduler(1000, use_discrete_timesteps=False)
    outputs = []
    for seg in (batch["seg"], (batch["seg"] > 0).long()):
        evaluator = MaisiControlNetEvaluator(
            "cpu", [{**batch, "seg": seg}], net, scheduler,
            control_keys={"seg": "control_mask", "source": "control_image"}, vae=vae, num_steps=2,
            translation_baselines=baselines,
            key_val_metric={"val_loss": Average(output_transform=lambda o: o["val_loss"])})
        evaluator.run()
        outputs.append(evaluator.state.output)
    assert torch.equal(outputs[0]["pred_without_mask"], outputs[1]["pred_without_mask"])
    assert (outputs[0]["pred"] - outputs[1]["pred"]).abs().max() > 1e-3

    generator = validation_generator(0, 1, batch)  # the evaluator's stream: val_loss's noise and timesteps, then this
    torch.randn(batch["latent"].shape, generator=generator), torch.rand(1, generator=generator)
    noise = torch.randn(batch["latent"].shape, generator=generator)
    for mask, key in ((batch["seg"], "pred"), (torch.zeros_like(batch["seg"]), "pred_without_mask")):
        with torch.no_grad():
            latent = sample_rectified_flow(net, scheduler, noise, batch["label"], 2, control_mask=mask,
                                           control_image=batch["source"])
        torch.testing.assert_close(outputs[0][key], decode_latent(vae, latent, 1.0, None), rtol=0, atol=1e-5)


def test_a_sampler_embeds_its_condition_once_and_gets_what_the_encoder_computes():
    """Without autograd the conditioning encoder (at image resolution) runs once for a sampler's steps that share a
    condition; its reused embedding equals a fresh one, and another mask, other weights (an optimiser step), autocast
    or autograd (training) make it compute again."""
    net = _trained_like(MaisiControlNet.from_base(trained_like_base(), condition_type="mask+label"))
    encoder = net.controlnet.controlnet_cond_embedding
    runs = []
    encoder.conv_in.register_forward_hook(lambda *_: runs.append(1))
    data = inputs()
    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False)
    noise = torch.randn(data["x"].shape, generator=torch.Generator().manual_seed(2))

    def sample(mask: torch.Tensor) -> torch.Tensor:
        return sample_rectified_flow(net, scheduler, noise, data["class_labels"], 4, control_mask=mask)

    reused = sample(data["control_mask"])
    assert len(runs) == 1  # 4 steps, one embedding
    encoder.__class__ = ControlNetConditioningEmbedding  # MONAI's own: embeds at every step
    fresh = sample(data["control_mask"])
    encoder.__class__ = ReusedConditioningEmbedding
    assert len(runs) == 5 and torch.equal(reused, fresh)
    with torch.enable_grad():  # training: every call embeds
        net(**data).sum().backward()
        net(**data)
    assert len(runs) == 7
    other_mask = data["control_mask"].clone()
    other_mask[:, 10:14, 10:14, 10:14] = 1
    sample(other_mask)
    assert len(runs) == 8
    with torch.no_grad():
        encoder.conv_out.conv.weight.mul_(2.0)  # in place, as an optimiser step: the weights' versions move on
    moved = sample(data["control_mask"])
    assert len(runs) == 9 and not torch.equal(moved, reused)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another precision: embedded again, then reused
        sample(data["control_mask"])
    assert len(runs) == 10
