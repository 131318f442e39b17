"""MaisiVAE (MAISI stage 1): export round trip, MONAI compatibility, size check, KL term, a few training steps."""

from __future__ import annotations

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from prod9_components.engines.autoencoder_trainer import AutoencoderGANTrainer
from prod9_components.losses.autoencoder_gan import AutoencoderGANLoss
from prod9_components.networks.export import atomic_save, build_network, load_record, network_record
from prod9_components.networks.maisi_vae import MaisiVAE

TINY = {"num_channels": [8, 16, 32], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4}
STAGE = "maisi_stage1_vae"


def _tiny_vae(seed: int = 0) -> MaisiVAE:
    torch.manual_seed(seed)
    return MaisiVAE(**TINY).eval()


def _blob(size: int = 16) -> torch.Tensor:
    """(1, 1, size, size, size) in [0, 1]: a bright ball with a darker core on a zero background."""
    axis = torch.linspace(-1, 1, size)
    radius = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).square().sum(0).sqrt()
    image = torch.where(radius < 0.8, 0.9 - 0.5 * (radius < 0.35).float(), torch.zeros(()))
    return image[None, None]


def test_export_round_trip_rebuilds_the_same_network(tmp_path, one_thread):
    vae = _tiny_vae()
    image = _blob()
    path = tmp_path / "vae.pt"
    atomic_save(network_record(vae, {"spacing": [1.0, 1.0, 1.0]}, stage=STAGE), path)

    record = load_record(path, stages=[STAGE])
    rebuilt = build_network(record, expected_args={"latent_channels": 4, "in_channels": 1}, source=str(path)).eval()
    assert isinstance(rebuilt, MaisiVAE) and rebuilt.init_args == vae.init_args
    assert rebuilt.downsample_factor == 4
    with torch.no_grad():
        z_mu, z_sigma = vae.encode(image)
        z_mu2, z_sigma2 = rebuilt.encode(image)
        assert z_mu.shape == (1, 4, 4, 4, 4)
        assert torch.equal(z_mu, z_mu2) and torch.equal(z_sigma, z_sigma2)
        assert torch.equal(vae.decode(z_mu), rebuilt.decode(z_mu2))

    # The weights are MONAI's: they load, strictly, into a plain AutoencoderKlMaisi that computes the same thing.
    plain = AutoencoderKlMaisi(3, 1, 1, [1, 1, 1], [8, 16, 32], [False, False, False], latent_channels=4,
                               norm_num_groups=4, norm_eps=1e-6, with_encoder_nonlocal_attn=False,
                               with_decoder_nonlocal_attn=False, use_flash_attention=False, num_splits=1,
                               save_mem=False).eval()
    plain.load_state_dict(record["state_dict"], strict=True)
    with torch.no_grad():
        plain_mu, _ = plain.encode(image)
        torch.testing.assert_close(plain_mu, z_mu, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(plain.decode(plain_mu), vae.decode(z_mu), atol=1e-4, rtol=1e-4)


def test_export_refuses_other_latent_channels_and_other_stages(tmp_path):
    path = tmp_path / "vae.pt"
    atomic_save(network_record(_tiny_vae(), stage=STAGE), path)
    record = load_record(path)
    with pytest.raises(ValueError, match=r"'latent_channels' is 4 but the config expects 8"):
        build_network(record, expected_args={"latent_channels": 8}, source=str(path))
    with pytest.raises(ValueError, match=r"a 'maisi_stage1_vae' checkpoint, expected one of maskgit_stage1"):
        load_record(path, stages=["maskgit_stage1"])


def test_encode_refuses_a_size_not_divisible_by_4(one_thread):
    vae = _tiny_vae()
    with pytest.raises(ValueError, match=r"\(16, 16, 18\) is not divisible by the downsample factor 4"):
        vae.encode(torch.zeros(1, 1, 16, 16, 18))


def test_kl_term_is_the_gaussian_kl_and_enters_the_loss(one_thread):
    vae = _tiny_vae().train()
    image = _blob()
    loss = AutoencoderGANLoss(perceptual_weight=0.0, kl_weight=1e-7, disc_start=10**6)
    torch.manual_seed(1)
    reconstruction, z_mu, z_sigma = vae(image)
    losses = loss.generator_loss(image, reconstruction, None, None, 0, z_mu=z_mu, z_sigma=z_sigma)
    # KL(N(mu, sigma^2) || N(0, 1)) summed over the 4 x 4^3 latent cells of the one volume.
    expected = 0.5 * (z_mu.square() + z_sigma.square() - torch.log(z_sigma.square()) - 1).sum()
    assert losses["kl_loss"].item() > 1.0
    torch.testing.assert_close(losses["kl_loss"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["loss"], losses["recon_loss"] + 1e-7 * expected, rtol=1e-6, atol=1e-7)


def test_trainer_steps_reduce_the_reconstruction_error(one_thread):
    vae = _tiny_vae()
    image = _blob()

    def l1_of_mean() -> float:  # deterministic: decode the latent mean, not a sample
        with torch.no_grad():
            return (vae.decode(vae.encode(image)[0]) - image).abs().mean().item()

    from monai.networks.nets import PatchDiscriminator

    discriminator = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=8, in_channels=1, out_channels=1)
    trainer = AutoencoderGANTrainer(
        device="cpu", max_epochs=12, train_data_loader=[{"image": image}], network=vae,
        optimizer=torch.optim.Adam(vae.parameters(), lr=2e-3),
        discriminator=discriminator, disc_optimizer=torch.optim.Adam(discriminator.parameters(), lr=1e-4),
        loss_function=AutoencoderGANLoss(perceptual_weight=0.0, kl_weight=1e-7, disc_start=10**6))
    before = l1_of_mean()
    torch.manual_seed(2)
    trainer.run()
    after = l1_of_mean()
    assert trainer.state.iteration == 12
    assert trainer.state.output["kl_loss"].item() > 0.0
    assert after < 0.5 * before, (before, after)  # measured: 0.50 -> 0.15
