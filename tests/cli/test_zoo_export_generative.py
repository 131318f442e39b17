"""`export` of stages 2-3 (both families): the folder holds the stage's weights and every upstream network it needs
(the stage-1 decoder; for a ControlNet also the frozen stage-2 network it controls), and its standalone
inference.json, run alone in the folder, writes the very volumes the command's `generate` writes from the checkpoint
with the same seed and steps; MONAI's metadata check passes and nothing is replaced."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import verify_metadata

from tests.helpers import MASKGIT_CONTROLNET, ROOT, bundle_run, cli, run_module

pytestmark = pytest.mark.slow
STEPS = "2"  # sampling steps of both runs: the comparison needs equal settings, not good samples


def export(command: str, checkpoint: str | Path, bundle: Path, models: list[str]) -> dict:
    """Export, check the folder's files, the zoo's JSON format, large_files.yml and the metadata; returns the
    exported inference.json."""
    result = cli(command, "export", "--checkpoint", str(checkpoint), "--output-dir", str(bundle))
    assert f"model-zoo bundle written to {bundle}/" in result.stdout
    assert sorted(p.name for p in (bundle / "models").iterdir()) == sorted(f"{m}.pt" for m in models)
    for name in ("configs/inference.json", "configs/metadata.json", "configs/logging.conf", "docs/README.md",
                 "docs/data_license.txt", "LICENSE"):
        assert (bundle / name).is_file(), name
    for config in (bundle / "configs").glob("*.json"):
        assert config.read_text() == json.dumps(json.loads(config.read_text()), indent=4) + "\n"
    listed = (bundle / "large_files.yml").read_text()
    for model in models:
        sha = hashlib.sha256((bundle / "models" / f"{model}.pt").read_bytes()).hexdigest()
        assert f'path: "models/{model}.pt"' in listed and f'hash_val: "{sha}"' in listed, model
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert f"exported by prod9_components from {Path(checkpoint).name}" in metadata["changelog"][metadata["version"]]
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"),
                    filepath=str(ROOT / "schemas" / "meta_schema_20240725.json"))
    card = (bundle / "docs" / "README.md").read_text()
    assert all(f"## {s}" in card for s in ("Model Overview", "Data", "Training configuration", "Performance",
                                           "MONAI Bundle Commands", "System Configuration", "Authors", "Tags"))
    assert "verify_net_in_out` fabricates" in card  # which of MONAI's checks applies, and why
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["bundle_root"] == "." and "network_def" in config and "device" in config
    return config


def run_alone(bundle: Path, *overrides: str) -> list[Path]:
    """`python -m monai.bundle run --config_file configs/inference.json` in the folder (in this process: the stage-1
    exports of test_zoo_export.py run in new ones); the volumes it wrote."""
    alone = run_module("monai.bundle", ["run", "--config_file", "configs/inference.json", *overrides], cwd=bundle)
    assert alone.returncode == 0, alone.stderr[-3000:]
    return sorted((bundle / "eval").glob("*.nii.gz"))


def assert_same_volumes(ours: list[Path], reference_dir: Path, expected: int) -> None:
    theirs = sorted(reference_dir.glob("*.nii.gz"))
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == expected
    for a, b in zip(ours, theirs):
        a, b = nib.load(a), nib.load(b)
        assert a.shape == b.shape and np.isfinite(a.get_fdata()).all()
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
        np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), atol=1e-5)
        assert a.get_fdata().std() > 0  # a volume, not a constant


def weights_of(path: str | Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_state_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def case_file(dataset_dir: str, suffix: str) -> str:
    return str(sorted(Path(dataset_dir).rglob(f"*_{suffix}.nii.gz"))[0])


def test_maskgit_stage2_bundles_run_alone(stage2_runs, tmp_path):
    stage1 = weights_of(stage2_runs["autoencoder_path"])["state_dict"]
    # Label-conditional: N samples of seed, seed + 1, ... into eval/.
    checkpoint = Path(stage2_runs["label"]) / "best.ckpt"
    bundle = tmp_path / "label"
    config = export("prod9-train-transformer", checkpoint, bundle, ["model", "autoencoder"])
    assert_state_equal(weights_of(bundle / "models" / "model.pt"), weights_of(checkpoint)["state_dict"])
    assert_state_equal(weights_of(bundle / "models" / "autoencoder.pt"), stage1)
    samples = run_alone(bundle, "--num_samples", "2", "--num_inference_steps", STEPS, "--modality", "T2")
    cli("prod9-train-transformer", "generate", "--checkpoint", str(checkpoint), "--modality", "T2", "--num-samples",
        "2", "--num-inference-steps", STEPS, "--output", str(tmp_path / "label_ref"), "--output-dir",
        str(tmp_path / "run"))
    assert_same_volumes(samples, tmp_path / "label_ref", 2)
    assert nib.load(samples[0]).shape == tuple(4 * g for g in config["volume_grid"])

    # In-context: a source volume -> the target modality on the source's grid.
    checkpoint = Path(stage2_runs["incontext"]) / "best.ckpt"
    bundle = tmp_path / "incontext"
    export("prod9-train-transformer", checkpoint, bundle, ["model", "autoencoder"])
    source = case_file(stage2_runs["dataset_dir"], "t1")
    translated = run_alone(bundle, "--input", f"['{source}']", "--num_inference_steps", STEPS)
    cli("prod9-train-transformer", "generate", "--checkpoint", str(checkpoint), "--input", source,
        "--num-inference-steps", STEPS, "--output", str(tmp_path / "incontext_ref"), "--output-dir",
        str(tmp_path / "run"))
    assert_same_volumes(translated, tmp_path / "incontext_ref", 1)
    assert nib.load(translated[0]).shape == nib.load(source).shape

    # A second export into a folder is refused and changes nothing there.
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*")}
    again = cli("prod9-train-transformer", "export", "--checkpoint", str(checkpoint), "--output-dir", str(bundle),
                check=False)
    assert again.returncode != 0 and "exists and is not empty" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*")} == before

    # A checkpoint whose stage-1 export changed since it was trained is refused, naming the file; nothing written.
    record = weights_of(checkpoint)
    record["autoencoder_sha256"] = "0" * 64
    torch.save(record, tmp_path / "stale.ckpt")
    stale = cli("prod9-train-transformer", "export", "--checkpoint", str(tmp_path / "stale.ckpt"), "--output-dir",
                str(tmp_path / "stale_bundle"), check=False)
    assert stale.returncode == 2 and f"{record['autoencoder_path']}: this stage-1 export changed" in stale.stderr
    assert not (tmp_path / "stale_bundle").exists()


def test_maskgit_controlnet_bundle_runs_alone(stage2_runs, tmp_path):
    out = tmp_path / "stage3"
    bundle_run(MASKGIT_CONTROLNET, ["train.json", "tiny.json"], {
        "dataset_dir": stage2_runs["dataset_dir"], "output_dir": out, "token_cache_dir": stage2_runs["token_cache_dir"],
        "transformer_path": Path(stage2_runs["label"]) / "best.ckpt", "control_type": "mask",
        "sample_during_validation": False})
    checkpoint, bundle = out / "best.ckpt", tmp_path / "zoo"
    export("prod9-train-maskgit-controlnet", checkpoint, bundle, ["model", "transformer", "autoencoder"])
    # The frozen stage-2 transformer is its own file, bit for bit the stage-2 checkpoint; model.pt the control branch.
    assert_state_equal(weights_of(bundle / "models" / "transformer.pt"),
                       weights_of(Path(stage2_runs["label"]) / "best.ckpt")["state_dict"])
    own = weights_of(checkpoint)["state_dict"]
    assert_state_equal(weights_of(bundle / "models" / "model.pt"),
                       {k: v for k, v in own.items() if not k.startswith("base.")})

    mask = case_file(stage2_runs["dataset_dir"], "seg")
    written = run_alone(bundle, "--mask", f"['{mask}']", "--num_inference_steps", STEPS, "--modality", "FLAIR")
    cli("prod9-train-maskgit-controlnet", "generate", "--checkpoint", str(checkpoint), "--mask", mask, "--modality",
        "FLAIR", "--num-inference-steps", STEPS, "--output", str(tmp_path / "ref"), "--output-dir", str(out))
    assert_same_volumes(written, tmp_path / "ref", 2)  # the sample and the mask it was steered by
    assert {p.name.rsplit("_", 1)[-1] for p in written} == {"FLAIR.nii.gz", "mask.nii.gz"}


def test_maisi_stage2_and_stage3_bundles_run_alone(maisi_controlnet_run, tmp_path):
    diffusion = maisi_controlnet_run["diffusion_path"]
    vae_path = weights_of(diffusion)["vae_path"]

    # Stage 2: samples from noise.
    bundle = tmp_path / "diffusion"
    export("prod9-train-maisi-diffusion", diffusion, bundle, ["model", "vae"])
    assert_state_equal(weights_of(bundle / "models" / "model.pt"), weights_of(diffusion)["state_dict"])
    assert_state_equal(weights_of(bundle / "models" / "vae.pt"), weights_of(vae_path)["state_dict"])
    samples = run_alone(bundle, "--num_samples", "2", "--num_inference_steps", STEPS, "--modality", "T2")
    cli("prod9-train-maisi-diffusion", "generate", "--checkpoint", diffusion, "--modality", "T2", "--num-samples", "2",
        "--num-inference-steps", STEPS, "--output", str(tmp_path / "diffusion_ref"), "--output-dir",
        str(tmp_path / "run"))
    assert_same_volumes(samples, tmp_path / "diffusion_ref", 2)
    intensity = json.loads((bundle / "configs" / "inference.json").read_text())["intensity_range"]
    assert intensity[0] <= nib.load(samples[0]).get_fdata().min() <= nib.load(samples[0]).get_fdata().max() \
        <= intensity[1]  # decoded and clipped to the VAE's training range

    # Stage 3: mask + T1 source -> another modality, with the frozen UNet as its own file.
    checkpoint = Path(maisi_controlnet_run["output_dir"]) / "best.ckpt"
    bundle = tmp_path / "controlnet"
    export("prod9-train-maisi-controlnet", checkpoint, bundle, ["model", "diffusion", "vae"])
    assert_state_equal(weights_of(bundle / "models" / "diffusion.pt"), weights_of(diffusion)["state_dict"])
    mask, source = (case_file(maisi_controlnet_run["dataset_dir"], s) for s in ("seg", "t1"))
    written = run_alone(bundle, "--mask", f"['{mask}']", "--source", f"['{source}']", "--num_inference_steps", STEPS)
    cli("prod9-train-maisi-controlnet", "generate", "--checkpoint", str(checkpoint), "--mask", mask, "--source",
        source, "--num-inference-steps", STEPS, "--output", str(tmp_path / "controlnet_ref"), "--output-dir",
        str(tmp_path / "run3"))
    assert_same_volumes(written, tmp_path / "controlnet_ref", 2)
