"""Shared helpers for tests that run the MaskGiT stage-2 (and stage-3) bundles for real (tiny transformer on tiny demo data)."""

from __future__ import annotations

from pathlib import Path

from tests.stage1_helpers import ROOT, bundle_run

LABEL = ROOT / "bundles" / "maskgit_stage2_label" / "configs"
INCONTEXT = ROOT / "bundles" / "maskgit_stage2_incontext" / "configs"
CONTROLNET = ROOT / "bundles" / "maskgit_stage3_controlnet" / "configs"


def stage2_run(configs: Path, names: list[str], overrides: dict, **kwargs):
    """``python -m monai.bundle run`` on a stage-2 bundle (paths of ``names`` inside ``configs``)."""
    return bundle_run([str(configs / n) for n in names], overrides, **kwargs)
