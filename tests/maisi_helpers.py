"""Shared helpers for tests that run the MAISI bundles for real (tiny networks on tiny demo data)."""

from __future__ import annotations

from pathlib import Path

from tests.stage1_helpers import ROOT, bundle_run

VAE = ROOT / "bundles" / "maisi_stage1_vae" / "configs"
DIFFUSION = ROOT / "bundles" / "maisi_stage2_diffusion" / "configs"
CONTROLNET = ROOT / "bundles" / "maisi_stage3_controlnet" / "configs"


def maisi_run(configs: Path, names: list[str], overrides: dict, **kwargs):
    """``python -m monai.bundle run`` on a MAISI bundle (paths of ``names`` inside ``configs``)."""
    return bundle_run([str(configs / n) for n in names], overrides, **kwargs)
