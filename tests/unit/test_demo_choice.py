"""A stage with settings to choose from (the translation check's MAISI ControlNet: its conditioning scale) tests and
samples with the one whose validation split scores the best."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from tests.helpers import script_module


def test_the_scale_with_the_best_validation_score_is_tested_and_used(tmp_path, monkeypatch):
    """`validate` runs once per scale on the whole validation split; the best PSNR wins, a NaN score never does, and
    the test and the sheet's translation then use the winner's scale."""
    check = script_module("translation_check")
    demo, stage = check.demo, check.MAISI_TRANSLATION
    assert stage.choose_by == "psnr" and len(stage.choices) >= 2
    folder = tmp_path / stage.name
    folder.mkdir()
    context = {**demo.stage_context(tmp_path, {"data": str(tmp_path / "data")}, demo.SPACING), "stage": str(folder),
               "test": {"case": "c", "t1": "t1.nii.gz", "t2": "t2.nii.gz", "seg": "seg.nii.gz"}}
    assert all(set(setting) == {"scale"} for setting in stage.choices)
    first, second, third = "1", "3", "9"  # three settings of the stage's flags: a NaN, a loser, the winner
    stage = replace(stage, choices=tuple({"scale": scale} for scale in (first, second, third)))
    psnr = {first: math.nan, second: 20.1, third: 21.4}  # NaN first: a bare max() would keep it
    commands = []

    def validate(run_stage, args):  # what `validate` writes: every score, one of them the choice's
        commands.append(args)
        scale = args[args.index("--conditioning-scale") + 1]
        (folder / "metrics_validation.json").write_text(
            json.dumps({"val_loss": 1.0, "ssim": 1.0 - float(scale) / 10, "psnr": psnr[scale]}))

    monkeypatch.setattr(demo, "run_command", validate)
    chosen = demo.choose_setting(stage, context)
    assert chosen == {"scale": third}  # by PSNR, not by the SSIM that favours the first
    assert [args[0] for args in commands] == ["validate"] * 3
    assert all(args[args.index("--output-dir") + 1] == str(folder) and args[-2:] == ["--overwrite", "true"]
               for args in commands)
    for args in (demo.test_command(stage, {**context, **chosen}), demo.fill(stage.use, {**context, **chosen})):
        assert args[args.index("--conditioning-scale") + 1] == third

    psnr = {first: 21.0, second: 21.0, third: 20.0}  # a tie goes to the first (the weaker control)
    assert demo.choose_setting(stage, context) == {"scale": first}
