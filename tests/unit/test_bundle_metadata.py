"""Every bundle's metadata.json passes `monai.bundle verify_metadata` against the vendored MONAI schema, and a broken
one does not."""

from __future__ import annotations

import json

import pytest
from monai.bundle import verify_metadata

from tests.helpers import ROOT

SCHEMA = ROOT / "schemas" / "meta_schema_20240725.json"
BUNDLES = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())


def test_all_seven_bundles_are_checked():
    assert len(BUNDLES) == 7


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_verifies_against_the_vendored_schema(bundle):
    verify_metadata(meta_file=str(ROOT / "bundles" / bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_metadata_without_a_version_is_rejected(tmp_path):
    metadata = json.loads((ROOT / "bundles" / "maskgit_stage1" / "configs" / "metadata.json").read_text())
    del metadata["version"]
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(Exception, match="version"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_files_follow_the_model_zoo_format(bundle):
    """The zoo's pre-commit (pretty-format-json --no-sort-keys --indent=4, end-of-file-fixer) would change nothing,
    and metadata has the name and the changelog entry of its version that the zoo's CI asks for."""
    for path in sorted((ROOT / "bundles" / bundle / "configs").glob("*.json")):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path}: not 4-space JSON with a final newline"
    metadata = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
    assert metadata["name"].strip() and metadata["version"] in metadata["changelog"]
