"""The network classes a checkpoint record may name, and the check of a record's constructor arguments.

A record is data (see :mod:`prod9_components.networks.export`): its ``network_target`` is looked up in this explicit
table, never imported by name, so a file cannot make the loader call any other function or class (a record naming
``monai.utils.module.instantiate`` with ``{"__path": "subprocess.run", ...}`` would otherwise run a command).
Its ``network_args`` must be plain values and keywords the class's constructor spells out.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from prod9_components.networks.autoencoder_fsq import AutoencoderFSQ
from prod9_components.networks.maisi_controlnet import MaisiControlNet
from prod9_components.networks.maisi_diffusion import MaisiDiffusionUNet
from prod9_components.networks.maisi_vae import MaisiVAE
from prod9_components.networks.maskgit_controlnet import MaskGiTControlNet
from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream


def target_name(cls: type) -> str:
    """The ``network_target`` a record of ``cls`` carries: its full dotted name."""
    return f"{cls.__module__}.{cls.__qualname__}"


# Every class a stage writes into best.ckpt / its export (stage 1, 2 and 3 of both families).
NETWORK_CLASSES: dict[str, type[nn.Module]] = {target_name(cls): cls for cls in (
    AutoencoderFSQ, MaisiVAE, TransformerDecoderSingleStream, MaskGiTControlNet, MaisiDiffusionUNet, MaisiControlNet)}

# Constructor arguments that are themselves the arguments of another registered class (a ControlNet builds its base).
NESTED_ARGS: dict[type, dict[str, type[nn.Module]]] = {
    MaskGiTControlNet: {"base_args": TransformerDecoderSingleStream},
    MaisiControlNet: {"base_args": MaisiDiffusionUNet},
}

_PLAIN = (type(None), bool, int, float, str)


def network_class(target: Any, source: str = "checkpoint") -> type[nn.Module]:
    """The registered class named ``target``; a one-line ValueError naming ``source`` for anything else."""
    cls = NETWORK_CLASSES.get(target) if isinstance(target, str) else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        known = ", ".join(c.__name__ for c in NETWORK_CLASSES.values())
        raise ValueError(f"{source}: refusing to build network_target {target!r}: not one of the project's network "
                         f"classes ({known})")
    return cls


def check_constructor_args(cls: type[nn.Module], args: Any, source: str = "checkpoint",
                           field: str = "network_args") -> None:
    """Raise a one-line ValueError unless ``args`` are plain values for keywords ``cls.__init__`` names.

    A ``**kwargs`` constructor accepts no extra keyword from a file: only the parameters it spells out (so a key
    such as ``__path`` never reaches code that would interpret it). Nested argument dicts (a ControlNet's
    ``base_args``) are checked against their own class.
    """
    if not isinstance(args, Mapping):
        raise ValueError(f"{source}: {field} is a {type(args).__name__}, expected a dict of constructor arguments")
    params = inspect.signature(cls).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in args.items():
        if key not in named:
            raise ValueError(f"{source}: {field} has {key!r}, which {cls.__name__} does not take "
                             f"(expected some of: {', '.join(sorted(named))})")
        nested = NESTED_ARGS.get(cls, {}).get(key)
        if nested is not None:
            check_constructor_args(nested, value, source, f"{field}.{key}")
        elif not _is_plain(value):
            raise ValueError(f"{source}: {field}.{key} is a {type(value).__name__}, expected numbers, strings, "
                             f"booleans or lists of them")
    missing = [n for n in named if params[n].default is inspect.Parameter.empty and n not in args]
    if missing:
        raise ValueError(f"{source}: {field} lacks {', '.join(missing)}, which {cls.__name__} requires")


def _is_plain(value: Any) -> bool:
    """None, bool, int, float, str, or lists/tuples of them (what ``init_args`` hold)."""
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)
