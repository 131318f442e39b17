"""The MAISI blocks adapted for CPU: MONAI's maths and gradients, activations left channels-last, plain tensors."""

from __future__ import annotations

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.data import MetaTensor

from prod9_components.engines.base_trainer import channels_last_on_cpu
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from prod9_components.networks.maisi_blocks import _ResBlock, _ToOneChannel, _Upsample
from prod9_components.networks.maisi_vae import MaisiVAE

TINY = {"num_channels": [8, 16, 32], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4}


def _networks(use_convtranspose: bool) -> tuple[MaisiVAE, AutoencoderKlMaisi]:
    """A tiny adapted VAE and MONAI's own network with the same weights."""
    torch.manual_seed(0)
    vae = MaisiVAE(**TINY, use_convtranspose=use_convtranspose)
    plain = AutoencoderKlMaisi(3, 1, 1, [1, 1, 1], [8, 16, 32], [False, False, False], latent_channels=4,
                               norm_num_groups=4, norm_eps=1e-6, with_encoder_nonlocal_attn=False,
                               with_decoder_nonlocal_attn=False, use_flash_attention=False, num_splits=1,
                               save_mem=False, use_convtranspose=use_convtranspose)
    plain.load_state_dict(vae.state_dict(), strict=True)
    return vae, plain


@pytest.mark.parametrize("use_convtranspose", [True, False])
def test_values_and_gradients_are_monais(use_convtranspose, one_thread):
    vae, plain = _networks(use_convtranspose)
    assert {type(m) for m in vae.modules()} >= {_ResBlock, _Upsample, _ToOneChannel}
    torch.manual_seed(1)
    image = torch.rand(2, 1, 16, 12, 8)
    for network in (vae, plain):
        z_mu, _ = network.encode(image)
        network.decode(z_mu).square().mean().backward()
    torch.testing.assert_close(vae.encode(image)[0], plain.encode(image)[0], atol=1e-5, rtol=1e-5)
    for (name, mine), theirs in zip(vae.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("build", [lambda: _networks(True)[0], lambda: _networks(False)[0],
                                   lambda: AutoencoderFSQ(num_channels=(8, 16, 32), num_res_blocks=(1, 1, 1),
                                                          norm_num_groups=4)])
def test_blocks_keep_channels_last_and_return_plain_tensors(build, one_thread):
    network = channels_last_on_cpu(build(), "cpu")
    outputs = []
    for module in network.modules():
        if isinstance(module, (_ResBlock, _Upsample)):
            module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    image = MetaTensor(torch.rand(2, 1, 16, 12, 8)).to(memory_format=torch.channels_last_3d)
    network(image)
    assert len(outputs) >= 4
    for output in outputs:
        assert type(output) is torch.Tensor  # MONAI's metadata would ride through every later op
        assert output.is_contiguous(memory_format=torch.channels_last_3d)
        assert not output.is_contiguous()  # MONAI's blocks copy into this layout


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_one_channel_convolution_is_conv3d(bias, channels_last, one_thread):
    """Values and all three gradients equal Conv3d's, on a volume with a side of 1 (every tap but the centre falls
    outside) and sides of 2 and 5, from either layout; without gradients it is Conv3d."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 1, 3, padding=1, bias=bias)
    mine = torch.nn.Conv3d(6, 1, 3, padding=1, bias=bias)
    mine.load_state_dict(conv.state_dict())
    mine.__class__ = _ToOneChannel
    x = torch.randn(2, 6, 5, 1, 2)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    x_mine, x_conv = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad = torch.randn(2, 1, 5, 1, 2)
    y_mine, y_conv = mine(x_mine), conv(x_conv)
    assert y_mine.grad_fn is not None and type(y_mine.grad_fn).__name__ == "_OneChannelConvFunctionBackward"
    torch.testing.assert_close(y_mine, y_conv, atol=1e-6, rtol=1e-5)
    y_mine.backward(grad)
    y_conv.backward(grad)
    torch.testing.assert_close(x_mine.grad, x_conv.grad, atol=1e-6, rtol=1e-5)
    assert x_mine.grad.is_contiguous(memory_format=torch.channels_last_3d) == channels_last  # autograd keeps x's
    for theirs, ours in zip(conv.parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        y = mine(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, y_conv.detach(), atol=1e-6, rtol=1e-5)


def test_one_channel_convolution_swaps_only_what_it_computes(one_thread):
    vae = MaisiVAE(**TINY, use_convtranspose=True)
    swapped = [m for m in vae.modules() if type(m) is _ToOneChannel]
    assert len(swapped) == 1 and swapped[0].in_channels == 8  # the decoder's last convolution; the encoder's first
    # convolution takes one channel, it does not give one, and the 1x1x1 quantisation convolutions stay Conv3d
    assert all(type(m) is torch.nn.Conv3d for m in vae.modules()
               if isinstance(m, torch.nn.Conv3d) and m.out_channels > 1)
