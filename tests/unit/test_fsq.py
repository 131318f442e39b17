import math

import pytest
import torch

from prod9_components.networks.fsq import FiniteScalarQuantizer, code_digits


def test_codebook_size_and_channels():
    fsq = FiniteScalarQuantizer([8, 8, 8, 6, 5])
    assert fsq.codebook_size == 15360
    assert fsq.num_channels == 5
    assert FiniteScalarQuantizer([3, 4]).codebook_size == 12


def test_every_index_round_trips():
    fsq = FiniteScalarQuantizer([8, 8, 8, 6, 5])
    indices = torch.arange(fsq.codebook_size).view(1, 15, 8, 128)
    codes = fsq.embed(indices)
    assert codes.shape == (1, 5, 15, 8, 128) and codes.dtype == torch.float32
    assert torch.equal(fsq.quantize(codes), indices)
    # Distinct indices are distinct codes: the codebook is the full product grid.
    flat = codes.permute(0, 2, 3, 4, 1).reshape(-1, 5)
    assert torch.unique(flat, dim=0).shape[0] == fsq.codebook_size


@pytest.mark.parametrize("levels", [[8, 8, 8, 6, 5], [7, 5, 5, 5], [2, 3]])
def test_forward_lands_on_grid_and_round_trips(levels):
    torch.manual_seed(0)
    fsq = FiniteScalarQuantizer(levels)
    z = torch.randn(2, len(levels), 6, 5, 4) * 4  # large values exercise the saturated ends
    codes = fsq(z)
    assert codes.shape == z.shape
    assert torch.equal(fsq.embed(fsq.quantize(codes)), codes)
    for c, level in enumerate(levels):
        half = level // 2
        grid = torch.arange(-half, level - half, dtype=torch.float32) / half
        values = torch.unique(codes[:, c])
        assert torch.isin(values, grid).all()
        assert values.min() >= -1 and values.max() <= 1
        # Saturated inputs reach both ends of the grid: all `level` values are reachable.
        assert set(torch.unique(fsq(torch.full((1, len(levels), 1, 1, 1), 1e4))[:, c]).tolist()) == {grid[-1].item()}
        assert set(torch.unique(fsq(torch.full((1, len(levels), 1, 1, 1), -1e4))[:, c]).tolist()) == {-1.0}


def test_zero_maps_to_zero_and_all_levels_reached():
    fsq = FiniteScalarQuantizer([8, 6, 5])
    assert torch.equal(fsq(torch.zeros(1, 3, 2, 2, 2)), torch.zeros(1, 3, 2, 2, 2))
    sweep = torch.linspace(-6, 6, 2001).view(1, 1, -1, 1, 1).expand(1, 3, -1, 1, 1)
    codes = fsq(sweep)
    assert [torch.unique(codes[:, c]).numel() for c in range(3)] == [8, 6, 5]


def test_indices_range_and_digit_order():
    fsq = FiniteScalarQuantizer([4, 3])
    # Channel 0 is the fastest-varying digit: index = d0 + 4 * d1.
    codes = torch.tensor([[-1.0, -1.0], [-0.5, -1.0], [-1.0, 0.0], [0.5, 1.0]]).T.reshape(1, 2, 4, 1, 1)
    assert fsq.quantize(codes).flatten().tolist() == [0, 1, 4, 11]
    idx = fsq.quantize(fsq(torch.randn(3, 2, 4, 4, 4) * 3))
    assert idx.dtype == torch.int64 and idx.min() >= 0 and idx.max() < 12


def test_straight_through_gradient():
    fsq = FiniteScalarQuantizer([8, 8, 8, 6, 5])
    z = torch.randn(1, 5, 3, 3, 3, requires_grad=True)
    fsq(z).sum().backward()
    # d codes / d z = d bound / d z / half_width: tanh' * half_l / h, positive everywhere.
    assert z.grad is not None and (z.grad > 0).all()
    z0 = torch.zeros(1, 5, 1, 1, 1, requires_grad=True)
    fsq(z0).sum().backward()
    levels = torch.tensor([8.0, 8, 8, 6, 5])
    half_l = (levels - 1) * (1 - fsq.eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    expected = (1 - (offset / half_l) ** 2) * half_l / torch.floor(levels / 2)
    torch.testing.assert_close(z0.grad.flatten(), expected)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        FiniteScalarQuantizer([8, 1])
    with pytest.raises(ValueError, match="expected"):
        FiniteScalarQuantizer([8, 5])(torch.zeros(1, 3, 2, 2, 2))
    assert not FiniteScalarQuantizer([8, 5]).state_dict()  # nothing learned, nothing stored
    assert math.isclose(FiniteScalarQuantizer([5]).embed(torch.tensor([[4]])).item(), 1.0)


@pytest.mark.parametrize("levels", [[4, 3], [8, 6, 5]])
def test_code_digits_are_the_quantizer_digits(levels):
    """code_digits row k: one 1 per channel, at the digit whose FSQ value embed(k) has (digit order = value order)."""
    fsq = FiniteScalarQuantizer(levels)
    ids = torch.arange(fsq.codebook_size)
    digits = code_digits(levels)
    assert digits.shape == (fsq.codebook_size, sum(levels)) and (digits.sum(1) == len(levels)).all()
    values = fsq.embed(ids.reshape(1, -1, 1, 1))[0, :, :, 0, 0]  # (C, K)
    for c, level in enumerate(levels):
        digit = digits[:, sum(levels[:c]):sum(levels[:c + 1])].argmax(1)
        grid = values[c].unique()  # the channel's values, ascending
        assert len(grid) == level and torch.equal(values[c], grid[digit])
