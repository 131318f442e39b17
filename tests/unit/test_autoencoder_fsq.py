import json

import pytest
import torch

from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ

TINY = dict(num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False), norm_num_groups=4)


def _tiny(**overrides) -> AutoencoderFSQ:
    torch.manual_seed(0)
    return AutoencoderFSQ(**{**TINY, **overrides}).eval()


def test_shapes_and_properties():
    net = _tiny()
    assert net.downsample_factor == 2 and net.latent_channels == 5 and net.codebook_size == 15360
    x = torch.randn(2, 1, 16, 16, 8)
    recon, codes = net(x)
    assert recon.shape == x.shape
    assert codes.shape == (2, 5, 8, 8, 4)
    indices = net.quantize_stage_2_inputs(x)
    assert indices.shape == (2, 8, 8, 4) and indices.dtype == torch.int64
    assert 0 <= indices.min() and indices.max() < 15360
    assert net.get_last_layer() is net.decoder.blocks[-1].conv.conv.weight
    assert net.get_last_layer().shape == (1, 8, 3, 3, 3)
    assert AutoencoderFSQ(num_channels=(16, 16, 16), norm_num_groups=8).downsample_factor == 4


def test_stage_2_round_trip_matches_forward():
    # DESIGN trap 1: indices must describe exactly the codes the decoder sees.
    net = _tiny()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        recon, codes = net(x)
        indices = net.quantize_stage_2_inputs(x)
        assert torch.equal(net.fsq.embed(indices), codes)
        torch.testing.assert_close(net.decode_stage_2_outputs(indices), recon, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", [False, True])
def test_init_args_rebuild_is_exact(attention):
    if attention:
        pytest.importorskip("einops")  # MONAI's SpatialAttentionBlock needs it
    net = _tiny(levels=(7, 5, 5, 5), attention_levels=(False, attention), with_nonlocal_attn=attention)
    args = json.loads(json.dumps(net.init_args))  # JSON-able, as a bundle config would store it
    assert args == net.init_args
    rebuilt = AutoencoderFSQ(**args).eval()
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], net(x)[0])


def test_num_splits_is_exact():
    net = _tiny()
    split = _tiny(num_splits=2)
    split.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(split(x)[0], net(x)[0], rtol=0, atol=1e-5)


def test_gradient_reaches_encoder():
    net = _tiny().train()
    x = torch.randn(1, 1, 8, 8, 8)
    recon, _ = net(x)
    (recon - x).abs().mean().backward()
    assert net.encoder.blocks[0].conv.conv.weight.grad.abs().sum() > 0
    assert net.get_last_layer().grad.abs().sum() > 0


def test_indivisible_shape_raises():
    net = _tiny()
    with pytest.raises(ValueError, match=r"\(16, 15, 16\).*2"):
        net(torch.randn(1, 1, 16, 15, 16))
    with pytest.raises(ValueError, match="spatial_dims"):
        AutoencoderFSQ(spatial_dims=2, **TINY)
