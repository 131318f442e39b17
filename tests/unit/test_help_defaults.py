"""Every ``(default X)`` a verb's ``--help`` states for a flag that is a bundle id is that bundle's value.

The help texts are docstrings written by hand beside bundle configs that change; this keeps them from drifting
(e.g. ``--sw-batch-size`` said "default 1" while the bundles use 4). Defaults that are expressions in the bundle
(read from a checkpoint or export) are not literal values and are skipped."""

from __future__ import annotations

import re

import pytest
from monai.bundle import ConfigParser

from prod9_components.cli.autoencoder import AutoencoderCommands
from prod9_components.cli.bundle_runner import VERB_CONFIGS, bundles_root
from prod9_components.cli.maisi_controlnet import MaisiControlNetCommands
from prod9_components.cli.maisi_diffusion import MaisiDiffusionCommands
from prod9_components.cli.maisi_vae import MaisiVAECommands
from prod9_components.cli.maskgit_controlnet import ControlNetCommands
from prod9_components.cli.transformer import TransformerCommands

COMMANDS = [(AutoencoderCommands, "maskgit_stage1"), (MaisiVAECommands, "maisi_stage1_vae"),
            (TransformerCommands, "maskgit_stage2_label"), (ControlNetCommands, "maskgit_stage3_controlnet"),
            (MaisiDiffusionCommands, "maisi_stage2_diffusion"), (MaisiControlNetCommands, "maisi_stage3_controlnet")]
_ARG = re.compile(r"^ {12}(\w+): (.*(?:\n {16}.*)*)", re.M)  # "    name: text" + its indented continuation lines
# "default 4", "(default: 64 64 64)", "default T1", "default mask", "(default outputs/x)"; words such as "the" or
# "unconditional" describe a default that is not a literal value
_DEFAULT = re.compile(r"default:? (-?[\d.]+(?: [\d.]+)*\b|[\w.-]*/[\w./-]+\w|T1ce|T1|T2|FLAIR|mask|label|both|image|all)")


def stated_defaults(doc: str) -> dict[str, str]:
    """``{flag: the first default its help text states}``."""
    found = {}
    for name, text in _ARG.findall(doc or ""):
        match = _DEFAULT.search(" ".join(text.split()))
        if match:
            found[name] = match.group(1)
    return found


def _same(stated: str, value) -> bool:
    if isinstance(value, (list, tuple)):
        return stated.split() == [f"{v:g}" if isinstance(v, float) else str(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(stated) == float(value)
        except ValueError:
            return False
    return stated == str(value)


def _checked() -> list[tuple]:
    rows = []
    for command, stage in COMMANDS:
        for verb, files in VERB_CONFIGS.items():
            if not hasattr(command, verb):
                continue
            parser = ConfigParser()
            parser.read_config([str(bundles_root() / stage / "configs" / f) for f in files])
            for flag, stated in stated_defaults(getattr(command, verb).__doc__).items():
                value = parser.config.get(flag)
                while isinstance(value, str) and value[1:] in parser.config and value.startswith("@"):
                    value = parser.config[value[1:]]  # "vae_path": "@default_vae_path"
                if flag in parser.config and not (isinstance(value, str) and value.startswith(("$", "@", "%"))):
                    rows.append((stage, verb, flag, stated, value))
    return rows


def test_the_parser_reads_the_help_texts():
    assert stated_defaults(AutoencoderCommands.infer.__doc__)["sw_batch_size"] == "4"
    checked = {(stage, verb, flag) for stage, verb, flag, *_ in _checked()}
    assert {("maskgit_stage1", "infer", "sw_batch_size"), ("maisi_stage1_vae", "infer", "overlap"),
            ("maskgit_stage2_label", "generate", "num_inference_steps"), ("maisi_stage2_diffusion", "train", "vae_path"),
            ("maisi_stage2_diffusion", "generate", "num_inference_steps")} <= checked


@pytest.mark.parametrize("stage, verb, flag, stated, value", _checked(), ids=lambda v: str(v))
def test_help_default_is_the_bundles(stage, verb, flag, stated, value):
    assert _same(stated, value), f"{stage} {verb} --{flag}: help says default {stated}, the bundle has {value!r}"
