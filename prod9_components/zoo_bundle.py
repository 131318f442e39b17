"""A trained stage 1 as a MONAI model-zoo bundle folder that runs on its own (with prod9_components installed).

Layout of the folder (the zoo's):

    configs/metadata.json    the stage's metadata, version and changelog of this export
    configs/inference.json   standalone: bundle_root, device, network_def, inferer, paths under @bundle_root
    configs/logging.conf
    models/model.pt          the network's state dict (what the zoo's CheckpointLoader loads)
    large_files.yml          models/model.pt with its sha256; the URL is the publisher's to fill in
    docs/README.md           model card: the zoo template's sections, filled from the run
    docs/data_license.txt    what the weights were trained on, and whose terms apply
    LICENSE

``python -m monai.bundle run --config_file configs/inference.json`` in that folder reconstructs the first T2 volume of
``dataset_dir`` (BRATS_DATA_DIR, else the demo dataset) into ``eval/``; ``--datalist "['a.nii.gz', ...]"`` names others.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from prod9_components.atomic import atomic_dir
from prod9_components.cli.literal_flags import is_config_syntax, literal
from prod9_components.networks.export import build_network, read_record

__all__ = ["config_data", "export_stage1_bundle", "stage1_inference_config"]


def stage1_inference_config(network_target: str, network_args: dict, spacing, intensity_range, roi_size,
                            downsample_factor: int) -> dict:
    """``configs/inference.json`` of an exported stage 1: image -> reconstruction through MONAI's
    ``SupervisedEvaluator`` with the tiled reconstruction ``infer`` uses
    (:class:`~prod9_components.inference.sliding_window.TiledReconstructionInferer`), weights from
    ``@bundle_root/models/model.pt``."""
    return {
        "imports": ["$import glob", "$import os", "$import torch", "$import prod9_components.data as data"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "dataset_dir": "$data.resolve_dataset_dir()",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*', '*_t2.nii*')))[:1]",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "overwrite": False,
        "spacing": [float(s) for s in spacing],
        "intensity_range": [float(v) for v in intensity_range],
        "autoencoder_def": {"_target_": network_target, **network_args},
        "network_def": {"_target_": "prod9_components.networks.reconstruction.Reconstruction",
                        "autoencoder": "@autoencoder_def"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": "$data.preprocessing(spacing=@spacing, "
                          f"intensity_range=@intensity_range, k_divisible={int(downsample_factor)})"},
        "dataset": {"_target_": "Dataset",
                    "data": "$data.reconstruction_items(@datalist, None, @output_dir, overwrite=@overwrite)",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "prod9_components.inference.sliding_window.TiledReconstructionInferer",
                    "roi_size": [int(r) for r in roi_size], "overlap": 0.25, "sw_batch_size": 4, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "prod9_components.data.postprocessing.RestoreIntensityd", "keys": "pred",
             "source_key": "image", "intensity_range": "@intensity_range"},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "prod9_components.data.postprocessing.SaveVolumed", "keys": "pred", "path_key": "output"}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"},
                      "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "initialize": [],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }


def export_stage1_bundle(checkpoint: str | os.PathLike, target: str | os.PathLike, stage: str,
                         source_bundle: Path) -> Path:
    """Write the model-zoo folder of a stage-1 ``checkpoint`` (best.ckpt or export) into ``target``.

    ``target`` must not exist or be empty (nothing is replaced); the folder is built beside it and renamed into place,
    so a failed export leaves nothing half-written. ``source_bundle``: the installed bundle of ``stage`` (metadata,
    logging.conf, LICENSE). Returns ``target``.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"--output-dir {target}: exists and is not empty; export into a new folder")
    record, sha256 = read_record(checkpoint, stages=[stage])
    network = build_network(record, source=str(checkpoint))  # a registered class, its arguments checked
    network_args = config_data(record["network_args"], str(checkpoint))
    preprocessing = record.get("preprocessing", {})
    spacing = preprocessing.get("spacing", [1.0, 1.0, 1.0])
    intensity_range = preprocessing.get("intensity", {}).get("range", [0.0, 1.0])
    roi_size = (record.get("sliding_window") or {}).get("roi_size", [64, 64, 64])
    factor = int(getattr(network, "downsample_factor", 4))

    with atomic_dir(target) as building:
        folder = Path(building)
        for sub in ("configs", "models", "docs"):
            (folder / sub).mkdir(parents=True)
        torch.save(network.state_dict(), folder / "models" / "model.pt")
        weights_sha = hashlib.sha256((folder / "models" / "model.pt").read_bytes()).hexdigest()
        metadata = json.loads((source_bundle / "configs" / "metadata.json").read_text())
        version = metadata["version"]
        metadata["changelog"][version] += (f"; this folder: exported by prod9_components from "
                                           f"{Path(checkpoint).name} (sha256 {sha256[:16]}), epoch "
                                           f"{record.get('epoch', '?')}")
        _write_json(folder / "configs" / "metadata.json", metadata)
        _write_json(folder / "configs" / "inference.json", stage1_inference_config(
            record["network_target"], network_args, spacing, intensity_range, roi_size, factor))
        shutil.copyfile(source_bundle / "configs" / "logging.conf", folder / "configs" / "logging.conf")
        shutil.copyfile(source_bundle / "LICENSE", folder / "LICENSE")
        (folder / "large_files.yml").write_text(
            "large_files:\n"
            '  - path: "models/model.pt"\n'
            '    url: ""  # where the publisher uploads models/model.pt\n'
            f'    hash_val: "{weights_sha}"\n'
            '    hash_type: "sha256"\n')
        (folder / "docs" / "README.md").write_text(model_card(metadata, record, spacing, roi_size))
        (folder / "docs" / "data_license.txt").write_text(data_license(metadata))
    return target


def config_data(value, source: str):
    """``value`` (a record's plain data) as it must stand in a MONAI config to mean itself: strings MONAI would
    evaluate or follow (``$...``, ``@...``, ``%...``) become string literals; a dict MONAI would instantiate or
    interpret (``_target_``, ``_requires_``, ...) is refused, naming ``source``."""
    if isinstance(value, str):
        return literal(value) if is_config_syntax(value) else value
    if isinstance(value, dict):
        special = [k for k in value if str(k).startswith("_") and str(k).endswith("_")]
        if special:
            raise ValueError(f"{source}: network_args hold a config directive {special[0]!r}; expected plain data")
        return {k: config_data(v, source) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [config_data(v, source) for v in value]
    return value


def _write_json(path: Path, data: dict) -> None:
    """The zoo's format: 4-space JSON with a final newline."""
    path.write_text(json.dumps(data, indent=4) + "\n")


def model_card(metadata: dict, record: dict, spacing, roi_size) -> str:
    """``docs/README.md`` with the model-zoo template's sections, filled from the metadata and the record."""
    metrics = record.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    performance = ("Validation scores of these weights (the run's best epoch; each beside its trivial baseline):\n\n"
                   f"| metric | value |\n|---|---|\n{rows}\n" if rows else "No validation scores were recorded.\n")
    args = json.dumps(record["network_args"])
    return f"""# {metadata['name']}

{metadata['description']}

## Model Overview
{metadata['task']}. Network: `{record['network_target']}` with `{args}`; `configs/inference.json` wraps it as
`prod9_components.networks.reconstruction.Reconstruction` (image -> reconstruction).

## Data
{metadata.get('data_source', '')}. Input: {metadata.get('image_classes', '')}; this export was trained at
{', '.join(f'{s:g}' for s in spacing)} mm voxels. See `docs/data_license.txt`.

## Training configuration
Trained with the prod9 bundle `{record.get('stage')}` (`prod9-train-*` / `python -m monai.bundle run`); epoch
{record.get('epoch', '?')} of the run. Sliding-window size for inference: {list(roi_size)}.

## Performance
{performance}
## MONAI Bundle Commands
Needs `prod9_components` installed (its wheel), then in this folder:

```bash
python -m monai.bundle run --config_file configs/inference.json                      # first T2 of the dataset
python -m monai.bundle run --config_file configs/inference.json --datalist "['a.nii.gz']"
python -m monai.bundle verify_metadata --meta_file configs/metadata.json
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json --use_trace True \\
    --input_shape "[1, 1, 64, 64, 64]"
```
The TorchScript export is traced, not scripted: the FSQ rounding and MONAI's MAISI blocks do not script.

## System Configuration
Exported with torch {torch.__version__}, MONAI {metadata.get('monai_version')}, Python {platform.python_version()};
`configs/inference.json` runs on CUDA when available, else CPU.

## Authors
{metadata.get('authors', '')}

## Tags
brain MRI, BraTS, autoencoder, generative

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
