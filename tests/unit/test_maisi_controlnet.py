"""MAISI ControlNet: zero-initialised residuals leave the base unchanged, the base stays frozen, every condition type
builds, trains a step and generates."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from prod9_components.engines.diffusion_trainer import RectifiedFlowTrainer
from prod9_components.networks.maisi_controlnet import CONDITION_TYPES, MaisiControlNet
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
                                   control_keys=control_keys, contrastive_weight=1.0 if net.uses_mask else 0.0)
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


def test_each_condition_type_reads_exactly_its_inputs():
    data = inputs(batch=1)
    for condition_type, needs in (("mask", "control_mask"), ("image", "control_image")):
        net = MaisiControlNet(trained_like_base().init_args, condition_type=condition_type)
        with pytest.raises(ValueError, match=needs):
            net(**{**data, needs: None})
    net = MaisiControlNet(trained_like_base().init_args, condition_type="mask")
    bad = data["control_mask"].clone()
    bad[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        net(**{**data, "control_mask": bad})
    with pytest.raises(ValueError, match=r"control_mask must be \(1, 16, 16, 16\)"):
        net(**{**data, "control_mask": data["control_mask"][:, :8]})
    with pytest.raises(ValueError, match="unknown condition_type 'depth'"):
        MaisiControlNet(trained_like_base().init_args, condition_type="depth")
    rebuilt = MaisiControlNet(**net.init_args)
    rebuilt.load_state_dict(net.state_dict())  # a checkpoint record rebuilds it from init_args
