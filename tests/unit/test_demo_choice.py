"""The demo's ControlNets test and sample at the conditioning scale whose validation samples the segmenter finds
best."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from tests.helpers import script_module


@pytest.mark.parametrize("name", ["maskgit_stage3_controlnet", "maisi_stage3_controlnet"])
def test_each_controlnet_takes_the_scale_with_the_best_validation_dice(tmp_path, monkeypatch, name):
    """`validate` runs once per scale on the whole validation split; the best seg_dice_generated wins, a NaN score
    (no tumour found to score) never does, and the test and the sheet's sample then use the winner's scale."""
    demo = script_module("demo")
    stage = next(s for s in demo.STAGES if s.name == name)
    assert stage.choose_by == "seg_dice_generated" and len(stage.choices) >= 2
    folder = tmp_path / name
    folder.mkdir()
    context = {"out": str(tmp_path), "data": str(tmp_path / "data"), "mm": "4.0", "stage": str(folder),
               "test": {"case": "c", "t1": "t1.nii.gz", "t2": "t2.nii.gz", "seg": "seg.nii.gz"},
               **{s.name: str(tmp_path / s.name) for s in demo.STAGES}}
    assert all(set(setting) == {"scale"} for setting in stage.choices)
    first, second, third = "1", "3", "9"  # three settings of the stage's flags: a NaN, a loser, the winner
    stage = replace(stage, choices=tuple({"scale": scale} for scale in (first, second, third)))
    dice = {first: math.nan, second: 0.21, third: 0.34}  # NaN first: a bare max() would keep it
    commands = []

    def validate(run_stage, args):  # what `validate` writes: every score, one of them the choice's
        commands.append(args)
        scale = args[args.index("--conditioning-scale") + 1]
        (folder / "metrics_validation.json").write_text(
            json.dumps({"val_loss": 1.0, "psnr": 30.0 - float(scale), "seg_dice_generated": dice[scale]}))

    monkeypatch.setattr(demo, "run_command", validate)
    chosen = demo.choose_setting(stage, context)
    assert chosen == {"scale": third}  # by Dice, not by the PSNR that favours the first
    assert [args[0] for args in commands] == ["validate"] * 3
    assert all(args[args.index("--output-dir") + 1] == str(folder) and args[-2:] == ["--overwrite", "true"]
               for args in commands)
    for args in (demo.test_command(stage, {**context, **chosen}), demo.fill(stage.use, {**context, **chosen})):
        assert args[args.index("--conditioning-scale") + 1] == third

    dice = {first: 0.3, second: 0.3, third: 0.1}  # a tie goes to the first (the weaker control)
    assert demo.choose_setting(stage, context) == {"scale": first}
