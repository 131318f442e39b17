"""scripts/translation_check.py's bound for a sampled translation on the demo data: the real T2 against the same case
under other draws of its bias fields."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from prod9_components.data import discover_cases
from prod9_components.data.demo import MARKER_NAME
from tests.helpers import script_module


def test_sample_bound_is_reported_for_demo_cases_only(demo_dataset_dir, tmp_path):
    check = script_module("translation_check")
    case = discover_cases(demo_dataset_dir)[0]
    bound = check.sample_bound(demo_dataset_dir, [case], 5.0, tmp_path / "bound", draws=2)
    # The bias fields alone keep a sample below a perfect score, but close: the anatomy is the same.
    assert 15.0 < bound["sample_bound_psnr"] < 40.0 and 0.8 < bound["sample_bound_ssim"] < 1.0
    assert sorted(p.name for p in (tmp_path / "bound").iterdir()) == [f"{case['case']}_bias1",
                                                                       f"{case['case']}_bias2"]

    # Another dataset: no marker, or a marker over cases the generator does not rebuild, gives no bound.
    other = tmp_path / "other"
    shutil.copytree(Path(case["t2"]).parent, other / Path(case["t2"]).parent.name)
    moved = {k: str(other / Path(v).parent.name / Path(v).name) if k in ("t2", "seg") else v for k, v in case.items()}
    assert check.sample_bound(str(other), [moved], 5.0, tmp_path / "none") == {}
    (other / MARKER_NAME).write_text((Path(demo_dataset_dir) / MARKER_NAME).read_text())
    seg = nib.load(moved["seg"])
    original = np.asarray(seg.dataobj).copy()
    changed = original.copy()
    changed[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(changed, seg.affine), moved["seg"])
    assert check.sample_bound(str(other), [moved], 5.0, tmp_path / "none") == {}
    marker = json.loads((other / MARKER_NAME).read_text())
    nib.save(nib.Nifti1Image(original, seg.affine), moved["seg"])  # its own segmentation again: it has a bound ...
    assert check.sample_bound(str(other), [moved], 5.0, tmp_path / "ok", draws=1)["sample_bound_psnr"] > 15.0
    # ... which a hostile marker or case name takes away
    hostile = {"a shape that would fill the memory": {**marker, "shape": [100000, 100000, 100000]},
               "a seed that is not a number": {**marker, "seed": "$import os"},
               "a case list that is a string": {**marker, "cases": str(marker["cases"])}}
    for why, bad in hostile.items():
        (other / MARKER_NAME).write_text(json.dumps(bad))
        assert check.sample_bound(str(other), [moved], 5.0, tmp_path / "none") == {}, why
    (other / MARKER_NAME).write_text("{not json")
    assert check.sample_bound(str(other), [moved], 5.0, tmp_path / "none") == {}
    # A listed case name with path parts never becomes a folder outside the bound's own.
    escape = "../../BraTS2021_00000"
    (other / MARKER_NAME).write_text(json.dumps({**marker, "cases": [escape]}))
    assert check.sample_bound(str(other), [{**moved, "case": escape}], 5.0, tmp_path / "none") == {}
    assert not (tmp_path / "none").exists()


def test_num_cases_is_checked_before_anything_is_built(monkeypatch, tmp_path, capsys):
    check = script_module("translation_check")
    monkeypatch.setenv("PROD9_DEMO_DIR", str(tmp_path / "demo"))

    def refused(num_cases: str) -> str:
        monkeypatch.setattr(sys, "argv", ["translation_check.py", "maisi", "--num-cases", num_cases,
                                          "--output-dir", str(tmp_path / "out")])
        with pytest.raises(SystemExit) as stopped:
            check.main()
        assert stopped.value.code == 2
        return capsys.readouterr().err

    assert "--num-cases 2: must be from 3" in refused("2")
    assert "--num-cases 100000: must be from 3 (a training, a validation and a test case) to 200 (~12 MB each" in refused("100000")
    monkeypatch.setenv("BRATS_DATA_DIR", str(tmp_path / "brats"))  # a demo size makes no sense for real data
    assert "but BRATS_DATA_DIR is set" in refused("40")
    assert list(tmp_path.iterdir()) == []  # no demo data, no run


def command_context(check, tmp_path: Path) -> dict:
    """What the check's stages' command templates are filled from, every folder under ``tmp_path``."""
    return {**check.demo.stage_context(tmp_path, {"data": str(tmp_path / "data")}, check.SPACING),
            "stage": str(tmp_path / "s"),
            "test": {"case": "c", "t1": "t1.nii.gz", "t2": "t2.nii.gz", "seg": "seg.nii.gz"}}


def test_the_maisi_stages_pass_one_latent_width_to_every_command(tmp_path):
    """The check widens the MAISI latent; each command checks a checkpoint against its own `--latent-channels`, so a
    stage whose test or use kept the default would stop the check after its training (as it once did). Its VAE alone
    trains with the lighter KL term."""
    check = script_module("translation_check")
    demo = check.demo
    vae, diffusion, controlnet = check.FAMILIES["maisi"]
    context = command_context(check, tmp_path)

    def width(args: list[str]) -> str | None:
        return args[args.index("--latent-channels") + 1] if "--latent-channels" in args else None

    for stage in (vae, diffusion):
        commands = (demo.train_command(stage, context), demo.test_command(stage, context),
                    demo.fill(stage.use, context))
        assert [width(args) for args in commands] == [check.MAISI_LATENT[1]] * 3, stage.name
    # the ControlNet reads the width from its diffusion checkpoint; the demo's own stages keep the bundles' default 4
    assert width(demo.train_command(controlnet, context)) is None
    assert width(demo.train_command(check.ALL["maisi_stage1_vae"], context)) is None
    # the check's VAE trains with the lighter KL term, once, and its other commands do not take the training flag
    train = demo.train_command(vae, context)
    assert train[train.index("--loss#kl_weight") + 1] == "1e-9" and train.count("--loss#kl_weight") == 1
    assert "--loss#kl_weight" not in demo.test_command(vae, context) + demo.fill(vae.use, context)


def test_each_maskgit_stage1_command_builds_the_autoencoder_it_was_trained_as(tmp_path):
    """`test` and `infer` build the FSQ autoencoder from their config and check the checkpoint against it (`infer` once
    refused the demo's checkpoint for want of the levels), so each command carries the same levels and, in the check,
    the same 2x network (the last flag given wins over the demo's [16, 16, 32]); the check's translation trains on
    token crops and tests whole volumes."""
    from prod9_components.cli.bundle_runner import bundles_root

    check = script_module("translation_check")
    demo = check.demo
    context = command_context(check, tmp_path)

    def last(args: list[str], flag: str, values: int = 1) -> list | None:
        at = [i for i, arg in enumerate(args) if arg == flag]
        return args[at[-1] + 1:at[-1] + 1 + values] if at else None

    bundle = json.loads((bundles_root() / "maskgit_stage1" / "configs" / "train.json").read_text())["levels"]
    demo_levels = json.loads(demo.FSQ_LEVELS[1])
    assert np.prod(demo_levels) == 4375 < np.prod(bundle) == 15360
    for stage, channels in ((check.ALL["maskgit_stage1"], None), (check.FAMILIES["maskgit"][0], "[16, 32]")):
        commands = (demo.train_command(stage, context), demo.test_command(stage, context),
                    demo.fill(stage.use, context))
        assert [json.loads(last(args, "--levels")[0]) for args in commands] == [demo_levels] * 3, stage.name
        if channels:
            assert [last(args, "--network_def#num_channels") for args in commands] == [[channels]] * 3
            assert [last(args, "--network_def#num_res_blocks") for args in commands] == [["[0, 1]"]] * 3
    translation = check.FAMILIES["maskgit"][1]
    assert last(demo.train_command(translation, context), "--roi-size", 3) == ["24", "24", "24"]
    assert last(demo.test_command(translation, {**context, "stage": "x"}), "--roi-size", 3) == [
        str(side) for side in context["window"]]


def test_the_maisi_translation_samples_as_chosen_on_the_validation_split(tmp_path, monkeypatch):
    """After training, `validate` runs once per MAISI_SAMPLING setting on the whole validation split; the test and the
    sheet's sample then use the setting with the highest validation PSNR, and the test split is not touched before."""
    check = script_module("translation_check")
    demo = check.demo
    stage = check.FAMILIES["maisi"][-1]
    folder = tmp_path / "s"
    folder.mkdir()
    context = command_context(check, tmp_path)
    psnr = {"1": 20.1, "1.5": 20.9, "2": 19.0}
    commands = []

    def validate(run_stage, args):  # what `validate` writes, a PSNR per setting
        commands.append(args)
        flag = lambda name: args[args.index(name) + 1]  # noqa: E731
        (folder / "metrics_validation.json").write_text(
            json.dumps({"psnr": psnr[flag("--conditioning-scale")]}))

    monkeypatch.setattr(demo, "run_command", validate)
    chosen = demo.choose_setting(stage, context)
    assert chosen == {"scale": "1.5"}
    assert len(commands) == len(psnr) == len(check.MAISI_SAMPLING)
    assert all(args[0] == "validate" and args[args.index("--limit-val-batches") + 1] == "100000"
               and args[-2:] == ["--overwrite", "true"] for args in commands)
    for args in (demo.test_command(stage, {**context, **chosen}), demo.fill(stage.use, {**context, **chosen})):
        assert args[args.index("--num-inference-steps") + 1] == "2"
        assert args[args.index("--conditioning-scale") + 1] == "1.5"
    # the image-conditioned stage has no mask to empty: it neither samples with one nor draws a difference row
    assert not stage.use_empty_mask and not any(row.minus for row in stage.rows)
