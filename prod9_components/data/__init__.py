"""BraTS data: modalities, case discovery and splits, preprocessing transforms, the demo dataset.

Names are re-exported lazily (PEP 562) so that importing one submodule, e.g. ``data.demo`` for the
``prod9-demo-data`` command, does not pay for MONAI's ~5 s import through ``data.transforms``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "modalities": ("MODALITIES", "MODALITY_NAMES", "map_brats_labels", "modality_index", "modality_name"),
    "brats": (
        "check_case_geometry",
        "check_case_names",
        "discover_cases",
        "load_datalist",
        "per_modality_items",
        "prepare_splits",
        "resolve_dataset_dir",
        "save_datalist",
        "split_cases",
    ),
    "demo": ("make_demo_dataset",),
    "settings": ("bool_setting",),
    "postprocessing": ("reconstruction_items",),
    "transforms": (
        "LoadVolumed",
        "MapBraTSLabelsd",
        "RobustIntensityScaled",
        "mask_preprocessing",
        "preprocessing",
        "preprocessing_contract",
        "restore_intensity",
        "training_crop",
    ),
    "case_cache": ("check_sha256", "file_sha256"),
    "control_latents": ("ControlDataset", "LoadControlLatentd", "control_items"),
    "sharding": ("item_number", "validation_generator", "validation_shard"),
    "latent_cache": (
        "LoadLatentd",
        "build_latent_cache",
        "latent_cache_key",
        "latent_canvas",
        "latent_items",
        "latent_scale_factor",
        "load_latent_file",
    ),
    "token_cache": (
        "CenterTokenCropd",
        "LoadTokensd",
        "RandTokenCropd",
        "build_token_cache",
        "largest_token_grid",
        "load_token_file",
        "most_frequent_token",
        "pad_or_crop",
        "restore",
        "scale_crop_info",
        "seg_to_token_grid",
        "token_cache_key",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
