"""The MAISI blocks adapted for CPU: MONAI's maths and gradients, activations left channels-last, plain tensors."""

from __future__ import annotations

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.data import MetaTensor

from prod9_components.engines.base_trainer import channels_last_on_cpu
from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from prod9_components.networks.maisi_blocks import _ResBlock, _Upsample
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
    assert {type(m) for m in vae.modules()} >= {_ResBlock, _Upsample}
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
