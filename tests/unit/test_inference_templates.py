"""Every repository bundle's standalone ``configs/inference.json`` is the exporter's config of its stage written from
the bundle's train.json defaults (:func:`prod9_components.zoo.template.template_config`): one definition for the file
in the repository and the file an export writes. Run without weights, it stops in one line naming the missing
``models/*.pt`` files; the translation template pads with the background code training pads with."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from monai.bundle import ConfigParser

from prod9_components.zoo.inference import BUILDERS
from prod9_components.zoo.template import template_config
from tests.helpers import ROOT, run_module

STAGES = sorted(BUILDERS)


def test_every_bundle_has_a_template():
    assert sorted(p.parent.parent.name for p in (ROOT / "bundles").glob("*/configs/train.json")) == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_inference_json_is_the_template_of_its_train_json(stage):
    path = ROOT / "bundles" / stage / "configs" / "inference.json"
    assert path.read_text() == json.dumps(template_config(stage, ROOT / "bundles" / stage), indent=4) + "\n", \
        f"{path}: differs from its template; rewrite with python scripts/write_inference_templates.py"


@pytest.mark.parametrize("stage", STAGES)
def test_the_template_is_standalone_and_reads_models_under_bundle_root(stage):
    """No id of train.json or of a checkpoint: every reference resolves inside the file; every weights file is
    ``@bundle_root/models/<name>.pt``, and ``initialize`` checks them all before anything loads."""
    config = json.loads((ROOT / "bundles" / stage / "configs" / "inference.json").read_text())
    assert config["bundle_root"] == "."
    text = json.dumps(config)
    referenced = {m.split("#")[0] for m in re.findall(r"@([\w#]+)", text)}
    assert referenced <= set(config), f"{stage}: refers to ids it does not define: {sorted(referenced - set(config))}"
    assert "load_record" not in text and "checkpoint" not in config
    weights = {k: v for k, v in config.items() if isinstance(v, str) and "'models'" in v}
    assert weights["model_path"] == "$os.path.join(@bundle_root, 'models', 'model.pt')"
    for key, value in weights.items():
        assert value == f"$os.path.join(@bundle_root, 'models', '{key.removesuffix('_path')}.pt')", key
    assert config["initialize"][0] == f"$export.require_weights({', '.join('@' + k for k in weights)})"
    assert config["output_dir"] == "$os.path.join(@bundle_root, 'eval')"


@pytest.mark.parametrize("stage, missing", [
    ("maskgit_stage1", "./models/model.pt: weights file not found"),
    ("maisi_stage3_controlnet", "./models/model.pt, ./models/vae.pt, ./models/diffusion.pt: weights files not found"),
])
def test_the_template_without_weights_fails_in_one_line_naming_them(stage, missing, tmp_path):
    bundle = tmp_path / stage
    shutil.copytree(ROOT / "bundles" / stage, bundle)  # the repository's folder stays as it is
    result = run_module("monai.bundle", ["run", "--config_file", "configs/inference.json"], cwd=bundle)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {missing}; "), result.stderr[-2000:]
    assert not (bundle / "eval").exists()


def test_the_translation_template_pads_with_the_token_training_computes():
    """Without a trained record the in-context template computes ``pad_token`` from its autoencoder, by the
    expression of train.json: the same autoencoder gives the same token."""
    torch.manual_seed(0)
    configs = ROOT / "bundles" / "maskgit_stage2_incontext" / "configs"
    template = ConfigParser()
    template.read_config(str(configs / "inference.json"))
    tiny = {"num_channels": [8, 16, 32], "num_res_blocks": [0, 1, 1], "norm_num_groups": 4}
    for key, value in tiny.items():
        template[f"autoencoder_def#{key}"] = value
    autoencoder = template.get_parsed_content("autoencoder_def").eval()  # random weights: a token of its own
    training = ConfigParser()
    training.read_config(str(configs / "train.json"))
    tokens = []
    for parser in (template, training):
        parser["autoencoder"], parser["device"] = autoencoder, torch.device("cpu")
        tokens.append(parser.get_parsed_content("pad_token"))
    assert isinstance(tokens[0], int) and 0 <= tokens[0] < autoencoder.codebook_size
    assert tokens[0] == tokens[1]
