"""scripts/translation_check.py's bound for a sampled translation on the demo data: the real T2 against the same case
under other draws of its bias fields."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

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
    changed = np.asarray(seg.dataobj).copy()
    changed[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(changed, seg.affine), moved["seg"])
    assert check.sample_bound(str(other), [moved], 5.0, tmp_path / "none") == {}
    marker = json.loads((other / MARKER_NAME).read_text())
    (other / MARKER_NAME).write_text(json.dumps({**marker, "shape": [100000, 100000, 100000]}))
    assert check.sample_bound(str(other), [moved], 5.0, tmp_path / "none") == {}
