"""The repository bundles' own standalone ``configs/inference.json``: the exporter's config of each stage
(:mod:`.inference`), written from the bundle's ``train.json`` defaults instead of a trained checkpoint.

An export writes what a training run recorded; this module writes the record the default full-size configuration
describes, so the file in the repository and the file an export writes come from one definition and differ only in
the values a run determines:

- the networks' constructor arguments: ``network_def`` of train.json (and of the stage's upstream bundles) built on
  PyTorch's meta device, which allocates nothing, and read back as the record would hold them (``init_args``);
- spacing, intensity range, sliding window: the stage-1 bundle's defaults;
- the sampling grid (MaskGiT ``volume_grid``, MAISI ``latent_size``): a training run records the largest grid of its
  cases; the template takes the grid of one default stage-1 window, ``roi_size / downsampling`` (rounded up to the
  UNet's multiple for MAISI);
- MaskGiT's ``pad_token``: computed at run time from ``models/autoencoder.pt`` as training computes it;
- MAISI's ``scale_factor``: ``1 / std`` of the training latents, known only after a run; the template writes 1.0.

``python scripts/write_inference_templates.py`` rewrites the seven files; a unit test asserts they equal this output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prod9_components.zoo.inference import Sources, bundle_settings, inference_config

__all__ = ["default_sources", "template_config"]

# stage -> its stage-1 bundle (what it decodes with)
STAGE1 = {"maskgit_stage2_label": "maskgit_stage1", "maskgit_stage2_incontext": "maskgit_stage1",
          "maskgit_stage3_controlnet": "maskgit_stage1", "maisi_stage2_diffusion": "maisi_stage1_vae",
          "maisi_stage3_controlnet": "maisi_stage1_vae"}
# ControlNet -> the stage-2 bundle its train.json controls by default (transformer_path / diffusion_path)
BASE = {"maskgit_stage3_controlnet": "maskgit_stage2_label", "maisi_stage3_controlnet": "maisi_stage2_diffusion"}
# The ids naming the upstream networks in a stage 2-3 train.json
UPSTREAM_IDS = {"maskgit_stage1": "autoencoder", "maisi_stage1_vae": "vae"}
SCALE_FACTOR = 1.0  # MAISI: latents taken as the VAE gives them until a run measures their std


def template_config(stage: str, bundle_dir: str | Path) -> dict:
    """The standalone ``configs/inference.json`` of the repository bundle ``bundle_dir`` (of ``stage``; its upstream
    bundles are its siblings): :func:`~prod9_components.zoo.inference.inference_config` of
    :func:`default_sources`."""
    return inference_config(stage, default_sources(stage, Path(bundle_dir)))


def default_sources(stage: str, bundle_dir: Path) -> Sources:
    """What the exporter would read from a checkpoint of the default configuration of ``stage``."""
    bundles = bundle_dir.parent
    if stage not in STAGE1:
        record, network = _stage1_record(bundle_dir)
        return Sources(record, str(bundle_dir), settings=bundle_settings(bundle_dir),
                       downsample_factor=int(network.downsample_factor))
    upstream, decoder = _stage1_record(bundles / STAGE1[stage])
    objects = {UPSTREAM_IDS[STAGE1[stage]]: decoder}
    base_record = None
    if stage in BASE:
        base_record, objects["base"] = _stage2_record(BASE[stage], bundles / BASE[stage], upstream, dict(objects))
    record, _ = _stage2_record(stage, bundle_dir, upstream, objects, base_record)
    return Sources(record, str(bundle_dir), upstream=upstream, settings=bundle_settings(bundle_dir),
                   downsample_factor=int(decoder.downsample_factor))


def _parser(bundle_dir: Path, objects: dict | None = None):
    """train.json of ``bundle_dir`` in a MONAI parser, with ``objects`` (upstream networks) set as ids."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "train.json"))
    for key, value in (objects or {}).items():
        parser[key] = value
    return parser


def _network(parser):
    """``network_def`` built on the meta device: its constructor arguments without allocating its weights."""
    import logging

    from prod9_components.networks.registry import target_name

    copies = logging.getLogger("monai.networks.utils")  # a ControlNet copying its base logs every copy
    level = copies.level
    copies.setLevel(logging.WARNING)
    try:
        with torch.device("meta"):
            network = parser.get_parsed_content("network_def")
    finally:
        copies.setLevel(level)
    return network, {"network_target": target_name(type(network)), "network_args": dict(network.init_args)}


def _stage1_record(bundle_dir: Path):
    """``(record, meta network)`` of a stage-1 bundle's defaults: network, preprocessing contract, sliding window."""
    from prod9_components.data import preprocessing_contract

    parser = _parser(bundle_dir)
    network, record = _network(parser)
    record["preprocessing"] = preprocessing_contract(parser.get_parsed_content("spacing"),
                                                     parser.get_parsed_content("intensity_range"))
    record["sliding_window"] = {"roi_size": parser.get_parsed_content("roi_size"),
                                "overlap": parser.get_parsed_content("overlap")}
    return record, network


def _stage2_record(stage: str, bundle_dir: Path, upstream: dict, objects: dict, base: dict | None = None):
    """``(record, meta network)`` of a stage 2-3 bundle's defaults; ``base``: a ControlNet's stage-2 record, whose
    modalities, grid and sampling settings it keeps (as its train.json reads them from the base checkpoint)."""
    parser = _parser(bundle_dir, objects)
    network, record = _network(parser)
    factor = int(objects[UPSTREAM_IDS[STAGE1[stage]]].downsample_factor)
    window = [int(r) // factor for r in upstream["sliding_window"]["roi_size"]]  # one stage-1 window's grid
    if base is not None:
        inherited = ("source_modalities", "target_modalities", "volume_grid", "modalities", "scheduler_args",
                     "latent_size", "scale_factor")
        record.update({k: base[k] for k in inherited if k in base})
        if stage.startswith("maisi"):
            record["source_modality"] = (parser.get_parsed_content("source_modality")
                                         if network.uses_image else None)
    elif stage.startswith("maskgit"):
        record["source_modalities"] = list(parser.get_parsed_content("source_modalities"))
        record["target_modalities"] = list(parser.get_parsed_content("target_modalities"))
        record["volume_grid"] = window
    else:
        multiple = 2 ** (len(record["network_args"]["num_channels"]) - 1)  # the UNet's downsampling
        record["latent_size"] = [-(-n // multiple) * multiple for n in window]
        record["scale_factor"] = SCALE_FACTOR
        record["scheduler_args"] = parser.get_parsed_content("scheduler_args")
        record["modalities"] = list(parser.get_parsed_content("modalities"))
    return record, network
