"""Rectified flow: the sampler covers the whole interval, the target is velocity, guidance, EMA, distances."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from prod9_components.generation.maisi import sample_latents
from prod9_components.losses.rectified_flow import rectified_flow_loss
from prod9_components.metrics.distribution_distance import intensity_distances, wasserstein_1d
from prod9_components.networks.ema import ExponentialMovingAverage
from prod9_components.networks.maisi_diffusion import MaisiDiffusionUNet
from prod9_components.sampling.rectified_flow import guided_velocity, sample_rectified_flow, sampling_timesteps

T = 1000


def tiny_unet() -> MaisiDiffusionUNet:
    torch.manual_seed(0)
    unet = MaisiDiffusionUNet(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, True],
                              norm_num_groups=4, num_head_channels=4).eval()
    with torch.no_grad():  # MONAI zero-initialises the output layers (velocity 0 everywhere): give them weights
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return unet


class StraightFlowToTarget(torch.nn.Module):
    """The exact velocity field of the straight paths from any noise to one fixed ``target``:
    x_t = target + (t/T)(noise - target)  =>  v = target - noise = (target - x_t) * T / t."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = target
        self.calls = 0

    def forward(self, x, timesteps, class_labels=None):
        self.calls += 1
        return (self.target - x) * T / timesteps.float().reshape(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("shifted", [False, True])
def test_ten_euler_steps_reach_the_target_of_a_known_flow(shifted):
    scheduler = RFlowScheduler(T, use_discrete_timesteps=False, use_timestep_transform=shifted)
    target = torch.randn(2, 4, 6, 6, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 6, 6, 4, generator=torch.Generator().manual_seed(2))
    model = StraightFlowToTarget(target)
    out = sample_rectified_flow(model, scheduler, noise, None, num_steps=10)
    assert model.calls == 10
    assert (out - target).abs().max() < 1e-4  # the whole interval T -> 0 was traversed
    # with half the interval the sample would sit halfway between noise and target
    timesteps = sampling_timesteps(scheduler, 10, noise.shape[2:])
    assert timesteps[0] == T and timesteps[-1] == 0 and (timesteps.diff() < 0).all()
    if shifted:  # the resolution shift makes the steps uneven (6x6x4 latents are smaller than the 32^3 base)
        assert timesteps.diff().std() > 1.0


def test_training_target_is_velocity_not_noise():
    scheduler = RFlowScheduler(T, use_discrete_timesteps=False)
    latent = torch.randn(3, 4, 4, 4, 4)
    noise = torch.randn(3, 4, 4, 4, 4)
    timesteps = torch.tensor([100.0, 500.0, 900.0])
    s = (timesteps / T).reshape(-1, 1, 1, 1, 1)

    def velocity_oracle(x, t, class_labels=None):  # knows the clean latent: (latent - x_t) / (t/T) = latent - noise
        return (latent - x) / s

    def noise_oracle(x, t, class_labels=None):  # an epsilon-prediction model that is exactly right
        return (x - (1 - s) * latent) / s

    assert rectified_flow_loss(velocity_oracle, scheduler, latent, None, noise, timesteps) < 1e-10
    expected = ((noise - (latent - noise)) ** 2).mean()
    assert rectified_flow_loss(noise_oracle, scheduler, latent, None, noise, timesteps) == pytest.approx(
        float(expected), rel=1e-4)


def test_guidance_scale_zero_is_the_unconditional_model_and_sampling_is_seeded():
    unet = tiny_unet()
    scheduler = RFlowScheduler(T, use_discrete_timesteps=False)
    noise = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    t2, null = torch.tensor([2]), torch.tensor([unet.null_label])
    unconditional = sample_rectified_flow(unet, scheduler, noise, null, 4)
    assert torch.equal(sample_rectified_flow(unet, scheduler, noise, t2, 4, guidance_scale=0.0,
                                             null_label=unet.null_label), unconditional)
    conditional = sample_rectified_flow(unet, scheduler, noise, t2, 4)
    guided = sample_rectified_flow(unet, scheduler, noise, t2, 4, guidance_scale=3.0, null_label=unet.null_label)
    assert (conditional - unconditional).abs().max() > 1e-4  # the label is used
    assert (guided - conditional).abs().max() > 1e-4
    first = list(sample_latents(unet, scheduler, "T2", 2, (4, 4, 4), 3, seed=5))
    again = list(sample_latents(unet, scheduler, "T2", 1, (4, 4, 4), 3, seed=5))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], first[1])


def test_guidance_scale_one_is_exactly_the_conditional_velocity():
    """v_null + s * (v_label - v_null), as the MaskGiT sampler's guided_logits: s = 1 is v_label in one call."""
    unet = tiny_unet()
    calls = []

    def model(x, timesteps, class_labels=None):
        calls.append(class_labels.clone())
        return unet(x, timesteps, class_labels=class_labels)

    x, t = torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor(500.0)
    labels, null = torch.tensor([1, 2]), torch.full((2,), unet.null_label)
    with torch.no_grad():
        v_label = unet(x, t.expand(2), class_labels=labels)
        v_null = unet(x, t.expand(2), class_labels=null)
        assert torch.equal(guided_velocity(model, x, t, labels, 1.0, unet.null_label), v_label)
        assert len(calls) == 1 and torch.equal(calls[0], labels)  # no unconditional pass at s = 1
        guided = guided_velocity(model, x, t, labels, 2.5, unet.null_label)
    assert torch.allclose(guided, v_null + 2.5 * (v_label - v_null), atol=1e-5)


def test_sampler_refuses_bad_step_counts():
    scheduler = RFlowScheduler(T)
    for steps in (0, T + 1, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer in 1..1000"):
            list(sample_latents(tiny_unet(), scheduler, "T1", 1, (4, 4, 4), steps))


def test_ema_follows_the_weights_with_a_warm_up():
    net = torch.nn.Linear(3, 3)
    ema = ExponentialMovingAverage(net, decay=0.999)
    before = ema.module.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): a fresh average moves fast
    ema.update(net)
    assert torch.allclose(ema.module.weight, 0.1 * before + 0.9 * net.weight)
    assert int(ema.num_updates) == 1 and not ema.module.weight.requires_grad
    ema.num_updates.fill_(10**6)
    assert ema.current_decay() == 0.999


def test_wasserstein_distances_measure_shifts():
    a = torch.rand(10000, generator=torch.Generator().manual_seed(0))
    assert wasserstein_1d(a, a) == 0.0
    assert wasserstein_1d(a, a + 0.25) == pytest.approx(0.25, abs=1e-3)
    volume = torch.rand(1, 8, 8, 8)
    same = intensity_distances([volume], [volume])
    assert same == {"intensity_w1": 0.0, "gradient_w1": 0.0}
    smooth = intensity_distances([torch.full_like(volume, volume.mean())], [volume])
    assert smooth["intensity_w1"] > 0.1 and smooth["gradient_w1"] > 0.1  # a flat volume has no edges
