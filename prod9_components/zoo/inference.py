"""The standalone ``configs/inference.json`` of an exported stage, one builder per stage.

Each config runs alone in the exported folder (``python -m monai.bundle run --config_file configs/inference.json``):
``bundle_root``, ``device``, ``network_def`` (the stage's network, its constructor arguments written from the record as
data), weights from ``@bundle_root/models/*.pt`` (:func:`~prod9_components.networks.export.load_weights`), outputs in
``@bundle_root/eval``. Sampling goes through the one generation path the commands use
(:mod:`prod9_components.generation`), with the settings of the stage's own ``train.json``, so a sample equals the
command's ``generate`` of the same checkpoint and seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prod9_components.config_literals import config_data
from prod9_components.data.settings import bool_setting

__all__ = ["BUILDERS", "Sources", "bundle_settings", "inference_config"]

# Sampling defaults a stage's exported config takes from its train.json (literal values there).
SETTINGS = ("num_inference_steps", "schedule", "guidance_scale", "conditioning_scale", "sw_batch_size",
            "expected_codes")
# The background's token, computed as training computes it (train.json's pad_token) from the stage-1 weights loaded
# beside it: what a config without a trained record (the repository's template) pads translation contexts with.
BACKGROUND_TOKEN = ("$int(@autoencoder.quantize_stage_2_inputs(torch.zeros(1, 1, 16, 16, 16, device=@device))"
                    ".flatten().mode().values)")


def bundle_settings(bundle: Path) -> dict:
    """:data:`SETTINGS` of the stage's train.json (its literal values)."""
    config = json.loads((Path(bundle) / "configs" / "train.json").read_text())
    return {k: config[k] for k in SETTINGS if k in config and not str(config[k]).startswith(("$", "@", "%"))}


@dataclass
class Sources:
    """What a builder writes the config from.

    Args:
        record: the exported checkpoint's record (:func:`~prod9_components.networks.export.read_record`).
        source: the checkpoint's path, named in errors.
        upstream: the stage-1 record it decodes with (stages 2-3), else None.
        downsample_factor: the stage-1 network's total downsampling.
        settings: :data:`SETTINGS` from the stage's train.json.
    """

    record: dict
    source: str
    upstream: dict | None = None
    downsample_factor: int = 4
    settings: dict = field(default_factory=dict)

    def data(self, value, what: str):
        """A record value as config data (:func:`~prod9_components.config_literals.config_data`)."""
        return config_data(value, self.source, what)

    def network_def(self, record: dict | None = None) -> dict:
        record = self.record if record is None else record
        return {"_target_": record["network_target"], **self.data(record["network_args"], "network_args")}

    @property
    def preprocessing(self) -> dict:
        return (self.upstream or self.record).get("preprocessing", {})

    @property
    def spacing(self) -> list[float]:
        return [float(s) for s in self.preprocessing.get("spacing", [1.0, 1.0, 1.0])]

    @property
    def intensity_range(self) -> list[float]:
        return [float(v) for v in self.preprocessing.get("intensity", {}).get("range", [0.0, 1.0])]

    @property
    def window(self) -> dict:
        """The stage-1 export's sliding window (what the commands decode with)."""
        return (self.upstream or self.record).get("sliding_window") or {}


def _weights(name: str) -> str:
    return f"$os.path.join(@bundle_root, 'models', '{name}.pt')"


def _common(generation: str | None) -> dict:
    # bundle_errors: a missing file or bad value ends `monai.bundle run` in one line naming it, not a traceback
    imports = ["$import glob", "$import os", "$import prod9_components.bundle_errors", "$import torch", "$import monai",
               "$import prod9_components.data as data", "$import prod9_components.networks.export as export"]
    if generation:
        imports += [f"$import prod9_components.generation.{generation} as generation",
                    "$import prod9_components.generation.inputs as generation_inputs"]
    return {"imports": imports, "bundle_root": ".",
            "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
            "model_path": _weights("model"), "dataset_dir": "$data.resolve_dataset_dir()",
            "output_dir": "$os.path.join(@bundle_root, 'eval')", "overwrite": False, "seed": 0}


def _decoder(s: Sources, name: str) -> dict:
    """The stage-1 network a stage 2-3 decodes with: ``<name>_def`` loaded from ``models/<name>.pt``, and the sliding
    window of its export."""
    return {f"{name}_path": _weights(name), f"{name}_def": s.network_def(s.upstream),
            name: f"$export.load_weights(@{name}_def, @{name}_path).to(@device).eval()",
            "spacing": s.spacing, "intensity_range": s.intensity_range,
            "sw_config": {"_target_": "prod9_components.inference.sliding_window.SlidingWindowConfig",
                          "roi_size": [int(r) for r in s.window.get("roi_size", [64, 64, 64])],
                          "overlap": float(s.window.get("overlap", 0.5)),
                          "sw_batch_size": int(s.settings.get("sw_batch_size", 4)), "mode": "gaussian"}}


def _network(s: Sources, base: str | None = None) -> dict:
    """``network_def`` (the record's class and arguments) and ``network``, its weights from ``models/model.pt`` (and a
    ControlNet's frozen base from ``models/<base>.pt``)."""
    parts = f", base=@{base}_path" if base else ""
    return {**({f"{base}_path": _weights(base)} if base else {}), "network_def": s.network_def(),
            "network": f"$export.load_weights(@network_def, @model_path{parts}).to(@device).eval()"}


def _maskgit_sampler(s: Sources) -> dict:
    return {"num_inference_steps": int(s.settings.get("num_inference_steps", 12)),
            "schedule": str(s.settings.get("schedule", "cosine")),
            "guidance_scale": float(s.settings.get("guidance_scale", 1.0)),
            "sampler": {"_target_": "prod9_components.sampling.maskgit.MaskGiTSampler",
                        "num_steps": "@num_inference_steps", "schedule": "@schedule",
                        "guidance_scale": "@guidance_scale"}}


def _maisi_sampler(s: Sources) -> dict:
    return {"num_inference_steps": int(s.settings.get("num_inference_steps", 10)),
            "guidance_scale": float(s.settings.get("guidance_scale", 1.0)),
            "scheduler": {"_target_": "monai.networks.schedulers.RFlowScheduler",
                          **s.data(s.record["scheduler_args"], "scheduler_args")},
            "latent_size": [int(v) for v in s.record["latent_size"]],
            "scale_factor": float(s.record["scale_factor"])}


def _conditioning_scale(s: Sources) -> dict:
    """A ControlNet's multiplier of its control (1: as trained)."""
    return {"conditioning_scale": float(s.settings.get("conditioning_scale", 1.0))}


def _first_case(key: str) -> str:
    """An expression: the ``key`` file of the first case of ``dataset_dir`` (BRATS_DATA_DIR, else the demo), as a
    one-file list."""
    return f"$[data.discover_cases(@dataset_dir)[0][{key}]]"


def _require(*names: str) -> str:
    """An expression that stops the run in one line when any of the ``models/<name>.pt`` files is missing."""
    return f"$export.require_weights({', '.join(f'@{name}_path' for name in names)})"


def _end(run: str, weights: tuple[str, ...]) -> dict:
    """``initialize`` (the weights are there, then the seed), ``run``, ``finalize``; ``weights``: the ``models/``
    files the config loads (``model`` is ``@model_path``, the others ``@<name>_path``)."""
    return {"initialize": [_require(*weights), "$monai.utils.set_determinism(seed=@seed)"], "run": [run],
            "finalize": []}


def stage1(s: Sources) -> dict:
    """Image -> reconstruction through MONAI's ``SupervisedEvaluator`` with the tiled reconstruction ``infer`` uses
    (:class:`~prod9_components.inference.sliding_window.TiledReconstructionInferer`), weights loaded by MONAI's
    ``CheckpointLoader``; ``--datalist "['a.nii.gz']"`` names the volumes (default: the first T2 of the dataset)."""
    config = _common(None)
    config.pop("seed")
    return {
        **config,
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*', '*_t2.nii*')))[:1]",
        "spacing": s.spacing,
        "intensity_range": s.intensity_range,
        "autoencoder_def": s.network_def(),
        "network_def": {"_target_": "prod9_components.networks.reconstruction.Reconstruction",
                        "autoencoder": "@autoencoder_def"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": "$data.preprocessing(spacing=@spacing, "
                          f"intensity_range=@intensity_range, k_divisible={int(s.downsample_factor)})"},
        "dataset": {"_target_": "Dataset",
                    "data": "$data.reconstruction_items(@datalist, None, @output_dir, overwrite=@overwrite)",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "prod9_components.inference.sliding_window.TiledReconstructionInferer",
                    "roi_size": [int(r) for r in s.window.get("roi_size", [64, 64, 64])], "overlap": 0.25,
                    "sw_batch_size": 4, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "prod9_components.data.postprocessing.RestoreIntensityd", "keys": "pred",
             "source_key": "image", "intensity_range": "@intensity_range"},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "prod9_components.data.postprocessing.SaveVolumed", "keys": "pred", "path_key": "output"}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "@model_path", "load_dict": {"model": "@network"},
                      "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "initialize": [_require("model")],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }


def maskgit_label(s: Sources) -> dict:
    """``num_samples`` label-conditional samples ``@output_dir/sample_0001_<MOD>.nii.gz``, ... (sample ``i`` of seed
    ``seed + i``)."""
    r = s.record
    return {
        **_common("maskgit"), **_decoder(s, "autoencoder"), **_network(s), **_maskgit_sampler(s),
        "modality": s.data(r["target_modalities"][0], "target_modalities"),
        "num_samples": 4,
        "volume_grid": [int(v) for v in r["volume_grid"]],
        "token_grid": "@volume_grid",
        **_end("$generation.generate_samples(@network, @autoencoder, @sampler, @modality, @num_samples, @token_grid, "
               "@output_dir, @spacing, seed=@seed, sw_config=@sw_config, device=@device, volume_grid=@volume_grid, "
               "overwrite=@overwrite)", ("model", "autoencoder")),
    }


def maskgit_incontext(s: Sources) -> dict:
    """Translation of ``input`` (one file per source modality, in order; default: the first case of the dataset) into
    ``@output_dir/<case>_<TARGET>.nii.gz`` on the source's own grid."""
    r = s.record
    return {
        **_common("maskgit"), **_decoder(s, "autoencoder"), **_network(s), **_maskgit_sampler(s),
        "source_modalities": s.data(list(r["source_modalities"]), "source_modalities"),
        "target_modality": s.data(r["target_modalities"][0], "target_modalities"),
        "pad_token": int(r["pad_token"]) if "pad_token" in r else BACKGROUND_TOKEN,
        "downsample_factor": int(s.downsample_factor),
        "expected_codes": bool_setting("expected_codes", s.settings.get("expected_codes", False)),
        "input": "$data.discover_cases(@dataset_dir)[:1]",
        "num_samples": None,
        "preprocessing": "$data.preprocessing(image_keys=[data.MODALITIES[data.modality_index(m)] for m in "
                         "@source_modalities], spacing=@spacing, intensity_range=@intensity_range, "
                         "k_divisible=@downsample_factor)",
        **_end("$generation.translate_volumes(@network, @autoencoder, @sampler, "
               "generation_inputs.input_items(@input, @source_modalities), @source_modalities, @target_modality, "
               "@preprocessing, @output_dir, pad_token=@pad_token, seed=@seed, sw_config=@sw_config, device=@device, "
               "overwrite=@overwrite, num_samples=@num_samples, expected_codes=@expected_codes)",
               ("model", "autoencoder")),
    }


def maskgit_controlnet(s: Sources) -> dict:
    """A sample per tumour mask (``mask``: files, any BraTS label convention; default: the first case's segmentation):
    ``@output_dir/<case>_<MOD>.nii.gz`` and the mask it was steered by, ``<case>_mask.nii.gz``."""
    r = s.record
    return {
        **_common("maskgit"), **_decoder(s, "autoencoder"), **_network(s, base="transformer"), **_maskgit_sampler(s),
        "modality": s.data(r["target_modalities"][0], "target_modalities"),
        "source_modalities": s.data(list(r["source_modalities"]), "source_modalities"),
        "volume_grid": [int(v) for v in r["volume_grid"]],
        "mask": _first_case("'seg'"),
        **_conditioning_scale(s),
        **_end("$generation.generate_with_masks(@network, @autoencoder, @sampler, @modality, "
               "generation_inputs.condition_items(@mask), @volume_grid, @spacing, @output_dir, seed=@seed, "
               "sw_config=@sw_config, device=@device, source_modalities=@source_modalities, overwrite=@overwrite, "
               "conditioning_scale=@conditioning_scale)",
               ("model", "autoencoder", "transformer")),
    }


def maisi_diffusion(s: Sources) -> dict:
    """``num_samples`` samples from noise ``@output_dir/sample_0001.nii.gz``, ... (``sample_0001_T2.nii.gz`` with
    ``--modality T2``; default: unconditional, the null label)."""
    return {
        **_common("maisi"), **_decoder(s, "vae"), **_network(s), **_maisi_sampler(s),
        "modality": None,
        "num_samples": 4,
        **_end("$generation.generate_samples(@network, @vae, @scheduler, @modality, @num_samples, @latent_size, "
               "@scale_factor, @num_inference_steps, @output_dir, @spacing, guidance_scale=@guidance_scale, "
               "seed=@seed, sw_config=@sw_config, device=@device, intensity_range=@intensity_range, "
               "overwrite=@overwrite)", ("model", "vae")),
    }


def maisi_controlnet(s: Sources) -> dict:
    """A sample per condition (``mask`` and/or ``source`` files, as the ControlNet takes them; default: the first case
    of the dataset): ``@output_dir/<case>_<MOD>.nii.gz`` with the mask it was steered by."""
    r = s.record
    inputs = str(r["network_args"]["condition_type"]).split("+")
    uses_mask, uses_image = "mask" in inputs, "image" in inputs
    source_modality = r.get("source_modality")
    return {
        **_common("maisi"), **_decoder(s, "vae"), **_network(s, base="diffusion"), **_maisi_sampler(s),
        "modalities": s.data(list(r["modalities"]), "modalities"),
        "source_modality": s.data(source_modality, "source_modality"),
        "modality": None,
        "target": "$generation.target_modality(@modality, None, @source_modality, @modalities)",
        "mask": _first_case("'seg'") if uses_mask else None,
        "source": _first_case("data.MODALITIES[data.modality_index(@source_modality)]") if uses_image else None,
        "items": f"$generation_inputs.condition_items(@mask, @source, {uses_mask}, {uses_image}, @source_modality)",
        **_conditioning_scale(s),
        **_end("$generation.generate_with_conditions(@network, @vae, @scheduler, @target, @items, @latent_size, "
               "@scale_factor, @num_inference_steps, @spacing, @output_dir, guidance_scale=@guidance_scale, "
               "seed=@seed, sw_config=@sw_config, device=@device, intensity_range=@intensity_range, "
               "overwrite=@overwrite, conditioning_scale=@conditioning_scale)", ("model", "vae", "diffusion")),
    }


BUILDERS = {
    "maskgit_stage1": stage1,
    "maisi_stage1_vae": stage1,
    "maskgit_stage2_label": maskgit_label,
    "maskgit_stage2_incontext": maskgit_incontext,
    "maskgit_stage3_controlnet": maskgit_controlnet,
    "maisi_stage2_diffusion": maisi_diffusion,
    "maisi_stage3_controlnet": maisi_controlnet,
}


def inference_config(stage: str, sources: Sources) -> dict:
    """The standalone ``configs/inference.json`` of ``stage`` (one of :data:`BUILDERS`)."""
    return BUILDERS[stage](sources)
