"""A checkpoint record names a network from an explicit registry with checked constructor arguments: a hostile record
(one naming ``monai.utils.module.instantiate`` with ``__path``) is refused in one line naming the file, and runs
nothing; the records the project writes still rebuild."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prod9_components.networks.export import atomic_save, load_network, network_record
from prod9_components.networks.maskgit_controlnet import MaskGiTControlNet
from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream

TINY_TRANSFORMER = dict(codebook_size=8, hidden_dim=16, num_layers=2, num_heads=2, max_grid_size=(4, 4, 4))


def hostile_record(marker) -> dict:
    """What ``instantiate`` would turn into ``open(marker, "w")``: a file appears if the loader calls it."""
    return {"format": "prod9-network", "version": 1, "network_target": "monai.utils.module.instantiate",
            "network_args": {"__path": "builtins.open", "__mode": "default", "file": str(marker), "mode": "w"},
            "state_dict": {}, "preprocessing": {}, "stage": "maskgit_stage1"}


def test_a_record_naming_a_function_is_refused_and_runs_nothing(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    atomic_save(hostile_record(marker), path)
    with pytest.raises(ValueError) as error:
        load_network(path)
    message = str(error.value)
    assert message.startswith(f"{path}: refusing to build network_target 'monai.utils.module.instantiate'")
    assert "\n" not in message and "AutoencoderFSQ" in message
    assert not marker.exists()


@pytest.mark.parametrize("args, expected", [
    ({**TINY_TRANSFORMER, "__path": "subprocess.run"},
     "network_args has '__path', which TransformerDecoderSingleStream"),
    ({"hidden_dim": 16}, "network_args lacks codebook_size"),
    ({**TINY_TRANSFORMER, "hidden_dim": {"_target_": "os.system"}}, "network_args.hidden_dim is a dict"),
    ("codebook_size=8", "network_args is a str, expected a dict"),
])
def test_registered_class_with_bad_arguments_is_refused(tmp_path, args, expected):
    path = tmp_path / "bad.ckpt"
    record = network_record(TransformerDecoderSingleStream(**TINY_TRANSFORMER))
    atomic_save({**record, "network_args": args}, path)
    with pytest.raises(ValueError, match=f"^{path}: {expected}"):
        load_network(path)


def test_controlnet_base_args_are_checked_against_the_base_class(tmp_path):
    path = tmp_path / "controlnet.ckpt"
    record = network_record(MaskGiTControlNet(TINY_TRANSFORMER, downsample_factor=2))
    record["network_args"]["base_args"]["__path"] = "subprocess.run"
    atomic_save(record, path)
    with pytest.raises(ValueError, match=f"^{path}: network_args.base_args has '__path'"):
        load_network(path)


def test_a_controlnet_record_rebuilds_with_its_weights(tmp_path):
    path = tmp_path / "controlnet.ckpt"
    torch.manual_seed(0)
    network = MaskGiTControlNet(TINY_TRANSFORMER, control_type="mask+label", downsample_factor=2)
    atomic_save(network_record(network, stage="maskgit_stage3_controlnet"), path)
    rebuilt, record = load_network(path, stages=["maskgit_stage3_controlnet"])
    assert type(rebuilt) is MaskGiTControlNet and record["stage"] == "maskgit_stage3_controlnet"
    with pytest.raises(ValueError, match="a 'maskgit_stage3_controlnet' checkpoint, expected one of maisi_stage3"):
        load_network(path, stages=["maisi_stage3_controlnet"])
    for (name, want), (_, got) in zip(network.state_dict().items(), rebuilt.state_dict().items()):
        torch.testing.assert_close(got, want, msg=name)


def test_an_unregistered_class_is_not_written():
    with pytest.raises(ValueError, match="torch.nn.modules.linear.Linear is not in .*NETWORK_CLASSES"):
        network_record(nn.Linear(2, 2), network_args={"in_features": 2, "out_features": 2})


@pytest.mark.parametrize("change, expected", [
    ({"network_args": {**TINY_TRANSFORMER, "num_heads": 3}},
     "cannot build TransformerDecoderSingleStream from its network_args (hidden_dim (16) must be divisible"),
    ({"network_args": {**TINY_TRANSFORMER, "hidden_dim": 32}},
     "its state_dict does not fit the TransformerDecoderSingleStream its network_args describe (Error(s) in loading "
     "state_dict for TransformerDecoderSingleStream: size mismatch for token_embedding.weight"),
    ({"state_dict": None}, "its state_dict does not fit"),
])
def test_a_record_its_class_refuses_is_one_line_naming_the_file(tmp_path, change, expected):
    path = tmp_path / "odd.ckpt"
    atomic_save({**network_record(TransformerDecoderSingleStream(**TINY_TRANSFORMER)), **change}, path)
    with pytest.raises(ValueError) as error:
        load_network(path)
    assert str(error.value).startswith(f"{path}: {expected}") and "\n" not in str(error.value), str(error.value)
