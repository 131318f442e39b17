"""``docs/README.md`` (the model-zoo template's sections, filled from the run) and ``docs/data_license.txt`` of an
exported stage."""

from __future__ import annotations

import json
import platform

import torch

__all__ = ["data_license", "model_card"]

_RUN = "python -m monai.bundle run --config_file configs/inference.json"
_VERIFY = "python -m monai.bundle verify_metadata --meta_file configs/metadata.json"

# Per stage: what configs/inference.json does, how to run it, which of MONAI's checks applies (and why), tags.
_STAGE1_CHECK = f"""```bash
{_RUN}                      # first T2 of the dataset
{_RUN} --datalist "['a.nii.gz']"
{_VERIFY}
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json --n 4
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json --use_trace True \\
    --input_shape "[1, 1, 64, 64, 64]"
```
`network_def` takes an image (`image` in `network_data_format`), so MONAI's `verify_net_in_out` applies. The
TorchScript export is traced, not scripted: the FSQ rounding and MONAI's MAISI blocks do not script."""

_TOKENS = ("`network_def` takes FSQ token grids (int64) with the modality labels{extra}, not one image tensor")
_LATENTS = ("`network_def` takes a latent with the flow timestep and the modality label{extra}, not one image tensor")
_NOT_NET_IN_OUT = (" (the input MONAI's `verify_net_in_out` fabricates from `network_data_format#inputs#image`), so "
                   "that check does not apply; the model zoo keeps its own generative bundles off it for the same reason "
                   "(`exclude_verify_shape_list` of its CI). `verify_metadata` applies, and the run above is the "
                   "end-to-end check: it samples with `models/*.pt` and writes NIfTI volumes.")

STAGES = {
    "maskgit_stage2_label": {
        "does": "generates `num_samples` label-conditional volumes into `eval/` (`sample_0001_<MOD>.nii.gz`, ...)",
        "run": f"{_RUN}                               # 4 samples of the trained modality\n"
               f"{_RUN} --modality T2 --num_samples 2 --seed 7",
        "check": _TOKENS.format(extra=""),
        "tags": "brain MRI, BraTS, MaskGiT, masked-token transformer, generative",
    },
    "maskgit_stage2_incontext": {
        "does": "translates source volumes (one file per source modality, in order) into the target modality, "
                "`eval/<case>_<TARGET>.nii.gz` on the source's own grid",
        "run": f"{_RUN}                               # the first case of the dataset\n"
               f"{_RUN} --input \"['case_t1.nii.gz']\"",
        "check": _TOKENS.format(extra=" and the source tokens of the context"),
        "tags": "brain MRI, BraTS, MaskGiT, modality translation, generative",
    },
    "maskgit_stage3_controlnet": {
        "does": "generates a volume per tumour mask, `eval/<case>_<MOD>.nii.gz` with the mask it was steered by "
                "(`<case>_mask.nii.gz`)",
        "run": f"{_RUN}                               # the first case's segmentation\n"
               f"{_RUN} --mask \"['case_seg.nii.gz']\" --modality FLAIR",
        "check": _TOKENS.format(extra=" and a tumour mask"),
        "tags": "brain MRI, BraTS, MaskGiT, ControlNet, tumour mask, generative",
    },
    "maisi_stage2_diffusion": {
        "does": "generates `num_samples` volumes from noise into `eval/` (`sample_0001.nii.gz`, ...; "
                "`sample_0001_<MOD>.nii.gz` with `--modality`)",
        "run": f"{_RUN}                               # 4 unconditional samples\n"
               f"{_RUN} --modality T2 --num_samples 2 --num_inference_steps 30",
        "check": _LATENTS.format(extra=""),
        "tags": "brain MRI, BraTS, MAISI, latent diffusion, rectified flow, generative",
    },
    "maisi_stage3_controlnet": {
        "does": "generates a volume per condition (tumour mask and/or source image, as the ControlNet was trained), "
                "`eval/<case>_<MOD>.nii.gz` with the mask it was steered by",
        "run": f"{_RUN}                               # the first case of the dataset\n"
               f"{_RUN} --mask \"['case_seg.nii.gz']\" --source \"['case_t1.nii.gz']\"",
        "check": _LATENTS.format(extra=" and the control conditions (mask, source image)"),
        "tags": "brain MRI, BraTS, MAISI, ControlNet, tumour mask, generative",
    },
}


def model_card(stage: str, metadata: dict, record: dict, spacing, window: dict, files: dict[str, str]) -> str:
    """``docs/README.md`` with the model-zoo template's sections, filled from the metadata and the record.

    Args:
        window: the sliding window the volumes are decoded (stage 1: reconstructed) with.
        files: ``models/<name>.pt`` -> what it holds.
    """
    metrics = record.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    performance = ("Validation scores of these weights (the run's best epoch; each beside its trivial baseline):\n\n"
                   f"| metric | value |\n|---|---|\n{rows}\n" if rows else "No validation scores were recorded.\n")
    stage1 = stage not in STAGES
    if stage1:
        overview = ("`configs/inference.json` wraps it as `prod9_components.networks.reconstruction.Reconstruction` "
                    "(image -> reconstruction).")
        commands, tags = _STAGE1_CHECK, "brain MRI, BraTS, autoencoder, generative"
    else:
        card = STAGES[stage]
        overview = f"`configs/inference.json` {card['does']}."
        commands = f"```bash\n{card['run']}\n{_VERIFY}\n```\n{card['check']}{_NOT_NET_IN_OUT}"
        tags = card["tags"]
    weights = "\n".join(f"- `{name}`: {what}" for name, what in files.items())
    return f"""# {metadata['name']}

{metadata['description']}

## Model Overview
{metadata['task']}. Network: `{record['network_target']}` with `{json.dumps(record['network_args'])}`; {overview}

Weights (each listed with its sha256 in `large_files.yml`):
{weights}

## Data
{metadata.get('data_source', '')}. Input: {metadata.get('image_classes', '')}; this export was trained at
{', '.join(f'{s:g}' for s in spacing)} mm voxels. See `docs/data_license.txt`.

## Training configuration
Trained with the prod9 bundle `{record.get('stage')}` (`prod9-train-*` / `python -m monai.bundle run`); epoch
{record.get('epoch', '?')} of the run. Sliding window of the stage-1 network:
{list(window.get('roi_size', [64, 64, 64]))}.

## Performance
{performance}
## MONAI Bundle Commands
Needs `prod9_components` installed (its wheel), then in this folder:

{commands}

## System Configuration
Exported with torch {torch.__version__}, MONAI {metadata.get('monai_version')}, Python {platform.python_version()};
`configs/inference.json` runs on CUDA when available, else CPU.

## Authors
{metadata.get('authors', '')}

## Tags
{tags}

# References
{chr(10).join(f'- {r}' for r in metadata.get('references', []))}

# License
{metadata.get('copyright', '')}. Code and weights: Apache-2.0 (`LICENSE`); data: `docs/data_license.txt`.
"""


def data_license(metadata: dict) -> str:
    return (f"These weights were trained on: {metadata.get('data_source', 'see docs/README.md')}.\n\n"
            "BraTS data are distributed under the terms of the BraTS challenge organisers (see the challenge's data "
            "use agreement); weights trained on them may carry those terms. The embedded demo dataset is synthesised "
            "from the MNI ICBM 2009 templates shipped with nilearn (copyright McConnell Brain Imaging Centre; see "
            "nilearn's dataset documentation for the notice). The publisher of this bundle states here which data "
            "the weights saw.\n")
