"""The one validation seed scheme: a batch's random stream depends on the run's seed and its item's place in the
whole split, not on the rank that validates it."""

from __future__ import annotations

import torch

from prod9_components.data.sharding import validation_generator


def _draw(seed: int, iteration: int, batchdata: dict) -> torch.Tensor:
    return torch.rand(5, generator=validation_generator(seed, iteration, batchdata))


def test_an_item_draws_the_same_numbers_on_any_number_of_ranks():
    # Item 3 of the split: the third iteration on one rank, the second of rank 0's shard (items 0, 2, 4) on two ranks.
    alone = _draw(7, 3, {})
    sharded = _draw(7, 2, {"val_index": torch.tensor([2])})
    assert torch.equal(alone, sharded)
    assert not torch.equal(alone, _draw(7, 4, {}))  # another item
    assert not torch.equal(alone, _draw(8, 2, {}))  # the next seed is not the neighbouring item's stream
    assert not torch.equal(alone, _draw(8, 3, {}))
