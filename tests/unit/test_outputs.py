"""Output paths stay inside their folder; outputs never replace inputs, each other, or (without --overwrite)
existing files."""

from __future__ import annotations

import pytest

from prod9_components.outputs import check_outputs, output_path


def test_output_path_keeps_plain_names_inside_the_folder(tmp_path):
    assert output_path(tmp_path / "generated", "BraTS_001_T2.nii.gz") == tmp_path / "generated" / "BraTS_001_T2.nii.gz"


@pytest.mark.parametrize("name", ["../x_T2.nii.gz", "/abs_T2.nii.gz", "a/b_T2.nii.gz", "..", ".", ""])
def test_output_path_refuses_an_escaping_name(tmp_path, name):
    with pytest.raises(ValueError, match=rf"output name {name!r} would be written outside {tmp_path}") as error:
        output_path(tmp_path, name)
    assert "\n" not in str(error.value)


def test_output_path_refuses_a_link_out_of_the_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "case_T1.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    with pytest.raises(ValueError, match="outside"):
        output_path(tmp_path / "out", "case_T1.nii.gz")


def test_check_outputs_refuses_existing_files_without_overwrite(tmp_path):
    existing = tmp_path / "metrics_test.json"
    existing.write_text("{}")
    with pytest.raises(FileExistsError, match=rf"^{existing} already exists: pass --overwrite"):
        check_outputs([tmp_path / "new.json", existing])
    assert check_outputs([existing], overwrite=True) == [existing]


def test_check_outputs_never_replaces_an_input(tmp_path):
    volume = tmp_path / "t1.nii.gz"
    volume.write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=rf"output {volume} is the input {volume}"):
            check_outputs([volume], inputs=[volume], overwrite=overwrite)
    # The same file under another spelling (a relative path through "..") is still the input.
    with pytest.raises(ValueError, match="is the input"):
        check_outputs([tmp_path / "sub" / ".." / "t1.nii.gz"], inputs=[volume], overwrite=True)


def test_check_outputs_refuses_colliding_names(tmp_path):
    with pytest.raises(ValueError, match=rf"two outputs would both be written to {tmp_path / 't1_recon.nii.gz'}"):
        check_outputs([tmp_path / "t1_recon.nii.gz", tmp_path / "t1_recon.nii.gz"])


def test_reconstructions_are_named_per_case_and_modality(tmp_path):
    """Datalist files ``a/t1.nii.gz`` and ``b/t1.nii.gz`` share a name; their reconstructions must not."""
    from prod9_components.data.postprocessing import reconstruction_items

    split = [{"image": str(tmp_path / c / "t1.nii.gz"), "modality": 0, "case": c} for c in ("a", "b")]
    items = reconstruction_items(split, None, tmp_path / "out")
    assert [i["output"] for i in items] == [str(tmp_path / "out" / f"{c}_T1_recon.nii.gz") for c in ("a", "b")]
    # Plain files from two folders with one name collide: refused in one line before anything is written.
    with pytest.raises(ValueError, match=r"two outputs would both be written to .*t1_recon\.nii\.gz"):
        reconstruction_items([s["image"] for s in split], None, tmp_path / "out")
    # --output equal to --input: always refused.
    volume = tmp_path / "a" / "t1.nii.gz"
    volume.parent.mkdir()
    volume.write_bytes(b"x")
    with pytest.raises(ValueError, match="is the input"):
        reconstruction_items(str(volume), str(volume), tmp_path / "out", overwrite=True)
    # A case name that escapes the folder never reaches a writer.
    with pytest.raises(ValueError, match="outside"):
        reconstruction_items([{**split[0], "case": "../x"}], None, tmp_path / "out")
