"""The demo trains and validates on the split every bundle makes of the 8-case demo dataset, and tests on its test case
plus further demo cases that no stage sees before."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import prod9_components.data as data
from prod9_components.data import prepare_splits
from tests.helpers import script_module

MODALITIES = ("t1", "t1ce", "t2", "flair", "seg")


def _cases(folder, count):
    """``count`` cases named as the demo generator names them, each five 2^3 volumes."""
    for index in range(count):
        name = f"BraTS2021_{index:05d}"
        (folder / name).mkdir(parents=True)
        for modality in MODALITIES:
            nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)),
                     folder / name / f"{name}_{modality}.nii.gz")
    return str(folder)


def test_the_demo_tests_on_further_cases_and_trains_on_the_bundles_split(tmp_path, monkeypatch):
    demo = script_module("demo")
    monkeypatch.delenv("BRATS_DATA_DIR", raising=False)
    asked = []

    def resolve(dataset_dir=None, demo_cases=8):  # the demo dataset of that many cases, as the generator names them
        asked.append(demo_cases)
        folder = tmp_path / f"n{demo_cases}"
        return str(folder) if folder.exists() else _cases(folder, demo_cases)

    monkeypatch.setattr(data, "resolve_dataset_dir", resolve)
    out = tmp_path / "out"
    given = demo.demo_data(out, 4)
    assert asked == [11] and given["data"] == str(tmp_path / "n11")
    splits = json.loads((out / "datalist.json").read_text())
    assert given["datalist"] == str(out / "datalist.json")
    names = {split: [case["case"] for case in items] for split, items in splits.items()}

    bundles = prepare_splits(_cases(tmp_path / "n8", 8), tmp_path / "bundle_run", seed=0)  # what `train` splits
    assert names["training"] == [c["case"] for c in bundles["training"]] and len(names["training"]) == 5
    assert names["validation"] == [c["case"] for c in bundles["validation"]]
    assert names["test"] == [bundles["test"][0]["case"], "BraTS2021_00008", "BraTS2021_00009", "BraTS2021_00010"]
    assert all(case["t2"].startswith(str(tmp_path / "n11")) for items in splits.values() for case in items)

    assert demo.demo_data(tmp_path / "out1", 1)["data"] == str(tmp_path / "n8")  # 1: the demo split as it is
    assert [c["case"] for c in json.loads((tmp_path / "out1" / "datalist.json").read_text())["test"]] == \
        [bundles["test"][0]["case"]]

    again = demo.demo_data(out, 2)  # an earlier demo's split (another --test-cases) is rewritten
    assert len(json.loads(Path(again["datalist"]).read_text())["test"]) == 2

    mine = tmp_path / "mine"  # a user's own datalist.json in the output folder is refused, untouched
    mine.mkdir()
    for text in ('{"training": [], "validation": [], "test": []}', "not JSON"):
        (mine / "datalist.json").write_text(text)
        with pytest.raises(demo.DemoError, match="datalist.json exists and is not a demo split"):
            demo.demo_data(mine, 4)
        assert (mine / "datalist.json").read_text() == text

    monkeypatch.setenv("BRATS_DATA_DIR", str(tmp_path / "n8"))  # real data: each stage splits it itself
    assert demo.demo_data(tmp_path / "out2", 4) == {"data": str(tmp_path / "n8")}
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("value", ["0", "101", "-3"])
def test_a_test_case_count_out_of_range_is_refused(monkeypatch, capsys, value):
    demo = script_module("demo")
    monkeypatch.setattr("sys.argv", ["demo.py", "--test-cases", value])
    with pytest.raises(SystemExit) as exit_:
        demo.parse_args()
    assert exit_.value.code == 2 and f"--test-cases {value}: must be from 1 to 100" in capsys.readouterr().err
