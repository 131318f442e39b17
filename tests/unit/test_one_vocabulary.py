"""One vocabulary across the families: a control-type value names the same ControlNet inputs in MaskGiT and MAISI,
unsupported and retired values fail in one line naming the family's values, --num-steps is a deprecated alias
of --num-inference-steps and --generate- / --translate-during-validation of --sample-during-validation. (Guidance
s = 1 = the conditional model: test_maskgit_sampler / test_rectified_flow.)"""

from __future__ import annotations

import logging

import pytest
import torch

from prod9_components.cli.argv import rename_deprecated_flags
from prod9_components.networks.control_types import (MAISI_CONTROL_TYPES, MASKGIT_CONTROL_TYPES, control_inputs,
                                                     parse_control_type)
from prod9_components.networks.maisi_controlnet import MaisiControlNet
from tests.unit.test_maisi_controlnet import inputs as maisi_inputs
from tests.unit.test_maisi_controlnet import trained_like_base
from tests.unit.test_maskgit_controlnet import inputs as maskgit_inputs
from tests.unit.test_maskgit_controlnet import make_control

pytestmark = pytest.mark.usefixtures("one_thread")


def _changes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-4)


def maskgit_reads(control_type: str) -> set[str]:
    """The inputs whose change moves a (trained-like) MaskGiT ControlNet's logits."""
    net, x = make_control(control_type, randomise_projections=True), maskgit_inputs()
    run = lambda mask, label: net(x["target_tokens"], x["target_label"], control_mask=mask, control_label=label)
    with torch.no_grad():
        ref = run(x["control_mask"], x["target_label"])
        read = {"mask": _changes(run(torch.zeros_like(x["control_mask"]), x["target_label"]), ref),
                "label": _changes(run(x["control_mask"], torch.tensor([3, 1])), ref)}
    return {name for name, moved in read.items() if moved}


def maisi_reads(control_type: str) -> set[str]:
    """The inputs whose change moves a (trained-like) MAISI ControlNet's velocity."""
    net = MaisiControlNet.from_base(trained_like_base(), condition_type=control_type).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # MONAI zero-initialises the residual outputs: give them weights, as training would
        for parameter in net.controlnet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    data = maisi_inputs()
    with torch.no_grad():
        ref = net(**data)
        read = {"mask": _changes(net(**{**data, "control_mask": torch.zeros_like(data["control_mask"])}), ref),
                "image": _changes(net(**{**data, "control_image": torch.zeros_like(data["control_image"])}), ref),
                "label": _changes(net(**data, control_label=torch.tensor([0, 3])), ref)}
    return {name for name, moved in read.items() if moved}


@pytest.mark.parametrize("family, control_type", [*(("MaskGiT", v) for v in MASKGIT_CONTROL_TYPES),
                                                  *(("MAISI", v) for v in MAISI_CONTROL_TYPES)])
def test_a_control_type_names_exactly_the_inputs_the_controlnet_reads(family, control_type):
    reads = maskgit_reads(control_type) if family == "MaskGiT" else maisi_reads(control_type)
    assert reads == set(control_inputs(control_type)), (family, control_type)


def test_shared_values_mean_the_same_in_both_families():
    shared = set(MASKGIT_CONTROL_TYPES) & set(MAISI_CONTROL_TYPES)
    assert shared == {"label", "mask+label"}
    for value in shared:
        assert maskgit_reads(value) == maisi_reads(value) == set(value.split("+"))


def test_spelling_is_normalised_and_unsupported_or_retired_values_fail_in_one_line():
    assert parse_control_type("label+mask", "MaskGiT") == "mask+label"
    assert parse_control_type(" Image+LABEL ", "MAISI") == "image+label"
    cases = [
        ("image", "MaskGiT", "the MaskGiT ControlNet cannot read control type 'image' (supported: mask, label, "
                             "mask+label)"),
        ("mask", "MAISI", "control type 'mask' is no longer accepted by the MAISI ControlNet: spell its inputs, "
                          "'mask+label' (supported: label, mask+label, image+label, mask+image+label)"),
        ("both", "MaskGiT", "control type 'both' is no longer accepted by the MaskGiT ControlNet: spell its inputs, "
                            "'mask+label' (supported: mask, label, mask+label)"),
        ("both", "MAISI", "control type 'both' is no longer accepted by the MAISI ControlNet: spell its inputs, "
                          "'mask+image+label' (supported: label, mask+label, image+label, mask+image+label)"),
        ("mask+mask", "MaskGiT", "unknown control type 'mask+mask': join mask, image, label with '+' (the MaskGiT "
                                 "ControlNet supports mask, label, mask+label)"),
    ]
    for value, family, message in cases:
        with pytest.raises(ValueError) as error:
            parse_control_type(value, family)
        assert str(error.value) == message and "\n" not in message


def test_num_steps_alias_warns_and_maps_to_num_inference_steps(caplog, monkeypatch, capsys):
    with caplog.at_level(logging.WARNING, logger="prod9"):
        assert rename_deprecated_flags(["generate", "--num-steps", "8", "--num_steps=3", "--seed", "1"]) == \
            ["generate", "--num-inference-steps", "8", "--num-inference-steps=3", "--seed", "1"]
    assert [r.getMessage() for r in caplog.records] == [
        "--num-steps is deprecated: use --num-inference-steps (same meaning)",
        "--num_steps is deprecated: use --num-inference-steps (same meaning)"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prod9"):
        assert rename_deprecated_flags(["train", "--generate-during-validation", "False",
                                        "--translate_during_validation=True"]) == \
            ["train", "--sample-during-validation", "False", "--sample-during-validation=True"]
    assert [r.getMessage() for r in caplog.records] == [
        "--generate-during-validation is deprecated: use --sample-during-validation (same meaning)",
        "--translate_during_validation is deprecated: use --sample-during-validation (same meaning)"]

    # Through the real console script: the old flag reaches the bundle id num_inference_steps.
    from prod9_components.cli import maskgit_controlnet

    def record_ids(stage, verb, config, ids):
        raise ValueError(f"ids: num_inference_steps={ids['num_inference_steps']} num_steps={ids.get('num_steps')}")

    monkeypatch.setattr(maskgit_controlnet, "run_bundle", record_ids)
    with pytest.raises(SystemExit):
        maskgit_controlnet.main(["generate", "--num-steps", "5"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: ids: num_inference_steps=5 num_steps=None"
