"""A user's preset file (``--config my.yaml``) as bundle overrides: the one table from the seed's keys to bundle ids.

The seed's workflow document writes configs as nested YAML sections (``model.hidden_dim``, ``trainer.max_epochs``,
``data.batch_size``, ``sliding_window.roi_size``, ...); our bundles are flat MONAI ids (``network_def#hidden_dim``,
``epochs``, ``batch_size``, ``sw_roi_size``). ``SEED_KEYS`` maps every key that document mentions or implies:

- to bundle ids: the first candidate the bundle reads is set (stage 1 calls the window ``roi_size``, stage 2
  ``sw_roi_size``);
- ``Fixed``: what prod9 always does (``sliding_window.enabled: true``); accepted with that value only;
- ``Noted``: a key of the seed's design that prod9 has no knob for (``trainer.profiler``); accepted, with one
  warning line saying why it changes nothing.

A preset may also use bundle ids directly (flat, like a bundle's ``configs/tiny.json``:
``network_def#num_channels: [8, 16, 32]``). A key that is neither is a one-line error naming the file, the key and
the closest key or id. Preset values are data (design §10): a string MONAI would evaluate (``$...``, ``@...``,
``%...``) is kept literal, and a dict naming a component (``_target_``) is refused (see
:mod:`prod9_components.cli.literal_flags`).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from monai.bundle.config_item import ConfigComponent

from prod9_components.cli.bundle_runner import reads_id
from prod9_components.cli.literal_flags import Expression, literal_value

MODALITIES = ("T1", "T1ce", "T2", "FLAIR")  # the seed's label numbers: T1=0, T1ce=1, T2=2, FLAIR=3


class PresetError(ValueError):
    """A preset key or value no bundle id takes, reported in one line."""


class Ids(NamedTuple):
    """A seed key that sets the first of ``candidates`` the bundle reads (``convert`` turns the seed's value into
    the id's value); ``also``: a second id set to ``[value]`` (the one-item list form of the same setting)."""

    candidates: tuple[str, ...]
    convert: Callable[[Any], Any] | None = None
    also: str | None = None


class Fixed(NamedTuple):
    """A seed key that describes what prod9 always does: accepted only with ``value``."""

    value: Any
    why: str


class Noted(NamedTuple):
    """A seed key prod9 has no setting for: accepted, and one warning line says ``why`` it changes nothing."""

    why: str


def modality_name(value: Any) -> Any:
    """The seed numbers modalities (T1=0 ... FLAIR=3); the bundles take names. Lists map item by item."""
    if isinstance(value, (list, tuple)):
        return [modality_name(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(MODALITIES):
            raise PresetError(f"modality {value}: expected 0-3 (T1=0, T1ce=1, T2=2, FLAIR=3)")
        return MODALITIES[value]
    return value


def device(value: Any) -> Any:
    """Lightning's ``accelerator`` as the bundle's torch device (an expression we write, from a fixed choice)."""
    choices = {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}
    if str(value).lower() == "auto":
        return None  # the bundle's default: CUDA when available
    if str(value).lower() not in choices:
        raise PresetError(f"accelerator {value!r}: expected gpu, cuda, cpu or auto")
    return Expression(f"$torch.device('{choices[str(value).lower()]}')")


SEED_KEYS: dict[str, Ids | Fixed | Noted] = {
    # model: the networks' sizes
    "model.hidden_dim": Ids(("network_def#hidden_dim",)),
    "model.num_layers": Ids(("network_def#num_layers",)),
    "model.num_heads": Ids(("network_def#num_heads",)),
    "model.num_channels": Ids(("network_def#num_channels",)),
    "model.levels": Ids(("levels",)),
    "model.control_type": Ids(("control_type",)),
    "model.transformer_type": Fixed("single_stream", "one transformer class, single-stream, serves both stage-2 "
                                                     "bundles"),
    "model.num_classes": Fixed(4, "BraTS has four modality labels (T1, T1ce, T2, FLAIR)"),
    # modality_processor: the in-context transformer's context
    "modality_processor.hidden_dim": Ids(("network_def#hidden_dim",)),
    "modality_processor.max_context_length": Ids(("network_def#max_context_length",)),
    "modality_processor.num_classes": Fixed(4, "BraTS has four modality labels (T1, T1ce, T2, FLAIR)"),
    "modality_processor.latent_dim": Noted("the latent's size is read from the stage-1 export (set model.levels in "
                                           "stage 1)"),
    "modality_processor.patch_size": Noted("the transformer takes one token per latent voxel, with 3D positions"),
    # training: what is learned, and how fast
    "training.source_modalities": Ids(("source_modalities",), modality_name),
    "training.target_modality": Ids(("target_modality",), modality_name, also="target_modalities"),
    "training.batch_size": Ids(("batch_size",)),
    "training.lr": Ids(("learning_rate",)),
    "training.learning_rate": Ids(("learning_rate",)),
    "training.max_epochs": Ids(("epochs",)),
    "training.epochs": Ids(("epochs",)),
    "transformer_path": Ids(("transformer_path",)),
    # trainer: the seed's Lightning trainer settings
    "trainer.max_epochs": Ids(("epochs",)),
    "trainer.limit_train_batches": Ids(("limit_train_batches",)),
    "trainer.limit_val_batches": Ids(("limit_val_batches",)),
    "trainer.logging.limit_train_batches": Ids(("limit_train_batches",)),
    "trainer.logging.limit_val_batches": Ids(("limit_val_batches",)),
    "trainer.check_val_every_n_epoch": Ids(("val_interval",)),
    "trainer.accelerator": Ids(("device",), device),
    "trainer.devices": Fixed(1, "a run uses one device; for several GPUs run torchrun with multi_gpu_train.json "
                                "(README, 'GPUs and clusters')"),
    "trainer.profiler": Noted("the bundles have no profiler; scripts/benchmark.py measures each stage"),
    "trainer.detect_anomaly": Noted("the bundles do not switch on torch's anomaly detection; a NaN loss stops a run "
                                    "with a message"),
    # data
    "data.batch_size": Ids(("batch_size",)),
    "data.num_workers": Ids(("num_workers",)),
    "data.cache_rate": Ids(("cache_rate",)),
    "data.roi_size": Ids(("roi_size",)),
    "data.dataset_dir": Ids(("dataset_dir",)),
    # sliding_window: the tiled encode/decode of inference and validation
    "sliding_window.enabled": Fixed(True, "inference and validation always encode and decode through the sliding "
                                          "window"),
    "sliding_window.roi_size": Ids(("sw_roi_size", "roi_size")),
    "sliding_window.overlap": Ids(("sw_overlap", "overlap")),
    "sliding_window.sw_batch_size": Ids(("sw_batch_size",)),
    "sliding_window.mode": Ids(("sw_mode", "sw_config#mode")),
}

SECTIONS = {key.split(".")[0] for key in SEED_KEYS if "." in key}


def read_preset(path: str | Path) -> dict:
    """The preset's mapping (JSON or YAML), or a one-line error naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except (OSError, ValueError) as error:
        raise PresetError(f"{path}: not a readable JSON/YAML preset ({str(error).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset is a mapping of keys to values, got {type(data).__name__}")
    return data


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)  # safe_load: plain data, no Python tags
    except yaml.YAMLError as error:
        raise ValueError(str(error)) from None


def preset_overrides(path: str | Path, bundle_ids: Any, bundle: str) -> dict[str, Any]:
    """The bundle overrides a user's preset file stands for, values made literal.

    Args:
        path: the preset (JSON or YAML), nested seed sections and/or flat bundle ids.
        bundle_ids: a MONAI ``ConfigParser`` holding every config of the bundle (``"id" in parser``, raw defaults).
        bundle: the bundle's name, for errors.
    """
    overrides: dict[str, Any] = {}
    origin: dict[str, str] = {}  # id -> the preset key that set it, to report two keys that disagree
    for key, value in _leaves(read_preset(path)):
        for target, target_value in _targets(path, key, value, bundle_ids, bundle).items():
            if target in overrides and overrides[target] != target_value:
                raise PresetError(f"{path}: {key} and {origin[target]} both set {target}, to different values")
            overrides[target], origin[target] = target_value, key
    return overrides


def _leaves(data: dict, prefix: str = ""):
    """``(dotted key, value)`` of a preset: seed sections are walked down to the table's keys or to plain values;
    any other top-level key (a bundle id, maybe with ``#``) is one leaf, whatever its value."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        walk = isinstance(value, dict) and dotted not in SEED_KEYS and (prefix or key in SECTIONS)
        if walk:
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _targets(path, key: str, value: Any, bundle_ids: Any, bundle: str) -> dict[str, Any]:
    """The bundle ids one preset key sets (empty for Fixed and Noted keys)."""
    rule = SEED_KEYS.get(key)
    if isinstance(rule, Fixed):
        if value != rule.value:
            raise PresetError(f"{path}: {key} must be {rule.value!r} ({rule.why}), got {value!r}")
        return {}
    if isinstance(rule, Noted):
        logging.getLogger(__name__).warning("%s: %s changes nothing: %s", path, key, rule.why)
        return {}
    if rule is None:
        if "." not in key and reads_id(bundle_ids, key):
            return {key: _literal(path, key, value, bundle_ids.get(key))}
        raise PresetError(f"{path}: {key} maps to no bundle id of {bundle}{_closest(key, bundle_ids)}")
    target = next((c for c in rule.candidates if c in bundle_ids), None)
    if target is None:
        raise PresetError(f"{path}: {key} sets {' or '.join(rule.candidates)}, which bundle {bundle} does not read")
    try:
        converted = rule.convert(value) if rule.convert else value
    except PresetError as error:
        raise PresetError(f"{path}: {key}: {error}") from None
    if converted is None:
        return {}
    targets = {target: _literal(path, key, converted, bundle_ids.get(target))}
    if rule.also and rule.also in bundle_ids:
        targets[rule.also] = [targets[target]]
    return targets


def _literal(path, key: str, value: Any, default: Any) -> Any:
    """``value``, checked to be data: components refused, a bundle expression refused where the id is typed (the
    runner then makes every override literal, as it does for flags, so this returns ``value`` unchanged)."""
    if isinstance(value, Expression):
        return value
    if _has_component(value):
        keys = ", ".join(sorted(ConfigComponent.non_arg_keys))
        raise PresetError(f"{path}: {key}: a preset value cannot name a component ({keys}); presets are data, "
                          f"components belong in a bundle's own configs")
    literal_value(value, f"{path}: {key}", default)  # raises here, naming the file, where the id is typed
    return value


def _has_component(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(set(value) & ConfigComponent.non_arg_keys) or any(_has_component(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_component(v) for v in value)
    return False


def _closest(key: str, bundle_ids: Any) -> str:
    """`` (closest: 'x')`` over the table's keys and the bundle's top-level ids, or nothing."""
    ids = [k for k in bundle_ids.get("") or {} if isinstance(k, str) and k != "imports"]
    match = difflib.get_close_matches(key, [*SEED_KEYS, *ids], n=1, cutoff=0.5)
    return f" (closest: {match[0]!r})" if match else ""
