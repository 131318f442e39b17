"""The demo's windows: stage 1's training crop and the window every stage tests and samples whole volumes with cover
the same millimetres at any ``--spacing`` (a voxel size above 0)."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Compose

from prod9_components.data import discover_cases
from prod9_components.data.demo import make_demo_dataset
from prod9_components.data.transforms import preprocessing
from tests.helpers import script_module


def roi_sizes(args: list[str]) -> list[list[int]]:
    """The values of each ``--roi-size`` flag in ``args``."""
    return [[int(v) for v in args[i + 1:i + 4]] for i, arg in enumerate(args) if arg == "--roi-size"]


def test_every_command_gets_the_windows_of_its_spacing(tmp_path):
    """At the demo's 4 mm the published windows; at 5 mm the same millimetres in fewer voxels (the 4 mm windows were
    mostly padding there), at 2 mm in more (the 4 mm windows held a part of the brain), each side a multiple of 4."""
    demo = script_module("demo")
    test = {"stage": str(tmp_path / "s"),
            "test": {"case": "c", **{k: f"c_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair", "seg")}}}
    expected = {4.0: ([44, 56, 40], [48, 60, 40], [48, 64, 48]), 5.0: ([36, 48, 32], [40, 48, 32], [48, 48, 32]),
                2.0: ([88, 112, 80], [96, 120, 80], [96, 128, 80])}
    assert demo.SPACING == 4.0
    for mm, (crop, window, canvas) in expected.items():
        context = {**demo.stage_context(tmp_path, {"data": "d"}, mm), **test}
        for stage in demo.STAGES:
            # the MAISI generators encode and decode latents on their canvas (sides a multiple of 16 voxels)
            whole = canvas if stage.name in ("maisi_stage2_diffusion", "maisi_stage3_controlnet") else window
            setting = stage.choices[-1] if stage.choices else {}
            train = demo.train_command(stage, context)
            assert roi_sizes(train) in ([], [crop], [whole]), (mm, stage.name, train)
            chosen = {**context, **setting}
            for args in (demo.test_command(stage, chosen), demo.fill(stage.use, chosen)):
                assert roi_sizes(args) == [whole], (mm, stage.name, args)
        assert roi_sizes(demo.train_command(demo.STAGES[0], context)) == [crop]


def test_the_window_holds_a_demo_brain_at_each_spacing(tmp_path):
    """A full-size demo case, resampled and cropped to the brain as every stage reads it: at 3, 4 and 5 mm the brain
    fits the window of that spacing on every axis."""
    demo = script_module("demo")
    make_demo_dataset(tmp_path, num_cases=1, seed=0)
    for mm in (3.0, 4.0, 5.0):
        window = np.array(demo.windows(mm)["window"])
        for case in discover_cases(str(tmp_path)):
            image = Compose(preprocessing(image_keys=["t2"], spacing=(mm,) * 3, k_divisible=1))(case)["t2"][0]
            inside = np.argwhere(np.asarray(image) > 0)
            assert (inside.max(0) - inside.min(0) + 1 <= window).all(), (mm, case["case"], window)


@pytest.mark.parametrize("value", ["0", "-4", "nan", "inf"])
def test_a_spacing_that_is_no_voxel_size_is_refused_in_one_line(monkeypatch, capsys, value):
    """Refused by the parser, before the demo writes its split or divides by it for the windows."""
    demo = script_module("demo")
    monkeypatch.setattr("sys.argv", ["demo.py", f"--spacing={value}"])
    with pytest.raises(SystemExit) as exit_:
        demo.parse_args()
    message = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--spacing {float(value)}: must be a voxel size in mm above 0" in message
