"""Modalities, case discovery, geometry checks, datalists and splits, dataset-dir resolution."""

from __future__ import annotations

import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from prod9_components.data import brats, demo
from prod9_components.data.brats import (
    check_case_geometry,
    discover_cases,
    load_datalist,
    per_modality_items,
    prepare_splits,
    resolve_dataset_dir,
    save_datalist,
    split_cases,
)
from prod9_components.data.modalities import MODALITIES, map_brats_labels, modality_index, modality_name

MODALITY_FILE_SUFFIXES_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


def _write(path, shape=(4, 5, 6), dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(shape, dtype=dtype), np.eye(4)), str(path))
    return path


def _make_case_2023(root, name, ext=".nii", skip=(), seg=True):
    for modality, suffix in MODALITY_FILE_SUFFIXES_2023.items():
        if modality not in skip:
            _write(root / name / f"{name}-{suffix}{ext}")
    if seg:
        _write(root / name / f"{name}-seg{ext}", dtype=np.uint8)


# --- modalities -------------------------------------------------------------------------------------------


def test_modality_index_names_aliases_and_ints():
    assert [modality_index(m) for m in ("T1", "t1ce", "T2", "Flair")] == [0, 1, 2, 3]
    assert [modality_index(m) for m in ("t1n", "T1C", "t2w", "t2f")] == [0, 1, 2, 3]
    assert [modality_index(i) for i in range(4)] == [0, 1, 2, 3]
    assert [modality_name(i) for i in range(4)] == ["T1", "T1ce", "T2", "FLAIR"]
    assert modality_name("t2f") == "FLAIR"
    for bad in ("pd", 4, -1, True):
        with pytest.raises(ValueError, match=r"unknown modality .*valid: T1, T1ce, T2, FLAIR \(aliases t1n"):
            modality_index(bad)


def test_map_brats_labels_numpy_and_torch():
    seg = np.array([[0, 1], [2, 4]], dtype=np.uint8)
    mapped = map_brats_labels(seg)
    assert isinstance(mapped, np.ndarray) and mapped.dtype == np.uint8
    np.testing.assert_array_equal(mapped, [[0, 1], [2, 3]])
    mapped_t = map_brats_labels(torch.tensor([[0.0, 3.0], [4.0, 2.0]]))
    assert isinstance(mapped_t, torch.Tensor) and mapped_t.dtype == torch.float32
    assert mapped_t.tolist() == [[0.0, 3.0], [3.0, 2.0]]
    with pytest.raises(ValueError, match=r"unexpected tumour label values \[5, 7\]"):
        map_brats_labels(np.array([0, 5, 7, 1]))


# --- discovery ------------------------------------------------------------------------------------------


def test_discover_brats2021_layout(demo_dataset_dir):
    cases = discover_cases(demo_dataset_dir)
    assert len(cases) == 6
    assert [c["case"] for c in cases] == sorted(c["case"] for c in cases)
    first = cases[0]
    assert set(first) == {"case", "t1", "t1ce", "t2", "flair", "seg"}
    assert first["t1ce"] == os.path.join(demo_dataset_dir, "BraTS2021_00000", "BraTS2021_00000_t1ce.nii.gz")
    assert all(os.path.isabs(first[k]) and os.path.isfile(first[k]) for k in (*MODALITIES, "seg"))


def test_discover_brats2023_layout_plain_nii_and_optional_seg(tmp_path):
    _make_case_2023(tmp_path, "BraTS-GLI-00002-000")
    _make_case_2023(tmp_path, "BraTS-GLI-00001-000", ext=".nii.gz", seg=False)
    (tmp_path / "notes").mkdir()  # no NIfTI inside: not a case
    cases = discover_cases(tmp_path)
    assert [c["case"] for c in cases] == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    assert "seg" not in cases[0] and cases[1]["seg"].endswith("BraTS-GLI-00002-000-seg.nii")
    assert cases[1]["flair"].endswith("-t2f.nii") and cases[0]["t1ce"].endswith("-t1c.nii.gz")


def test_discover_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_cases(tmp_path / "nowhere")
    _write(tmp_path / "file.nii")
    with pytest.raises(FileNotFoundError, match="file.nii"):
        discover_cases(tmp_path / "file.nii")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty: no BraTS cases found; expected <case>/<case>_\{t1,t1ce"):
        discover_cases(empty)


def test_discover_lists_every_incomplete_case_in_one_error(tmp_path):
    _make_case_2023(tmp_path, "case_a", skip=("t2",))
    _make_case_2023(tmp_path, "case_b")
    _make_case_2023(tmp_path, "case_c", skip=("t1", "flair"))
    with pytest.raises(ValueError) as error:
        discover_cases(tmp_path)
    message = str(error.value)
    assert "2 incomplete case(s)" in message
    assert "case_a (missing t2)" in message and "case_c (missing t1, flair)" in message
    assert "case_b" not in message


def test_check_case_geometry(tmp_path):
    _make_case_2023(tmp_path, "good")
    check_case_geometry(discover_cases(tmp_path))  # passes
    _write(tmp_path / "good" / "good-t2w.nii", shape=(4, 5, 7))
    mismatch = r"good-t2w.nii has shape \(4, 5, 7\) but .*good-t1n.nii has shape \(4, 5, 6\)"
    with pytest.raises(ValueError, match=mismatch):
        check_case_geometry(discover_cases(tmp_path))
    _write(tmp_path / "good" / "good-t2w.nii", shape=(4, 5, 6, 2))
    with pytest.raises(ValueError, match=r"good-t2w.nii: expected a 3D volume, got shape \(4, 5, 6, 2\)"):
        check_case_geometry(discover_cases(tmp_path))
    _write(tmp_path / "good" / "good-seg.nii", shape=(4, 5))
    _write(tmp_path / "good" / "good-t2w.nii")
    with pytest.raises(ValueError, match=r"good-seg.nii: expected a 3D volume, got shape \(4, 5\)"):
        check_case_geometry(discover_cases(tmp_path))


# --- datalists and splits --------------------------------------------------------------------------------


def test_load_datalist_resolves_paths_and_aliases(tmp_path):
    _make_case_2023(tmp_path, "c1")
    _make_case_2023(tmp_path, "c2")
    absolute_t2 = str(tmp_path / "c1" / "c1-t2w.nii")
    item = {"T1N": "c1/c1-t1n.nii", "t1c": "c1/c1-t1c.nii", "t2": absolute_t2, "FLAIR": "c1/c1-t2f.nii",
            "label": "c1/c1-seg.nii"}
    other = {m: f"c2/c2-{s}.nii" for m, s in MODALITY_FILE_SUFFIXES_2023.items()}
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [item], "validation": [other]}))
    splits = load_datalist(path, tmp_path)
    loaded = splits["training"][0]
    assert loaded == {
        "t1": str(tmp_path / "c1" / "c1-t1n.nii"), "t1ce": str(tmp_path / "c1" / "c1-t1c.nii"), "t2": absolute_t2,
        "flair": str(tmp_path / "c1" / "c1-t2f.nii"), "seg": str(tmp_path / "c1" / "c1-seg.nii"), "case": "c1",
    }
    assert splits["test"] == []


def test_load_datalist_lists_all_missing_files(tmp_path):
    item = {m: f"x/{m}.nii.gz" for m in MODALITIES}
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [item]}))
    with pytest.raises(FileNotFoundError, match=r"4 file\(s\) named in the datalist do not exist") as error:
        load_datalist(path, tmp_path)
    assert all(f"{m}.nii.gz" in str(error.value) for m in MODALITIES)
    path.write_text(json.dumps({"training": [{"t1": "a.nii"}]}))
    with pytest.raises(ValueError, match=r"\[training\]\[0\].*lacks modalities \['t1ce', 't2', 'flair'\]"):
        load_datalist(path, tmp_path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_datalist(path, tmp_path)


@pytest.mark.parametrize("name, problem", [
    ("../x", "holds a path separator"), ("/abs", "is an absolute path"), ("a/b", "holds a path separator"),
    ("a\\b", "holds a path separator"), ("..", "holds a path separator"), ("", "is empty")])
def test_load_datalist_refuses_case_names_that_are_not_file_names(tmp_path, name, problem):
    """A case name becomes an output file name (``<case>_T2.nii.gz``): it must not leave the output folder."""
    _make_case_2023(tmp_path, "c1")
    item = {m: f"c1/c1-{s}.nii" for m, s in MODALITY_FILE_SUFFIXES_2023.items()}
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [{**item, "case": name}]}))
    with pytest.raises(ValueError) as error:
        load_datalist(path, tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: case name {name!r} in training {problem}")


def test_load_datalist_refuses_a_case_name_used_in_two_splits(tmp_path):
    for case in ("c1", "c2"):
        _make_case_2023(tmp_path, case)
    items = [{m: f"{c}/{c}-{s}.nii" for m, s in MODALITY_FILE_SUFFIXES_2023.items()} for c in ("c1", "c2")]
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [{**items[0], "case": "same"}], "test": [{**items[1], "case": "same"}]}))
    with pytest.raises(ValueError, match=rf"^{path}: case name 'same' in test is used twice \(training and test\)"):
        load_datalist(path, tmp_path)
    # Without "case" the name is the folder of the T1 file: two items from one folder collide the same way.
    path.write_text(json.dumps({"training": [items[0]], "validation": [items[0]]}))
    with pytest.raises(ValueError, match=r"case name 'c1' in validation is used twice"):
        load_datalist(path, tmp_path)
    # prepare_splits reads datalists through load_datalist: a bad name stops a run before anything is written.
    with pytest.raises(ValueError, match=r"case name 'c1'"):
        prepare_splits(tmp_path, tmp_path / "run", datalist=path)
    assert not (tmp_path / "run").exists()


def _fake_cases(n):
    return [{"case": f"case{i:02d}", **{m: f"/d/case{i:02d}_{m}.nii.gz" for m in MODALITIES}} for i in range(n)]


def test_split_cases_deterministic_complete_and_nonempty():
    cases = _fake_cases(20)
    a = split_cases(cases, seed=3)
    assert a == split_cases(list(reversed(cases)), seed=3)  # depends on seed and case set only
    assert [len(a[s]) for s in ("training", "validation", "test")] == [14, 4, 2]
    names = [c["case"] for s in a.values() for c in s]
    assert sorted(names) == [c["case"] for c in cases]  # every case exactly once
    assert split_cases(cases, seed=4)["validation"] != a["validation"]
    small = split_cases(_fake_cases(3), seed=0)
    assert [len(small[s]) for s in ("training", "validation", "test")] == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 3 cases.*got 2"):
        split_cases(_fake_cases(2), seed=0)


def test_save_datalist_atomic_roundtrip(tmp_path):
    splits = split_cases(_fake_cases(5), seed=0)
    path = save_datalist(splits, tmp_path / "sub" / "datalist.json")
    assert json.loads(open(path).read()) == splits
    assert os.listdir(tmp_path / "sub") == ["datalist.json"]  # no temp file left


def test_prepare_splits_writes_datalist_and_keeps_given_splits(demo_dataset_dir, tmp_path):
    splits = prepare_splits(demo_dataset_dir, tmp_path / "run", seed=1)
    written = tmp_path / "run" / "datalist.json"
    assert json.loads(written.read_text()) == splits
    assert [len(splits[s]) for s in ("training", "validation", "test")] == [4, 1, 1]
    assert load_datalist(written, demo_dataset_dir) == splits
    # A datalist with a validation split is used as it is.
    again = prepare_splits(demo_dataset_dir, tmp_path / "run2", seed=99, datalist=written)
    assert again == splits


def test_prepare_splits_never_rewrites_the_datalist_it_reads(demo_dataset_dir, tmp_path):
    run = tmp_path / "run"
    splits = prepare_splits(demo_dataset_dir, run, seed=1)
    record = run / "datalist.json"
    record.write_text(json.dumps(splits, indent=4))  # as a user may have reformatted it
    before = record.read_text()
    assert prepare_splits(demo_dataset_dir, run, seed=1, datalist=record) == splits
    assert record.read_text() == before  # read, not rewritten
    record.write_text(json.dumps({"training": [c for s in splits.values() for c in s]}))  # no validation split
    with pytest.raises(ValueError, match=rf"^{record}: has no validation split, so it would be re-split and written "
                                         "over itself"):
        prepare_splits(demo_dataset_dir, run, seed=1, datalist=record)
    assert "validation" not in json.loads(record.read_text())


def test_per_modality_items(demo_dataset_dir):
    cases = discover_cases(demo_dataset_dir)[:2]
    items = per_modality_items(cases)
    assert len(items) == 8
    assert [i["modality"] for i in items[:4]] == [0, 1, 2, 3]
    assert items[1] == {"image": cases[0]["t1ce"], "modality": 1, "case": cases[0]["case"], "seg": cases[0]["seg"]}
    subset = per_modality_items(cases, modalities=("t2f", 0))
    assert [(i["case"], i["modality"]) for i in subset] == [
        (cases[0]["case"], 3), (cases[0]["case"], 0), (cases[1]["case"], 3), (cases[1]["case"], 0)]


# --- dataset directory resolution -----------------------------------------------------------------------


def test_resolve_dataset_dir_sources(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="prod9")
    monkeypatch.setenv("BRATS_DATA_DIR", str(tmp_path / "from_env"))
    assert resolve_dataset_dir(str(tmp_path / "explicit")) == str(tmp_path / "explicit")
    assert resolve_dataset_dir("") == str(tmp_path / "from_env")
    assert resolve_dataset_dir() == str(tmp_path / "from_env")
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset: {tmp_path / 'explicit'} (given explicitly)",
        f"dataset: {tmp_path / 'from_env'} (from BRATS_DATA_DIR)",
        f"dataset: {tmp_path / 'from_env'} (from BRATS_DATA_DIR)",
    ]


def test_resolve_dataset_dir_builds_demo_once(tmp_path, monkeypatch, caplog):
    # The real generator, at a tiny shape (the default 240x240x155 takes ~4 s a case).
    real_make = demo.make_demo_dataset
    tiny = lambda d, num_cases, seed: real_make(d, num_cases, seed, (16, 16, 12))  # noqa: E731
    monkeypatch.setattr(demo, "make_demo_dataset", tiny)
    monkeypatch.delenv("BRATS_DATA_DIR", raising=False)
    monkeypatch.setenv("PROD9_DEMO_DIR", str(tmp_path / "demo"))
    caplog.set_level(logging.INFO, logger="prod9")
    resolved = resolve_dataset_dir(None)
    assert resolved == str(tmp_path / "demo")
    assert len(discover_cases(resolved)) == brats.DEMO_NUM_CASES == 8
    source_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dataset:")]
    assert source_lines == [f"dataset: {tmp_path / 'demo'} (demo dataset, 8 synthetic cases; set BRATS_DATA_DIR "
                            "to use real BraTS data)"]

    # Another size has a folder of its own beside it (every case in a folder is used); the default one is untouched.
    other = resolve_dataset_dir(None, demo_cases=3)
    assert other == str(tmp_path / "demo-n3") and len(discover_cases(other)) == 3
    assert len(discover_cases(resolved)) == 8
    monkeypatch.setenv("PROD9_DEMO_DIR", f"{tmp_path / 'demo'}/")  # a trailing slash: still beside it, not inside
    assert resolve_dataset_dir(None, demo_cases=3) == other and "-n3" not in os.listdir(resolved)
    monkeypatch.delenv("PROD9_DEMO_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_dataset_dir(None, demo_cases=3) == str(tmp_path / "home" / ".cache" / "prod9" / "demo-v1-seed0-n3")
