"""MONAI's `verify_net_in_out` and `ckpt_export` on the two stage-1 bundles, whose `reconstruction_def` is the one
network with a single input and output (image -> reconstruction).

The export goes the way a user runs it: a best.ckpt record, the training config files (tiny.json layered), trace to
TorchScript; the TorchScript module must then give the eager network's output on a volume of another size."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

from prod9_components.networks import export
from prod9_components.networks.reconstruction import Reconstruction
from tests.helpers import ROOT

STAGE1_BUNDLES = ["maskgit_stage1", "maisi_stage1_vae"]


def bundle_files(bundle: str) -> tuple[str, list[str]]:
    configs = ROOT / "bundles" / bundle / "configs"
    return str(configs / "metadata.json"), [str(configs / "train.json"), str(configs / "tiny.json")]


@pytest.mark.parametrize("bundle", STAGE1_BUNDLES)
def test_verify_net_in_out_passes(bundle):
    meta_file, config_files = bundle_files(bundle)
    verify_net_in_out(net_id="reconstruction_def", meta_file=meta_file, config_file=config_files, device="cpu", n=4)


@pytest.mark.parametrize("bundle", STAGE1_BUNDLES)
def test_verify_net_in_out_catches_a_wrong_output_channel_count(bundle, tmp_path):
    meta_file, config_files = bundle_files(bundle)
    metadata = json.loads(open(meta_file).read())
    metadata["network_data_format"]["outputs"]["pred"]["num_channels"] = 2
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="output channel number `1` doesn't match: `2`"):
        verify_net_in_out(net_id="reconstruction_def", meta_file=str(tmp_path / "metadata.json"),
                          config_file=config_files, device="cpu", n=4)


@pytest.mark.parametrize("bundle", STAGE1_BUNDLES)
def test_ckpt_export_writes_torchscript_that_matches_the_checkpoint(bundle, tmp_path):
    meta_file, config_files = bundle_files(bundle)
    parser = ConfigParser()
    parser.read_config(config_files)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    checkpoint = tmp_path / "best.ckpt"
    export.atomic_save(export.network_record(network, stage=bundle), checkpoint)

    ts_path = tmp_path / "reconstruction.ts"
    ckpt_export(net_id="reconstruction_def", filepath=str(ts_path), ckpt_file=str(checkpoint),
                key_in_ckpt="state_dict", meta_file=meta_file, config_file=config_files, use_trace=True,
                input_shape=[1, 1, 32, 32, 32])

    extra = {"metadata.json": "", "train.json": "", "tiny.json": ""}
    scripted = torch.jit.load(str(ts_path), _extra_files=extra)
    metadata = json.loads(open(meta_file).read())
    assert json.loads(extra["metadata.json"])["network_data_format"] == metadata["network_data_format"]
    assert "reconstruction_def" in json.loads(extra["train.json"])

    eager = Reconstruction(export.build_network(export.load_record(checkpoint))).eval()
    image = torch.rand(2, 1, 48, 32, 40)  # another batch and shape than the trace saw
    with torch.no_grad():
        expected, got = eager(image), scripted(image)
    assert got.shape == (2, 1, 48, 32, 40)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0  # a real network output, not a constant


def test_reconstruction_shares_the_autoencoders_state_dict():
    parser = ConfigParser()
    parser.read_config(bundle_files("maisi_stage1_vae")[1])
    wrapped = parser.get_parsed_content("reconstruction_def")
    keys = list(wrapped.state_dict())
    assert keys == list(wrapped.autoencoder.state_dict()) and not any(k.startswith("autoencoder.") for k in keys)
    # the VAE path is deterministic: the posterior mean, never a sample
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(image), wrapped(image), rtol=0, atol=0)
