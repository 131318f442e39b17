"""Write the model-zoo folder of a trained stage (layout: :mod:`prod9_components.zoo`): every stage through one writer,
its ``configs/inference.json`` from :mod:`.inference`, its card from :mod:`.card`.

A stage 2-3 checkpoint names the stage-1 export it was trained on (``autoencoder_path`` / ``vae_path`` and its sha256);
that file is read as a record, checked against the recorded hash and written as ``models/autoencoder.pt`` /
``models/vae.pt``. A ControlNet's record holds its frozen base bit for bit (``base.*``): that part is written as the
stage-2 network, ``models/transformer.pt`` / ``models/diffusion.pt``, and ``models/model.pt`` keeps the control branch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from prod9_components.atomic import atomic_dir
from prod9_components.data.case_cache import check_sha256
from prod9_components.networks.export import build_network, read_record
from prod9_components.zoo.card import data_license, model_card
from prod9_components.zoo.inference import Sources, bundle_settings, inference_config

__all__ = ["export_bundle"]

# stage -> (the stage-1 bundle it decodes with, the record fields' prefix and models/ file name, what it is)
UPSTREAM = {
    "maskgit_stage2_label": ("maskgit_stage1", "autoencoder", "stage-1 export"),
    "maskgit_stage2_incontext": ("maskgit_stage1", "autoencoder", "stage-1 export"),
    "maskgit_stage3_controlnet": ("maskgit_stage1", "autoencoder", "stage-1 export"),
    "maisi_stage2_diffusion": ("maisi_stage1_vae", "vae", "MAISI VAE export"),
    "maisi_stage3_controlnet": ("maisi_stage1_vae", "vae", "MAISI VAE export"),
}
# ControlNets: the models/ file of the frozen stage-2 network inside them (state-dict prefix "base.")
BASE = {"maskgit_stage3_controlnet": "transformer", "maisi_stage3_controlnet": "diffusion"}


def export_bundle(checkpoint: str | os.PathLike, target: str | os.PathLike, stage: str, source_bundle: Path) -> Path:
    """Write the model-zoo folder of ``checkpoint`` (a best.ckpt or export of ``stage``) into ``target``.

    ``target`` must not exist or be empty (nothing is replaced); the folder is built beside it and renamed into place,
    so a failed export leaves nothing half-written. ``source_bundle``: the installed bundle of ``stage`` (metadata,
    sampling settings of its train.json, logging.conf, LICENSE). Returns ``target``.

    Raises:
        FileExistsError: ``target`` holds something.
        FileNotFoundError / ValueError: one line naming the file (a checkpoint of another stage, a stage-1 export that
            is gone or changed since training, network arguments a config would interpret).
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"--output-dir {target}: exists and is not empty; export into a new folder")
    record, sha256 = read_record(checkpoint, stages=[stage])
    network = build_network(record, source=str(checkpoint))  # a registered class, its arguments checked
    weights = {"model": network.state_dict()}
    held = {"model": f"`{record['network_target'].rsplit('.', 1)[-1]}`, this stage ({Path(checkpoint).name}, "
                     f"sha256 {sha256[:16]}, epoch {record.get('epoch', '?')})"}
    sources = Sources(record, str(checkpoint), settings=bundle_settings(source_bundle),
                      downsample_factor=int(getattr(network, "downsample_factor", 4)))
    if stage in UPSTREAM:
        sources.upstream, decoder = _upstream(record, checkpoint, *UPSTREAM[stage])
        sources.downsample_factor = int(decoder.downsample_factor)
        name = UPSTREAM[stage][1]
        weights[name] = decoder.state_dict()
        held[name] = (f"`{sources.upstream['network_target'].rsplit('.', 1)[-1]}`, the stage-1 network it decodes "
                      f"with ({Path(record[f'{name}_path']).name}, sha256 {record[f'{name}_sha256'][:16]})")
    if stage in BASE:  # the control branch in model.pt, the frozen stage-2 network beside it
        own = weights["model"]
        weights["model"] = {k: v for k, v in own.items() if not k.startswith("base.")}
        weights[BASE[stage]] = {k.removeprefix("base."): v for k, v in own.items() if k.startswith("base.")}
        held["model"] = held["model"].replace("this stage", "the control branch")
        held[BASE[stage]] = f"the frozen stage-2 network it controls (`base` of {Path(checkpoint).name})"

    metadata = json.loads((source_bundle / "configs" / "metadata.json").read_text())
    version = metadata["version"]
    metadata["changelog"][version] += (f"; this folder: exported by prod9_components from {Path(checkpoint).name} "
                                       f"(sha256 {sha256[:16]}), epoch {record.get('epoch', '?')}")
    metadata["network_data_format"] = _data_format(metadata["network_data_format"], record["network_args"])
    config = inference_config(stage, sources)  # before anything is written: refuses network_args MONAI would run

    with atomic_dir(target) as building:
        folder = Path(building)
        for sub in ("configs", "models", "docs"):
            (folder / sub).mkdir(parents=True)
        for name, state in weights.items():
            torch.save(state, folder / "models" / f"{name}.pt")
        _write_json(folder / "configs" / "metadata.json", metadata)
        _write_json(folder / "configs" / "inference.json", config)
        shutil.copyfile(source_bundle / "configs" / "logging.conf", folder / "configs" / "logging.conf")
        shutil.copyfile(source_bundle / "LICENSE", folder / "LICENSE")
        (folder / "large_files.yml").write_text(_large_files(folder, weights))
        (folder / "docs" / "README.md").write_text(model_card(
            stage, metadata, record, sources.spacing, sources.window, {f"models/{n}.pt": w for n, w in held.items()}))
        (folder / "docs" / "data_license.txt").write_text(data_license(metadata))
    return target


def _upstream(record: dict, checkpoint, stage1: str, name: str, what: str):
    """The stage-1 record and network ``record`` links to (``<name>_path``), checked against ``<name>_sha256``."""
    path = record.get(f"{name}_path")
    if not isinstance(path, str) or not isinstance(record.get(f"{name}_sha256"), str):
        raise ValueError(f"{checkpoint}: names no {name}_path with its sha256; cannot find the {what} it needs")
    upstream, sha = read_record(path, stages=[stage1])
    check_sha256(path, record[f"{name}_sha256"], what, actual=sha, recorded_by=checkpoint)
    return upstream, build_network(upstream, source=path)


def _data_format(data_format: dict, network_args: dict) -> dict:
    """The stage's ``network_data_format`` with the sizes of these weights: the token range and logit channels of a
    MaskGiT transformer's codebook, the latent channels of a MAISI UNet."""
    data_format = copy.deepcopy(data_format)
    args = network_args.get("base_args", network_args)
    inputs, outputs = data_format.get("inputs", {}), data_format.get("outputs", {})
    if isinstance(args.get("codebook_size"), int):
        size = args["codebook_size"]
        if "target_tokens" in inputs:
            inputs["target_tokens"].update(value_range=[0, size],
                                           channel_def={"0": f"FSQ token index, {size} = [MASK]"})
        if "logits" in outputs:
            outputs["logits"]["num_channels"] = size
    if isinstance(args.get("latent_channels"), int):
        for block in (inputs.get("latent"), outputs.get("velocity")):
            if block is not None:
                block["num_channels"] = args["latent_channels"]
    return data_format


def _large_files(folder: Path, weights: dict) -> str:
    lines = ["large_files:"]
    for name in weights:
        sha = hashlib.sha256((folder / "models" / f"{name}.pt").read_bytes()).hexdigest()
        lines += [f'  - path: "models/{name}.pt"', f'    url: ""  # where the publisher uploads models/{name}.pt',
                  f'    hash_val: "{sha}"', '    hash_type: "sha256"']
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: dict) -> None:
    """The zoo's format: 4-space JSON with a final newline."""
    path.write_text(json.dumps(data, indent=4) + "\n")
