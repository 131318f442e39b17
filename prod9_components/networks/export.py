"""Self-describing network files: weights + constructor arguments + preprocessing contract.

Every best checkpoint and every stage export is one of these records, so the next stage (or `validate`,
`test`, `infer`) rebuilds the network from the file alone, whatever size variant it was trained with.
Records hold only tensors and plain Python values: they load with ``torch.load(weights_only=True)``, and
``network_target`` must name a class of :mod:`prod9_components.networks.registry` (a record never names other code).

Record layout::

    {"format": "prod9-network", "version": 1,
     "network_target": "prod9_components.networks.autoencoder_fsq.AutoencoderFSQ",
     "network_args": {...},            # JSON-able constructor arguments
     "state_dict": {...},              # weights
     "preprocessing": {...},           # spacing, orientation, intensity scaling
     ...extra fields (stage, metrics, epoch)}
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prod9_components.atomic import atomic_path
from prod9_components.networks.registry import NETWORK_CLASSES, check_constructor_args, network_class, target_name

RECORD_FORMAT = "prod9-network"


def unwrap(network: nn.Module) -> nn.Module:
    """Return the bare network inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(network, "module") and isinstance(network.module, nn.Module):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path`` then rename: a crash leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint


def network_record(network: nn.Module, preprocessing: dict | None = None, network_args: dict | None = None,
                   **extra: Any) -> dict:
    """Describe ``network`` as a record (see module docstring).

    Args:
        network: the (possibly DDP-wrapped) network; its class must expose ``init_args`` unless
            ``network_args`` is given.
        preprocessing: the preprocessing contract the network was trained with.
        network_args: constructor arguments, for classes without ``init_args`` (e.g. MONAI networks).
        extra: further plain fields (stage name, metric values, epoch).
    """
    net = unwrap(network)
    args = network_args if network_args is not None else getattr(net, "init_args", None)
    if args is None:
        raise ValueError(f"{type(net).__name__} has no init_args; pass network_args to describe it")
    target = target_name(type(net))
    if target not in NETWORK_CLASSES:  # a record no loader would rebuild: fail now, not at the next stage
        raise ValueError(f"{target} is not in prod9_components.networks.registry.NETWORK_CLASSES; register it")
    return {
        "format": RECORD_FORMAT,
        "version": 1,
        "network_target": target,
        "network_args": dict(args),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "preprocessing": dict(preprocessing or {}),
        **extra,
    }


def load_record(path: str | os.PathLike, stages: tuple[str, ...] | list[str] | None = None) -> dict:
    """Read a record written by :func:`network_record` (a best.ckpt, last.ckpt or stage export).

    Args:
        path: the file.
        stages: bundle stages the caller accepts (the record's ``stage``); None accepts any.

    Raises:
        FileNotFoundError / ValueError: with the path and what was expected.
    """
    return read_record(path, stages)[0]


def read_record(path: str | os.PathLike, stages: tuple[str, ...] | list[str] | None = None) -> tuple[dict, str]:
    """:func:`load_record` plus the hex SHA-256 of the very bytes the record was loaded from: ``(record, sha256)``.

    The file is read once; hashing it and loading it in two reads could pair one file's hash with another file's
    weights when the export is replaced in between (a stage 1 still writing its best export, a copy in progress).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    try:
        record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or a pickle that would run code
        raise ValueError(f"{path}: not a loadable prod9 checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path}: not a prod9 network file (expected a dict with format '{RECORD_FORMAT}')")
    if stages is not None and record.get("stage") not in stages:
        raise ValueError(f"{path}: a '{record.get('stage')}' checkpoint, expected one of {', '.join(stages)}")
    return record, hashlib.sha256(data).hexdigest()


def build_network(record: dict, expected_args: dict | None = None, source: str = "checkpoint") -> nn.Module:
    """Rebuild the network a record describes and load its weights.

    The class comes from :data:`~prod9_components.networks.registry.NETWORK_CLASSES` and its arguments are checked
    against its constructor before anything is called: a record is data, it cannot name other code.

    Args:
        record: from :func:`load_record`.
        expected_args: constructor arguments the caller relies on (e.g. FSQ ``levels``); any that differ raise.
        source: name of the file, for error messages.
    """
    cls = network_class(record.get("network_target"), source)
    check_constructor_args(cls, record.get("network_args"), source)
    check_network_args(record, expected_args or {}, source)
    try:
        network = cls(**record["network_args"])
    except (TypeError, ValueError) as error:  # values the constructor refuses (e.g. a downsampling of 3)
        raise ValueError(f"{source}: cannot build {cls.__name__} from its network_args "
                         f"({_first_line(error)})") from None
    try:
        network.load_state_dict(record.get("state_dict"))
    except (TypeError, RuntimeError, AttributeError) as error:  # missing keys, other shapes, not a dict
        raise ValueError(f"{source}: its state_dict does not fit the {cls.__name__} its network_args describe "
                         f"({_first_line(error)})") from None
    return network


def load_weights(network: nn.Module, path: str | os.PathLike, **parts: str | os.PathLike) -> nn.Module:
    """Load a model-zoo weights file (``models/model.pt``: a state dict, tensors only) into ``network``; returns it.

    What a standalone ``configs/inference.json`` of an exported bundle loads its networks with: the file is read with
    ``torch.load(weights_only=True)`` (a pickle that would run code is refused) and must fit ``network`` exactly.

    Args:
        network: the network its config built (``@network_def``).
        path: its own weights.
        parts: submodule name -> weights file of that submodule, merged in under its prefix before the strict load
            (a ControlNet's frozen ``base``: ``load_weights(net, "models/model.pt", base="models/transformer.pt")``).

    Raises:
        FileNotFoundError / ValueError: one line naming the file (missing, not a state dict, keys or shapes that
            do not fit).
    """
    state = {}
    for prefix, file in [("", path), *((f"{name}.", file) for name, file in parts.items())]:
        state.update({prefix + key: value for key, value in _read_state_dict(file).items()})
    try:
        network.load_state_dict(state)
    except (RuntimeError, ValueError) as error:
        files = ", ".join(map(str, [path, *parts.values()]))
        raise ValueError(f"{files}: the weights do not fit {type(network).__name__} ({_first_line(error)})") from None
    return network


def require_weights(*paths: str | os.PathLike) -> None:
    """Raise one FileNotFoundError naming every file of ``paths`` that is missing (a bundle's ``models/*.pt``).

    A standalone ``configs/inference.json`` calls it first, so a folder without its weights (the repository's template
    before an export's files are copied in) stops with one line naming them, not deep inside a loader.
    """
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: weights file{'s' if len(missing) > 1 else ''} not found; this "
                                "config runs with the models/*.pt files an `export` of a trained stage writes")


def _read_state_dict(path: str | os.PathLike) -> dict:
    """The state dict in ``path``, read with ``weights_only=True``; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or a pickle that would run code
        raise ValueError(f"{path}: not a loadable weights file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: not a state dict (expected a dict of parameter name -> tensor)")
    return state


def check_network_args(record: dict, expected_args: dict, source: str = "checkpoint") -> None:
    """Raise a one-line ValueError naming the first constructor argument whose value differs."""
    args = record["network_args"]
    for key, want in expected_args.items():
        have = args.get(key)
        if _plain(have) != _plain(want):
            raise ValueError(f"{source}: network argument '{key}' is {_plain(have)} but the config expects "
                             f"{_plain(want)}")


def load_network(path: str | os.PathLike, expected_args: dict | None = None,
                 stages: tuple[str, ...] | list[str] | None = None) -> tuple[nn.Module, dict]:
    """Load a record (of one of ``stages``, see :func:`load_record`) and rebuild its network.

    Returns ``(network, record)``.
    """
    record = load_record(path, stages)
    return build_network(record, expected_args, source=str(path)), record


def _first_line(error: BaseException) -> str:
    """The gist of an error in one line (torch's state-dict errors name the problem on their second line)."""
    lines = str(error).strip().splitlines()
    return " ".join(" ".join(lines[:2]).split()) if lines else type(error).__name__


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal; nested sequences normalised."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
