import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from prod9_components.inference import AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ


def _tiny_fsq() -> AutoencoderFSQ:
    torch.manual_seed(0)
    return AutoencoderFSQ(
        num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False), norm_num_groups=4
    ).eval()


class PoolAutoencoder(nn.Module):
    """A voxel-local autoencoder (no receptive field beyond its own cell): tiling must be exact."""

    downsample_factor = 4

    def encode(self, image):
        return F.avg_pool3d(image, 4) * torch.tensor([1.0, -2.0]).view(1, 2, 1, 1, 1)

    def decode(self, latent):
        return F.interpolate(latent[:, :1], scale_factor=4, mode="nearest")


def test_config_validation():
    assert SlidingWindowConfig(roi_size=32).roi_size == (32, 32, 32)
    assert SlidingWindowConfig(roi_size=[16, 32, 8]).roi_size == (16, 32, 8)
    for bad in (dict(overlap=1.0), dict(overlap=-0.1), dict(roi_size=0), dict(roi_size=(8, 8)), dict(mode="x")):
        with pytest.raises(ValueError):
            SlidingWindowConfig(**bad)
    with pytest.raises(ValueError, match="divisible"):
        AutoencoderInferenceWrapper(PoolAutoencoder(), SlidingWindowConfig(roi_size=(16, 16, 18)))
    with pytest.raises(ValueError, match="'gaussian', 'constant' or 'mean'.*got 'median'"):
        SlidingWindowConfig(mode="median")


def test_seed_mean_mode_is_constant_blending():
    # The seed's mode list has "mean"; MONAI calls equal-weight averaging of overlaps "constant".
    assert SlidingWindowConfig(mode="mean").mode == "constant"
    net = _tiny_fsq()
    x = torch.randn(1, 1, 40, 40, 24)
    with torch.no_grad():
        mean = AutoencoderInferenceWrapper(net, SlidingWindowConfig(roi_size=16, overlap=0.5, mode="mean")).reconstruct(x)
        constant = AutoencoderInferenceWrapper(net, SlidingWindowConfig(roi_size=16, overlap=0.5, mode="constant")).reconstruct(x)
        gaussian = AutoencoderInferenceWrapper(net, SlidingWindowConfig(roi_size=16, overlap=0.5)).reconstruct(x)
    torch.testing.assert_close(mean, constant, rtol=0, atol=0)
    assert (mean - gaussian).abs().max() > 1e-4  # overlapping windows really are blended differently


@pytest.mark.parametrize("overlap,mode", [(0.5, "gaussian"), (0.3, "constant"), (0.0, "gaussian")])
def test_tiling_is_exact_for_a_local_autoencoder(overlap, mode):
    # Padding, window placement on multiples of f (0.3 overlap gives MONAI a step of 11, snapped to 8),
    # blending and cropping all cancel out when the network itself has no cross-window context.
    net = PoolAutoencoder()
    wrapper = AutoencoderInferenceWrapper(net, SlidingWindowConfig(roi_size=(16, 24, 8), overlap=overlap, mode=mode))
    x = torch.randn(2, 1, 37, 41, 29)
    padded = F.pad(x, (0, 3, 0, 3, 0, 3), mode="replicate")
    latent = wrapper.encode(x)
    assert latent.shape == (2, 2, 10, 11, 8)
    torch.testing.assert_close(latent, net.encode(padded), rtol=0, atol=1e-5)
    recon = wrapper.reconstruct(x)
    assert recon.shape == x.shape
    torch.testing.assert_close(recon, net.decode(net.encode(padded))[..., :37, :41, :29], rtol=0, atol=1e-5)


def test_single_window_equals_whole_volume():
    net = _tiny_fsq()
    wrapper = AutoencoderInferenceWrapper(net, SlidingWindowConfig(roi_size=32))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        recon, codes = net(x)
    assert torch.equal(wrapper.encode(x), codes)
    torch.testing.assert_close(wrapper.reconstruct(x), recon, rtol=0, atol=1e-5)
    assert torch.equal(wrapper.quantize_stage_2_inputs(x), net.quantize_stage_2_inputs(x))


def test_tiled_matches_whole_volume_within_tolerance():
    # Random-weight GroupNorm network, 48^3 volume, roi 32 (8 windows), Gaussian blending.
    # Measured (seed 0): reconstruction error max 2.05 and mean 0.24 of the output std (constant blending:
    # 4.25 and 0.42); 8% of code values differ. Per-window GroupNorm statistics and zero-padded window borders cause
    # it; trained models and roi 64 do better (DESIGN section 7). The bounds leave ~20% headroom.
    net = _tiny_fsq()
    x = torch.randn(1, 1, 48, 48, 48)
    with torch.no_grad():
        whole, codes = net(x)
    scale = whole.std()
    errors = {}
    for mode in ("gaussian", "constant"):
        wrapper = AutoencoderInferenceWrapper(net, SlidingWindowConfig(roi_size=32, overlap=0.5, mode=mode))
        errors[mode] = (wrapper.reconstruct(x) - whole).abs() / scale
    assert errors["gaussian"].mean() < 0.30 and errors["gaussian"].max() < 2.5
    assert errors["gaussian"].mean() < 0.7 * errors["constant"].mean()
    # Codes are blended before quantization, so every one is on the FSQ grid and round-trips exactly.
    tiled_codes = AutoencoderInferenceWrapper(net, SlidingWindowConfig(roi_size=32)).encode(x)
    assert torch.equal(net.fsq.embed(net.fsq.quantize(tiled_codes)), tiled_codes)
    assert (tiled_codes != codes).float().mean() < 0.12


def test_odd_shapes_come_back_whole():
    net = _tiny_fsq()
    wrapper = AutoencoderInferenceWrapper(net, SlidingWindowConfig(roi_size=(24, 32, 16), overlap=0.25))
    x = torch.randn(1, 1, 37, 41, 29)
    indices = wrapper.quantize_stage_2_inputs(x)
    assert indices.shape == (1, 19, 21, 15) and indices.dtype == torch.int64
    codes = wrapper.encode(x)
    assert torch.equal(net.fsq.quantize(codes), indices)
    recon = wrapper.reconstruct(x)
    assert recon.shape == x.shape
    # reconstruct is decode(encode(image)) cropped to the input shape.
    assert torch.equal(recon, wrapper.decode(codes)[..., :37, :41, :29])


def test_kl_autoencoder_path():
    torch.manual_seed(0)
    kl = AutoencoderKlMaisi(
        spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=(1, 1), num_channels=(8, 8),
        attention_levels=(False, False), latent_channels=4, norm_num_groups=4, num_splits=1,
    ).eval()
    wrapper = AutoencoderInferenceWrapper(kl, SlidingWindowConfig(roi_size=16), downsample_factor=2)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        z_mu, _ = kl.encode(x)
    latent = wrapper.encode(x)
    torch.testing.assert_close(latent, z_mu, rtol=0, atol=1e-5)
    assert wrapper.reconstruct(torch.randn(1, 1, 21, 16, 16)).shape == (1, 1, 21, 16, 16)
    with pytest.raises(TypeError):
        wrapper.quantize_stage_2_inputs(x)


def test_volume_smaller_than_the_window_is_one_exact_pass():
    """Padding a small volume up to a large window would change its GroupNorm statistics; the window shrinks."""
    torch.manual_seed(0)
    net = _tiny_fsq().eval()
    image = torch.rand(1, 1, 24, 28, 20)
    wrapper = AutoencoderInferenceWrapper(net, SlidingWindowConfig(roi_size=64, overlap=0.5))
    with torch.no_grad():
        whole = net(image)[0]
        codes = wrapper.encode(image)
        torch.testing.assert_close(codes, net.encode(image), atol=0, rtol=0)
        torch.testing.assert_close(wrapper.reconstruct(image), whole, atol=1e-5, rtol=1e-5)
