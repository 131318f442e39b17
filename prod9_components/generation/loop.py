"""The one generation loop of both families: per item a seeded sample function makes a volume, a saver writes it.

Item ``i`` draws all its randomness from a generator seeded with ``seed + i``, so a sample is reproducible and does not
depend on how many are made (the third of ten is the third of three).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from tqdm import tqdm

from prod9_components.generation.saver import GeneratedVolume, VolumeSaver

__all__ = ["generate", "sample_items", "seeded"]

T = TypeVar("T")


def sample_items(num_samples: int) -> range:
    """The items of ``num_samples`` samples that no input conditions (their index), refused unless >= 1."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return range(int(num_samples))


def seeded(sample: Callable[[object, torch.Generator], T], items: Sequence, seed: int = 0) -> Iterator[T]:
    """Yield ``sample(item, generator)`` for each of ``items``, item ``i`` with a CPU generator seeded ``seed + i``.
    ``seed`` must be an integer with ``seed + len(items) - 1`` in torch's seed range ``[0, 2**64)``; else a one-line
    ValueError before anything is sampled (torch would say "Overflow when unpacking long long")."""
    integer = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
    if not (integer and 0 <= seed and seed + len(items) - 1 < 2**64):
        raise ValueError(f"seed must be an integer from 0 to 2**64 - {len(items)} for {len(items)} sample(s), "
                         f"got {seed!r}")
    for index, item in enumerate(items):
        yield sample(item, torch.Generator().manual_seed(int(seed) + index))


def generate(sample: Callable[[object, torch.Generator], GeneratedVolume], items: Sequence, saver: VolumeSaver,
             seed: int = 0, desc: str = "sampling") -> list[str]:
    """Sample every item (:func:`seeded`) and write volume ``i`` to the saver's ``i``-th file as soon as it is made.

    Args:
        sample: ``sample(item, generator) -> GeneratedVolume``: a family's sample -> decode for one item.
        items: one per output volume (condition dicts, or :func:`sample_items` for unconditioned samples).
        saver: the checked output files, one per item.
        seed: the seed of item 0.
        desc: the progress bar's label.

    Returns:
        the paths written, in order (each volume followed by its mask, if any).
    """
    if len(items) != len(saver):
        raise ValueError(f"{len(items)} items to sample but {len(saver)} output files")
    written = []
    volumes = seeded(sample, items, seed)
    for index, volume in enumerate(tqdm(volumes, total=len(items), desc=desc, unit="volume")):
        written += saver.write(index, volume)
    return written
