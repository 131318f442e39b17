"""Demo dataset: real-anatomy contrasts, tumour labels, determinism, layout, caching and its CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from prod9_components.cli.argv import normalise_multi_value_flags
from prod9_components.cli.demo_data import main as demo_data_main
from prod9_components.data.brats import discover_cases
from prod9_components.data.demo import INTENSITY_SCALE, make_demo_dataset, synthesize_case
from tests.conftest import DEMO_TEST_CASES, DEMO_TEST_SEED, DEMO_TEST_SHAPE

# 2.5 mm: fine enough for ventricles to hold pure-CSF voxels, small enough to build in ~1 s.
CONTRAST_SHAPE = (96, 96, 62)


@pytest.fixture(scope="module")
def contrast_case():
    return synthesize_case(seed=0, case_index=3, shape=CONTRAST_SHAPE)


def _region_means(case, modality):
    image, seg, tissue = case.images[modality], case.seg, case.tissue
    healthy = seg == 0
    regions = {
        "csf": healthy & (tissue["csf"] > 0.7),
        "gm": healthy & (tissue["gm"] > 0.7),
        "wm": healthy & (tissue["wm"] > 0.7),
        "necrosis": seg == 1,
        "oedema": seg == 2,
        "enhancing": seg == 4,
    }
    for name, region in regions.items():
        assert region.sum() >= 10, f"{name} has only {region.sum()} voxels"
    return {name: float(image[region].mean()) for name, region in regions.items()}


def test_tissue_contrasts_follow_mri_physics(contrast_case):
    t1 = _region_means(contrast_case, "t1")
    t2 = _region_means(contrast_case, "t2")
    flair = _region_means(contrast_case, "flair")
    assert t1["csf"] < t1["gm"] < t1["wm"]
    assert t2["csf"] > t2["gm"] > t2["wm"]
    assert flair["csf"] < 0.6 * flair["wm"]  # fluid suppressed
    assert flair["gm"] > flair["wm"]


def test_tumour_contrasts(contrast_case):
    t1 = _region_means(contrast_case, "t1")
    t1ce = _region_means(contrast_case, "t1ce")
    t2 = _region_means(contrast_case, "t2")
    flair = _region_means(contrast_case, "flair")
    assert t1ce["enhancing"] > 1.3 * t1ce["wm"]  # enhancing rim lights up with contrast agent ...
    assert t1["enhancing"] < t1["wm"]  # ... and only with it
    assert t2["oedema"] > 1.5 * t2["wm"] and flair["oedema"] > 1.5 * flair["wm"]
    assert t1["necrosis"] < t1["wm"] and t1["necrosis"] < t1["csf"]
    assert t2["necrosis"] > t2["wm"]


def test_labels_background_and_geometry(contrast_case):
    assert set(np.unique(contrast_case.seg).tolist()) == {0, 1, 2, 4}
    brain = contrast_case.images["t1"] > 0
    assert 0.05 < brain.mean() < 0.5  # skull-stripped brain inside the BraTS box
    assert not (contrast_case.seg > 0)[~brain].any()  # tumour only inside the brain
    np.testing.assert_allclose(np.diag(contrast_case.affine)[:3], [2.5, 2.5, 155 / 62])


def test_deterministic_for_seed_and_cases_differ():
    a = synthesize_case(seed=5, case_index=0, shape=DEMO_TEST_SHAPE)
    b = synthesize_case(seed=5, case_index=0, shape=DEMO_TEST_SHAPE)
    c = synthesize_case(seed=5, case_index=1, shape=DEMO_TEST_SHAPE)
    d = synthesize_case(seed=6, case_index=0, shape=DEMO_TEST_SHAPE)
    for modality in a.images:
        assert a.images[modality].tobytes() == b.images[modality].tobytes()
    assert a.seg.tobytes() == b.seg.tobytes()
    for other in (c, d):
        assert np.abs(a.images["t1"] - other.images["t1"]).mean() > 0.01
        assert (a.seg != other.seg).sum() > 50


def test_bias_seed_rebuilds_the_same_case_under_other_bias_fields():
    case = synthesize_case(seed=5, case_index=0, shape=DEMO_TEST_SHAPE)
    rebuilt = synthesize_case(seed=5, case_index=0, shape=DEMO_TEST_SHAPE, bias_seed=1)
    again = synthesize_case(seed=5, case_index=0, shape=DEMO_TEST_SHAPE, bias_seed=1)
    other = synthesize_case(seed=5, case_index=0, shape=DEMO_TEST_SHAPE, bias_seed=2)
    assert case.seg.tobytes() == rebuilt.seg.tobytes()  # the same anatomy and tumour ...
    for name in case.tissue:
        assert case.tissue[name].tobytes() == rebuilt.tissue[name].tobytes()
    for modality in case.images:
        assert rebuilt.images[modality].tobytes() == again.images[modality].tobytes()
        bright = (case.images[modality] > 0.2) & (rebuilt.images[modality] > 0.2)
        log_ratio = np.log(case.images[modality][bright] / rebuilt.images[modality][bright])
        # ... under a smooth field of about the case's own size (log std 0.12 each: about 0.17 apart), ...
        assert 0.04 < np.abs(log_ratio).mean() < 0.5
        assert np.abs(rebuilt.images[modality] - other.images[modality]).mean() > 0.005  # ... its own per seed
        assert ((case.images[modality] > 0) == (rebuilt.images[modality] > 0)).all()


def test_written_dataset_layout_and_values(demo_dataset_dir):
    cases = discover_cases(demo_dataset_dir)
    assert [c["case"] for c in cases] == [f"BraTS2021_{i:05d}" for i in range(DEMO_TEST_CASES)]
    image = nib.load(cases[0]["t1"])
    seg = nib.load(cases[0]["seg"])
    assert image.shape == DEMO_TEST_SHAPE and seg.shape == DEMO_TEST_SHAPE
    assert image.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.header.get_zooms(), [5.0, 5.0, 155 / 32], rtol=1e-5)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    # The files hold exactly the in-memory synthesis (int16 counts of relative intensity).
    expected = synthesize_case(DEMO_TEST_SEED, 0, DEMO_TEST_SHAPE)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.rint(expected.images["t1"] * INTENSITY_SCALE))
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected.seg)
    for case in cases:
        labels = set(np.unique(np.asarray(nib.load(case["seg"]).dataobj)).tolist())
        assert labels == {0, 1, 2, 4}, f"{case['case']}: labels {labels}"


def test_rerun_reuses_complete_cases_and_rejects_other_settings(tmp_path):
    first = make_demo_dataset(tmp_path, num_cases=1, seed=0, shape=(16, 16, 12))
    t1 = tmp_path / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz"
    stamp = t1.stat().st_mtime_ns
    assert make_demo_dataset(tmp_path, num_cases=2, seed=0, shape=(16, 16, 12))[:1] == first
    assert t1.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert len(discover_cases(tmp_path)) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    with pytest.raises(ValueError, match="built with"):
        make_demo_dataset(tmp_path, num_cases=2, seed=1, shape=(16, 16, 12))


def test_normalise_multi_value_flags():
    argv = ["--output", "d", "--shape", "48", "48", "32", "--seed", "1", "--lr", "1e-4", "-0.5", "--x=1"]
    assert normalise_multi_value_flags(argv) == [
        "--output", "d", "--shape", "[48,48,32]", "--seed", "1", "--lr", "[1e-4,-0.5]", "--x=1",
    ]
    assert normalise_multi_value_flags(["--shape", "[48,48,32]"]) == ["--shape", "[48,48,32]"]
    assert normalise_multi_value_flags(["train", "--name", "a", "b"]) == ["train", "--name", "a", "b"]


@pytest.mark.parametrize("shape_args", [["16", "16", "12"], ["[16,16,12]"]], ids=["spaced", "fire-list"])
def test_demo_data_cli_both_shape_spellings(tmp_path, capsys, shape_args):
    demo_data_main(["--output", str(tmp_path), "--num-cases", "1", "--seed", "2", "--shape", *shape_args])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("prod9-demo-data: wrote 1 cases of shape [16, 16, 12]") and str(tmp_path) in out[-1]
    assert nib.load(discover_cases(tmp_path)[0]["flair"]).shape == (16, 16, 12)


def test_demo_data_cli_help_lists_flags():
    result = subprocess.run(
        [sys.executable, "-m", "prod9_components.cli.demo_data", "--help"],
        capture_output=True, text=True, timeout=60, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    help_text = result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    for text in ("--output", "--num_cases", "--seed", "--shape", "--shape 48 48 32", "BraTS2021_NNNNN"):
        assert text in help_text


def test_a_folder_it_did_not_make_is_refused_and_nothing_deleted(tmp_path, capsys):
    # A real BraTS validation case has no seg: the generator used to take it for its own half-written case and
    # delete the folder with everything in it.
    case = tmp_path / "BraTS2021_00000"
    case.mkdir()
    for modality in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(np.full((4, 4, 4), 7, np.int16), np.eye(4)), case / f"BraTS2021_00000_{modality}.nii.gz")
    (case / "notes.txt").write_text("mine")
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        demo_data_main(["--output", str(tmp_path), "--num-cases", "1", "--shape", "16", "16", "12"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(tmp_path) in error[0] and "not a prod9 demo dataset" in error[0]
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    assert (case / "notes.txt").read_text() == "mine"


def test_rerun_in_its_own_folder_fills_in_deleted_case_and_file(tmp_path):
    make_demo_dataset(tmp_path, num_cases=2, seed=0, shape=(16, 16, 12))
    shutil.rmtree(tmp_path / "BraTS2021_00001")  # a deleted case
    (tmp_path / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").unlink()  # and a deleted file
    kept = tmp_path / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz"
    stamp = kept.stat().st_mtime_ns
    make_demo_dataset(tmp_path, num_cases=2, seed=0, shape=(16, 16, 12))
    cases = discover_cases(tmp_path)
    assert [c["case"] for c in cases] == ["BraTS2021_00000", "BraTS2021_00001"] and all("seg" in c for c in cases)
    assert kept.stat().st_mtime_ns == stamp  # the files left in place are not rewritten
    expected = synthesize_case(0, 1, (16, 16, 12))  # the refilled case is the same case again
    np.testing.assert_array_equal(np.asarray(nib.load(cases[1]["seg"]).dataobj), expected.seg)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # its temp dirs are gone


def test_an_incomplete_case_it_did_not_make_is_never_written_into(tmp_path, monkeypatch):
    """Its own (marked) folder, but a case folder someone copied in: refused by name, not completed with
    synthetic files; and the default demo folder ($PROD9_DEMO_DIR) follows the same rules."""
    make_demo_dataset(tmp_path, num_cases=1, seed=0, shape=(16, 16, 12))
    marker = json.loads((tmp_path / "prod9_demo.json").read_text())
    assert marker == {"version": 1, "seed": 0, "shape": [16, 16, 12], "cases": ["BraTS2021_00000"]}
    copied = tmp_path / "BraTS2021_00001"
    copied.mkdir()
    (copied / "BraTS2021_00001_t1.nii.gz").write_bytes(b"a real scan")
    with pytest.raises(ValueError, match=r"BraTS2021_00001: an incomplete case this generator did not make"):
        make_demo_dataset(tmp_path, num_cases=2, seed=0, shape=(16, 16, 12))
    assert [p.name for p in copied.iterdir()] == ["BraTS2021_00001_t1.nii.gz"]

    from prod9_components.data.brats import resolve_dataset_dir

    user_data = tmp_path / "user"
    (user_data / "BraTS2021_00000").mkdir(parents=True)
    (user_data / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz").write_bytes(b"a real scan")
    monkeypatch.delenv("BRATS_DATA_DIR", raising=False)
    monkeypatch.setenv("PROD9_DEMO_DIR", str(user_data))
    with pytest.raises(ValueError, match=r"user: not empty and not a prod9 demo dataset"):
        resolve_dataset_dir(None)
    assert sorted(p.name for p in user_data.rglob("*")) == ["BraTS2021_00000", "BraTS2021_00000_flair.nii.gz"]
