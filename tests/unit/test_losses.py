"""Focal frequency loss and the autoencoder GAN objective, on tiny real tensors and networks."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

from prod9_components.losses import AutoencoderGANLoss, FocalFrequencyLoss, kl_divergence


def _volume(shape=(2, 1, 6, 8, 10), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- focal frequency


def test_focal_frequency_zero_for_identical_inputs():
    x = _volume()
    assert FocalFrequencyLoss()(x, x.clone()).item() == 0.0


def test_focal_frequency_alpha_zero_is_mse_by_parseval():
    # Orthonormal FFT + all weights 1 = mean squared error in voxel space, on a non-cubic volume.
    pred, target = _volume(seed=1), _volume(seed=2)
    loss = FocalFrequencyLoss(alpha=0.0)(pred, target)
    assert loss.item() == pytest.approx(torch.mean((pred - target) ** 2).item(), rel=1e-5)


def test_focal_frequency_focuses_on_concentrated_errors():
    # A single-frequency corruption keeps weight 1 on its only spectral bins: loss == MSE exactly.
    # Broadband noise with the same MSE is spread over many bins with weights < 1: loss well below MSE.
    target = _volume(shape=(1, 1, 8, 12, 16))
    w = torch.arange(16, dtype=torch.float32)
    wave = 0.1 * torch.cos(2 * math.pi * 5 * w / 16)  # high frequency along W
    wave_pred = target + wave.view(1, 1, 1, 1, 16)
    mse = torch.mean((wave_pred - target) ** 2)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    noise_pred = target + noise * (mse.sqrt() / noise.pow(2).mean().sqrt())

    loss_fn = FocalFrequencyLoss(alpha=1.0)
    wave_loss, noise_loss = loss_fn(wave_pred, target), loss_fn(noise_pred, target)
    assert torch.mean((noise_pred - target) ** 2).item() == pytest.approx(mse.item(), rel=1e-5)
    assert wave_loss.item() == pytest.approx(mse.item(), rel=1e-4)
    assert noise_loss.item() < 0.8 * mse.item()  # measured ~0.6 for white noise


def test_focal_frequency_is_differentiable_on_non_cubic_volume():
    target = _volume(shape=(1, 2, 5, 7, 9))
    pred = (target + 0.2 * _volume(shape=(1, 2, 5, 7, 9), seed=4)).requires_grad_()
    loss = FocalFrequencyLoss(axes=(2, 4), log_weight=True)(pred, target)
    loss.backward()
    assert loss.item() > 0
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


# ---------------------------------------------------------------- autoencoder GAN objective


class TinyAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv3d(1, 4, 3, padding=1)
        self.decoder = nn.Conv3d(4, 1, 3, padding=1)

    def forward(self, x):
        return self.decoder(torch.relu(self.encoder(x)))


def _gan_setup(seed=0):
    torch.manual_seed(seed)
    autoencoder = TinyAutoencoder()
    discriminator = PatchDiscriminator(spatial_dims=3, channels=4, in_channels=1, num_layers_d=2)
    image = _volume(shape=(1, 1, 16, 16, 16), seed=seed)
    return autoencoder, discriminator, image


def test_warm_up_makes_adversarial_term_inert():
    autoencoder, discriminator, image = _gan_setup()
    loss_fn = AutoencoderGANLoss(disc_start=10)
    recon = autoencoder(image)
    fake = discriminator(recon)
    out_a = loss_fn.generator_loss(image, recon, fake, autoencoder.decoder.weight, iteration=9)
    out_b = loss_fn.generator_loss(image, recon, [f * 3 + 1 for f in fake], autoencoder.decoder.weight, iteration=9)
    out_none = loss_fn.generator_loss(image, recon, None, autoencoder.decoder.weight, iteration=9)
    assert out_a["loss"].item() == out_b["loss"].item() == out_none["loss"].item()
    assert out_a["adv_loss"].item() != out_b["adv_loss"].item()  # still reported
    assert out_a["adaptive_weight"].item() == 0.0
    # The total is the warm-up objective: L1 + 0.1 * focal frequency.
    expected = out_a["recon_loss"] + 0.1 * out_a["perceptual_loss"]
    assert out_a["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_reconstruction_terms_are_weighted_l1_and_squared_error():
    image, recon = _volume(seed=3), _volume(seed=4).requires_grad_()
    out = AutoencoderGANLoss(recon_weight=0.5, mse_weight=2.0, perceptual_weight=0).generator_loss(
        image, recon, None, None, iteration=0)
    l1, mse = (recon - image).abs().mean(), ((recon - image) ** 2).mean()
    assert out["recon_loss"].item() == pytest.approx(l1.item(), rel=1e-6)
    assert out["mse_loss"].item() == pytest.approx(mse.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * l1.item() + 2.0 * mse.item(), rel=1e-6)
    # Squared error alone: its gradient is 2 * error / N, the one PSNR rewards.
    AutoencoderGANLoss(recon_weight=0, mse_weight=1.0, perceptual_weight=0).generator_loss(
        image, recon, None, None, iteration=0)["loss"].backward()
    torch.testing.assert_close(recon.grad, 2 * (recon - image).detach() / image.numel())
    for bad in ({"mse_weight": -1.0}, {"recon_weight": float("nan")}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.*must be >= 0"):
            AutoencoderGANLoss(**bad)


def test_adaptive_weight_equals_independent_grad_norm_ratio():
    autoencoder, discriminator, image = _gan_setup(seed=1)
    loss_fn = AutoencoderGANLoss(disc_start=0, adversarial_weight=0.5)
    recon = autoencoder(image)
    fake = discriminator(recon)
    out = loss_fn.generator_loss(image, recon, fake, autoencoder.decoder.weight, iteration=0)

    last = autoencoder.decoder.weight
    nll = (recon - image).abs().mean() + 0.1 * FocalFrequencyLoss()(recon, image)
    adv = torch.mean(nn.functional.leaky_relu(fake[-1], 0.05).sub(1.0).pow(2))  # least squares, target real
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
    expected = (g_nll.norm() / (g_adv.norm() + 1e-4)).item()

    weight = out["adaptive_weight"].item()
    assert math.isfinite(weight) and weight > 0
    assert weight == pytest.approx(expected, rel=1e-4)
    assert out["adv_loss"].item() == pytest.approx(adv.item(), rel=1e-6)
    assert not out["adaptive_weight"].requires_grad
    total = out["recon_loss"] + 0.1 * out["perceptual_loss"] + 0.5 * weight * out["adv_loss"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    # The graph was retained: the trainer can still back-propagate the total.
    out["loss"].backward()
    assert autoencoder.encoder.weight.grad is not None


def test_adaptive_weight_is_one_without_gradients():
    autoencoder, discriminator, image = _gan_setup()
    loss_fn = AutoencoderGANLoss(disc_start=0)
    with torch.no_grad():
        recon = autoencoder(image)
        out = loss_fn.generator_loss(image, recon, discriminator(recon), autoencoder.decoder.weight, iteration=5)
    assert out["adaptive_weight"].item() == 1.0
    no_adaptive = AutoencoderGANLoss(disc_start=0, adaptive_weight=False)
    recon = autoencoder(image)
    out = no_adaptive.generator_loss(image, recon, discriminator(recon), autoencoder.decoder.weight, iteration=5)
    assert out["adaptive_weight"].item() == 1.0


def test_discriminator_loss_zero_for_perfect_logits_and_positive_otherwise():
    loss_fn = AutoencoderGANLoss()
    ones, zeros = torch.ones(2, 1, 3, 3, 3), torch.zeros(2, 1, 3, 3, 3)
    assert loss_fn.discriminator_loss([zeros, ones], [ones, zeros]).item() == 0.0  # last item = logits
    # Swapped: each half is mean((1 - 0)^2) = 1, averaged -> 1.
    assert loss_fn.discriminator_loss(zeros, ones).item() == pytest.approx(1.0)


def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    mu, sigma = torch.zeros(2, 4, 2, 2, 2), torch.ones(2, 4, 2, 2, 2)
    assert kl_divergence(mu, sigma).item() == pytest.approx(0.0, abs=1e-7)
    # Analytic: 0.5 * (mu^2 + s^2 - log s^2 - 1) per element, summed over 32 latent elements.
    per_element = 0.5 * (0.5**2 + 2.0**2 - math.log(4.0) - 1.0)
    assert kl_divergence(mu + 0.5, sigma * 2).item() == pytest.approx(32 * per_element, rel=1e-5)

    loss_fn = AutoencoderGANLoss(kl_weight=1e-3, perceptual="none")
    image = _volume(shape=(2, 1, 4, 4, 4))
    out = loss_fn.generator_loss(image, image * 0.9, None, None, iteration=0, z_mu=mu + 0.5, z_sigma=sigma * 2)
    assert out["kl_loss"].item() == pytest.approx(32 * per_element, rel=1e-5)
    assert out["perceptual_loss"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["recon_loss"].item() + 1e-3 * 32 * per_element, rel=1e-5)
    no_kl = AutoencoderGANLoss(kl_weight=0.0).generator_loss(image, image, None, None, 0, mu + 0.5, sigma * 2)
    assert no_kl["kl_loss"].item() == 0.0


def test_monai_perceptual_without_local_weights_raises_clear_error():
    with pytest.raises(RuntimeError, match="local weights file"):
        AutoencoderGANLoss(perceptual="monai", perceptual_kwargs={"network_type": "resnet50"})
    with pytest.raises(ValueError, match="perceptual must be one of"):
        AutoencoderGANLoss(perceptual="vgg")


def test_region_contrastive_loss_is_zero_without_tumour_and_a_hinge_inside_it():
    from prod9_components.losses.region_contrastive import region_contrastive_loss, tumour_region

    velocity = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    seg = torch.zeros(2, 1, 16, 16, 16, dtype=torch.int64)
    no_tumour = tumour_region(seg, (4, 4, 4))
    assert float(region_contrastive_loss(velocity, velocity.detach() + 1.0, no_tumour, margin=5.0)) == 0.0

    seg[0, 0, 0:4, 0:4, 0:4] = 2  # one latent cell of sample 0 (4x downsampling)
    seg[0, 0, 5, 5, 5] = 1  # a single voxel still marks its cell
    region = tumour_region(seg, (4, 4, 4))
    assert region.shape == (2, 1, 4, 4, 4) and int(region.sum()) == 2 and region[0, 0, 0, 0, 0] == 1
    without = velocity.detach().clone()
    without[0, :, 0, 0, 0] += 0.02  # mean |difference| 0.01 over the two cells
    loss = region_contrastive_loss(velocity, without, region, margin=0.05)
    assert math.isclose(float(loss), (0.05 - 0.01) / 2, rel_tol=1e-4)  # sample 1 has no tumour: 0
    loss.backward()
    assert velocity.grad[0, :, 0, 0, 0].abs().sum() > 0 and not velocity.grad[1].any()
    far = velocity.detach() + 1.0  # differs by more than the margin everywhere: no penalty
    assert float(region_contrastive_loss(velocity, far, region, margin=0.05)) == 0.0
    with pytest.raises(ValueError, match="margin must be >= 0"):
        region_contrastive_loss(velocity, far, region, margin=-1.0)


def test_velocity_loss_weights_the_tumour_cells():
    from prod9_components.losses.rectified_flow import velocity_loss
    from prod9_components.losses.region_contrastive import tumour_weights

    target = torch.zeros(1, 2, 2, 2, 2)
    velocity = torch.zeros(1, 2, 2, 2, 2)
    velocity[0, :, 0, 0, 0] = 3.0  # squared error 9 in one cell (both channels), 0 in the other seven
    assert math.isclose(float(velocity_loss(velocity, target)), 9 * 2 / 16)
    seg = torch.zeros(1, 1, 8, 8, 8)
    seg[0, 0, 1, 1, 1] = 2  # a tumour voxel in the erroneous cell (4x downsampling)
    weight = tumour_weights(seg, (2, 2, 2), 100.0)
    assert weight.shape == (1, 1, 2, 2, 2) and float(weight[0, 0, 0, 0, 0]) == 100.0 and float(weight.sum()) == 107.0
    # weighted mean: (100 * 9 * 2) / (2 * (100 + 7)) -- the tumour cell dominates
    assert math.isclose(float(velocity_loss(velocity, target, weight)), 900 / 107, rel_tol=1e-6)
    assert math.isclose(float(velocity_loss(velocity, target, torch.ones(1, 1, 2, 2, 2))), 9 * 2 / 16)
