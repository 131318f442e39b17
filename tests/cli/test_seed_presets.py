"""The seed's config names and nested presets: names resolve to our installed bundles, the seed's YAML examples map
onto bundle ids through ``SEED_KEYS``, and a key that maps to nothing is a one-line error naming the closest; so is
a ``--flag`` that names no id of the verb's configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from monai.bundle import ConfigParser

from prod9_components.cli.bundle_runner import (UsageError, bundle_ids, bundles_root, check_flag_ids, config_files,
                                                user_preset)
from prod9_components.cli.literal_flags import FlagValueError
from prod9_components.cli.seed_configs import SEED_CONFIGS
from prod9_components.cli.seed_presets import PresetError, preset_overrides
from prod9_components.cli.transformer import _stage
from tests.cli.test_seed_workflows import SEED_DOC
from tests.helpers import cli


def seed_yaml_blocks() -> dict[str, str]:
    """The document's ```yaml blocks by their first comment line (``# configs/...`` or ``# Add to any config file``)."""
    blocks = re.findall(r"```yaml\n(.*?)```", SEED_DOC.read_text(), flags=re.S)
    return {block.splitlines()[0].lstrip("# ").strip(): block for block in blocks}


def overrides_for(tmp_path, bundle: str, text: str, name: str = "preset.yaml") -> dict:
    path = tmp_path / name
    path.write_text(text)
    return preset_overrides(path, bundle_ids(bundles_root() / bundle), bundle)


@pytest.mark.parametrize("name", sorted(SEED_CONFIGS))
def test_a_seed_config_name_is_its_installed_bundle(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    stage = SEED_CONFIGS[name].stage
    assert config_files(stage, "train", name) == (bundles_root() / stage,
                                                  [str(bundles_root() / stage / "configs" / "train.json")])
    assert user_preset(name) is None


def test_the_in_context_name_picks_the_in_context_transformer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _stage("configs/maskgit/brats/stage2/in_context.yaml", None, None) == "maskgit_stage2_incontext"
    assert _stage("configs/maskgit/brats/stage2_label/base.yaml", None, None) == "maskgit_stage2_label"


def test_a_file_at_a_seed_path_is_the_users_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "configs/maskgit/brats/stage1/base.yaml"
    (tmp_path / name).parent.mkdir(parents=True)
    (tmp_path / name).write_text("trainer:\n  max_epochs: 3\n")
    assert user_preset(name) == Path(name)
    assert config_files("maskgit_stage1", "train", name)[1] == [str(bundles_root() / "maskgit_stage1" / "configs" /
                                                                    "train.json")]


def test_a_seed_name_of_another_command_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("prod9-train-autoencoder", "train", "--config", "configs/maisi/autoencoder/brats_vae.yaml",
                 check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: --config configs/maisi/autoencoder/brats_vae.yaml: the "
                                                      "seed's config of bundle maisi_stage1_vae, not of maskgit_stage1")


def test_the_seeds_in_context_example_maps_onto_the_in_context_bundle(tmp_path):
    text = seed_yaml_blocks()["configs/maskgit/brats/stage2/in_context.yaml"]
    assert overrides_for(tmp_path, "maskgit_stage2_incontext", text) == {
        "network_def#hidden_dim": 512, "network_def#num_layers": 12, "network_def#num_heads": 8,
        "network_def#max_context_length": 8, "source_modalities": ["T1", "T1ce", "T2"], "target_modality": "FLAIR",
        "target_modalities": ["FLAIR"], "batch_size": 4}


def test_the_seeds_controlnet_example_maps_onto_the_controlnet_bundle(tmp_path):
    text = seed_yaml_blocks()["In configs/maskgit/brats/stage3/base.yaml"]
    assert overrides_for(tmp_path, "maskgit_stage3_controlnet", text) == {
        "control_type": "both", "transformer_path": "outputs/maskgit_stage2_label/best.ckpt"}


@pytest.mark.parametrize("bundle", ["maskgit_stage1", "maskgit_stage2_label", "maisi_stage1_vae",
                                    "maisi_stage2_diffusion"])
def test_the_seeds_sliding_window_and_quick_development_examples_map_onto_every_stage(bundle, tmp_path):
    blocks = seed_yaml_blocks()
    window = overrides_for(tmp_path, bundle, blocks["In any config file"], "window.yaml")
    assert window["sw_batch_size"] == 1 and list(window.values()).count([64, 64, 64]) == 1
    assert {window.get("sw_overlap"), window.get("overlap")} == {0.5, None}
    quick = overrides_for(tmp_path, bundle, blocks["Add to any config file"], "quick.yaml")
    assert {k: quick[k] for k in ("epochs", "limit_train_batches", "limit_val_batches", "num_workers",
                                  "cache_rate")} == {"epochs": 3, "limit_train_batches": 10, "limit_val_batches": 2,
                                                     "num_workers": 4, "cache_rate": 1.0}
    assert quick["device"] == "$torch.device('cuda')"


def test_flat_bundle_ids_keep_working(tmp_path):
    tiny = json.loads((bundles_root() / "maskgit_stage1" / "configs" / "tiny.json").read_text())
    del tiny["export_path"]
    assert overrides_for(tmp_path, "maskgit_stage1", json.dumps(tiny), "tiny.json") == tiny


@pytest.mark.parametrize("text, message", [
    ("model:\n  hiden_dim: 64\n", "preset.yaml: model.hiden_dim maps to no bundle id of maskgit_stage2_label "
                                  "(closest: 'model.hidden_dim')"),
    ("epoch: 3\n", "preset.yaml: epoch maps to no bundle id of maskgit_stage2_label (closest: 'epochs')"),
    ("model:\n  control_type: mask\n", "preset.yaml: model.control_type sets control_type, which bundle "
                                       "maskgit_stage2_label does not read"),
    ("sliding_window:\n  enabled: false\n", "preset.yaml: sliding_window.enabled must be True (inference and "
                                            "validation always encode and decode through the sliding window), "
                                            "got False"),
    ("model:\n  hidden_dim: 64\nmodality_processor:\n  hidden_dim: 32\n",
     "preset.yaml: modality_processor.hidden_dim and model.hidden_dim both set network_def#hidden_dim, to different "
     "values"),
    ("optimizer: {_target_: os.system, command: 'true'}\n", "preset.yaml: optimizer: a preset value cannot name a "
                                                            "component"),
])
def test_a_key_no_bundle_id_reads_is_one_line_naming_the_closest(tmp_path, text, message):
    with pytest.raises(PresetError) as error:
        overrides_for(tmp_path, "maskgit_stage2_label", text)
    assert str(error.value).startswith(str(tmp_path / message.split(":")[0]) + ":" + message.split(":", 1)[1])


def test_a_preset_value_is_data(tmp_path, monkeypatch):
    with pytest.raises(FlagValueError, match="seed: expected a number"):
        overrides_for(tmp_path, "maskgit_stage1", "seed: $open('PWNED', 'w')\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("trainer:\n  max_epochs: 1\ndataset_dir: $open('PWNED', 'w')\n")
    result = cli("prod9-train-autoencoder", "train", "--config", "p.yaml", check=False)
    assert result.returncode == 2 and "$open('PWNED', 'w')" in result.stderr  # read as a (missing) folder name
    assert not (tmp_path / "PWNED").exists()


def test_a_bad_preset_key_stops_the_command_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("trainer:\n  max_epoch: 1\n")
    result = cli("prod9-train-autoencoder", "train", "--config", "p.yaml", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: p.yaml: trainer.max_epoch maps to no bundle id of "
                                                      "maskgit_stage1 (closest: 'trainer.max_epochs')")


@pytest.mark.parametrize("flag, message", [
    # a typo, and a setting another stage has (the ControlNet has no discriminator)
    (("--learnig-rate", "0.1"), "error: --learnig-rate: maisi_stage3_controlnet train reads no such setting "
                                "(closest: --learning-rate)"),
    (("--disc-learning-rate", "0.1"), "error: --disc-learning-rate: maisi_stage3_controlnet train reads no such "
                                      "setting"),
])
def test_a_flag_no_bundle_id_reads_stops_the_command_in_one_line(tmp_path, monkeypatch, flag, message):
    monkeypatch.chdir(tmp_path)
    result = cli("prod9-train-maisi-controlnet", "train", *flag, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert list(tmp_path.iterdir()) == []  # refused before anything is read or written


def test_flags_may_add_a_constructor_argument_or_a_tracking_setting():
    ids = ConfigParser({"epochs": 1, "network_def": {"_target_": "Net", "width": 8}, "splits": "$[]"})
    check_flag_ids({"epochs": 2, "network_def#depth": 3}, ids, "b train")  # a new argument of a mapping
    check_flag_ids({"run_name": "x"}, ids, "b train", extra=("run_name",))  # the tracking settings' ids
    for key in ("epoch", "splits#x"):  # no such id; a new key under an expression
        with pytest.raises(UsageError, match=f"--{key}: b train reads no such setting"):
            check_flag_ids({key: 1}, ids, "b train")
