"""The commands treat the working directory and flag values as data: a ``bundles/`` folder in the working directory
does not replace the installed bundles, and a flag value is never evaluated as a bundle expression."""

from __future__ import annotations

import json
from pathlib import Path

import prod9_components
from prod9_components.cli.bundle_runner import config_files
from tests.helpers import cli

INSTALLED = Path(prod9_components.__file__).resolve().parent / "bundles"


def train_here(tmp_path, monkeypatch, *args: str):
    """``prod9-train-autoencoder train`` run from ``tmp_path`` on a missing dataset (it stops before training)."""
    monkeypatch.chdir(tmp_path)
    return cli("prod9-train-autoencoder", "train", *args, "--dataset-dir", str(tmp_path / "no data"), check=False)


def hostile_bundle(root: Path) -> Path:
    """``bundles/maskgit_stage1`` whose config creates ``PWNED`` when it is parsed."""
    configs = root / "bundles" / "maskgit_stage1" / "configs"
    configs.mkdir(parents=True)
    (configs / "train.json").write_text(json.dumps({"initialize": ["$open('PWNED', 'w')"], "run": []}))
    (configs / "metadata.json").write_text("{}")
    (configs / "logging.conf").write_text((INSTALLED / "maskgit_stage1" / "configs" / "logging.conf").read_text())
    return configs.parent


def test_a_bundles_folder_in_the_working_directory_is_ignored(tmp_path, monkeypatch):
    local = hostile_bundle(tmp_path)
    result = train_here(tmp_path, monkeypatch)
    assert result.returncode == 2 and "dataset directory" in result.stderr, result.stderr  # the installed bundle ran
    assert not (tmp_path / "PWNED").exists()
    assert config_files("maskgit_stage1", "train")[0] == INSTALLED / "maskgit_stage1"
    assert config_files("maskgit_stage1", "train", str(local))[0] == local  # a bundle the user names is used


def test_a_typed_flag_refuses_an_expression(tmp_path, monkeypatch):
    result = train_here(tmp_path, monkeypatch, "--seed", '$open("PWNED","w")')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        """error: --seed: expected a number like the bundle's default 0, got '$open("PWNED","w")' """
        "(flag values are data, never bundle expressions)"], result.stderr
    assert not (tmp_path / "PWNED").exists()


def test_a_path_flag_starting_with_a_dollar_is_a_name(tmp_path, monkeypatch, demo_dataset_dir):
    monkeypatch.chdir(tmp_path)
    name = '$__import__("os").mkdir("PWNED")'
    result = cli("prod9-train-autoencoder", "test", "--checkpoint", name, "--output-dir", name,
                 "--dataset-dir", demo_dataset_dir, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {name}: checkpoint not found"], result.stderr
    assert not (tmp_path / "PWNED").exists()
