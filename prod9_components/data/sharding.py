"""Validation sharded across distributed ranks, with numbers that do not depend on the number of ranks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["item_number", "validation_generator", "validation_shard"]


def validation_shard(items: Sequence[Mapping]) -> list[dict]:
    """This rank's share of the validation items, each stamped with ``val_index`` (its position in ``items``).

    Items are dealt round-robin (rank r gets r, r + N, r + 2N, ...), so the shards are disjoint and cover the split;
    MONAI's cumulative metrics gather the per-item values and ignite's averages reduce across ranks, so every rank
    ends with the metrics of the whole split. With fewer items than ranks every rank validates everything: a rank
    without items would leave the others waiting in the metric gather. Not distributed: ``items`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [dict(item) for item in items]
    rank, world = dist.get_rank(), dist.get_world_size()
    positions = range(rank, len(items), world) if len(items) >= world else range(len(items))
    return [{**items[i], "val_index": i} for i in positions]


def item_number(iteration: int, batchdata: Mapping) -> int:
    """1-based position of a validation batch's first item in the whole split, for per-item noise seeds: its
    ``val_index`` + 1 on a sharded split, else the evaluator's iteration (batch size 1, the evaluators' setting)."""
    if "val_index" in batchdata:
        return int(batchdata["val_index"].reshape(-1)[0]) + 1
    return int(iteration)


def validation_generator(seed: int, iteration: int, batchdata: Mapping) -> torch.Generator:
    """The random stream of one validation batch (its masks, noise, timesteps and samples, drawn in turn): seeded from
    the run's ``seed`` and the :func:`item_number` of its first item, so every validation draws the same numbers and
    they do not depend on the number of ranks. The one seed scheme of every evaluator; the factor keeps the streams of
    neighbouring seeds apart (seed s, item i + 1 is not seed s + 1, item i)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + item_number(iteration, batchdata))
