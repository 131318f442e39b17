import math
import re

import pytest
import torch
from torch import nn

from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream
from prod9_components.sampling.maskgit import MaskGiTSampler, categorical_noise, guided_logits, sample_categorical
from prod9_components.sampling.schedules import SCHEDULES, mask_ratio, sample_training_mask

K = 64
SHAPE = (2, 4, 4, 4)
N = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(seed: int = 0) -> TransformerDecoderSingleStream:
    torch.manual_seed(seed)
    return TransformerDecoderSingleStream(codebook_size=K, hidden_dim=32, num_layers=2, num_heads=4,
                                          max_context_length=3, max_grid_size=(6, 6, 6))


class Recorder(nn.Module):
    """Runs the real transformer and keeps every input it was called with."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = []

    mask_token_id = property(lambda self: self.net.mask_token_id)
    null_label = property(lambda self: self.net.null_label)

    def forward(self, target_tokens, target_label, source_tokens=None, source_labels=None, grid_origin=None,
                positions=None):
        self.calls.append({"tokens": target_tokens.clone(), "label": target_label.clone(),
                           "sources": None if source_tokens is None else source_tokens.clone(),
                           "origin": grid_origin, "positions": positions})
        return self.net(target_tokens, target_label, source_tokens, source_labels, grid_origin, positions)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_decrease_from_one_to_zero(schedule):
    assert mask_ratio(0.0, schedule) == 1.0
    assert mask_ratio(1.0, schedule) == pytest.approx(0.0, abs=1e-12)
    r = torch.linspace(0, 1, 101)
    ratio = mask_ratio(r, schedule)
    assert isinstance(ratio, torch.Tensor) and ratio.shape == r.shape
    assert torch.all(ratio[1:] < ratio[:-1])
    assert ratio[0] == 1 and ratio[-1].abs() < 1e-6


def test_schedule_values_and_unknown_name():
    assert mask_ratio(0.5, "cosine") == pytest.approx(math.cos(math.pi / 4))
    assert mask_ratio(0.25, "linear") == pytest.approx(0.75)
    assert mask_ratio(0.25, "sqrt") == pytest.approx(0.5)
    assert mask_ratio(0.5, "log") == pytest.approx(1 - math.log(1 + 0.5 * (math.e - 1)))
    with pytest.raises(ValueError, match="cosine, linear, sqrt, log"):
        mask_ratio(0.5, "exp")
    with pytest.raises(ValueError, match="valid schedules"):
        MaskGiTSampler(schedule="exp")


def test_sample_training_mask_counts_follow_the_schedule():
    shape = (64, 4, 4, 4)
    mask = sample_training_mask(shape, "cosine", generator=seeded(3))
    assert mask.dtype == torch.bool and mask.shape == shape
    r = torch.rand(64, generator=seeded(3))  # the same first draw
    expected = torch.ceil(mask_ratio(r) * N).long().clamp(min=1)
    assert torch.equal(mask.flatten(1).sum(1), expected)
    assert mask.flatten(1).sum(1).min() >= 1
    assert torch.equal(mask, sample_training_mask(shape, "cosine", generator=seeded(3)))
    assert not torch.equal(mask, sample_training_mask(shape, "cosine", generator=seeded(4)))
    # E[cos(pi r / 2)] = 2 / pi for r ~ U(0, 1); ceil adds < 1 token.
    big = sample_training_mask((2000, 2, 2, 4), "cosine", generator=seeded(0))
    assert big.float().mean().item() == pytest.approx(2 / math.pi + 0.5 / 16, abs=0.03)


def test_sampler_fixes_monotonically_and_leaves_no_mask():
    model = Recorder(make_net())
    sampler = MaskGiTSampler(num_steps=8, schedule="cosine")
    tokens = sampler.sample(model, SHAPE, torch.tensor([0, 2]), generator=seeded(0))
    assert tokens.shape == SHAPE and tokens.dtype == torch.int64
    assert tokens.min() >= 0 and tokens.max() < K  # no [MASK] left

    states = [c["tokens"] for c in model.calls] + [tokens]
    assert len(model.calls) == 8
    masked_per_call = [(s == K).flatten(1).sum(1).tolist() for s in states]
    expected = [N] + [math.floor(math.cos(math.pi / 2 * (t + 1) / 8) * N) for t in range(7)] + [0]
    assert masked_per_call == [[n, n] for n in expected]
    for before, after in zip(states[:-1], states[1:]):
        fixed = before != K
        assert torch.equal(after[fixed], before[fixed])  # a fixed token never changes
        assert ((before == K) & (after != K)).sum() > 0  # every step fixes something
    # The last step fixes everything that is left.
    assert (states[-2] == K).sum() > 0 and (states[-1] == K).sum() == 0


def test_more_steps_than_tokens_still_ends_fully_fixed():
    model = Recorder(make_net())
    tokens = MaskGiTSampler(num_steps=12, schedule="linear").sample(model, (1, 2, 2, 2), torch.tensor([1]),
                                                                    generator=seeded(0))
    assert (tokens == K).sum() == 0
    # At least one token per step: 8 tokens take at most 8 model calls.
    assert len(model.calls) == 8
    assert [(c["tokens"] == K).sum().item() for c in model.calls] == [8, 7, 6, 5, 4, 3, 2, 1]


def test_num_steps_zero_raises():
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got 0"):
        MaskGiTSampler(num_steps=0)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    net = make_net()
    sampler = MaskGiTSampler(num_steps=6)
    label = torch.tensor([0, 3])
    a = sampler.sample(net, SHAPE, label, generator=seeded(7))
    b = sampler.sample(net, SHAPE, label, generator=seeded(7))
    c = sampler.sample(net, SHAPE, label, generator=seeded(8))
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5
    # Without noise (greedy tokens, no Gumbel on the confidence) the seed does not matter.
    greedy = MaskGiTSampler(num_steps=6, temperature=0.0, sampling_temperature=0.0)
    assert torch.equal(greedy.sample(net, SHAPE, label, generator=seeded(1)),
                       greedy.sample(net, SHAPE, label, generator=seeded(2)))


def test_guidance_scale_one_is_exactly_the_conditional_model():
    """uncond + s * (cond - uncond), the diffusers / MONAI convention (as MAISI's): s = 1 is the conditional model,
    and the sampler then never runs the unconditional pass."""
    cond, uncond = torch.randn(2, K, 2, 2, 2), torch.randn(2, K, 2, 2, 2)
    assert guided_logits(cond, uncond, 1.0) is cond
    assert guided_logits(cond, None, 1.0) is cond
    assert guided_logits(None, uncond, 0.0) is uncond
    assert torch.allclose(guided_logits(cond, uncond, 2.5), uncond + 2.5 * (cond - uncond))
    # two roundings of the same mix differ near zero: compare with an absolute tolerance
    assert torch.allclose(guided_logits(cond, uncond, 0.5), 0.5 * (cond + uncond), atol=1e-6)
    assert MaskGiTSampler().guidance_scale == 1.0  # the default is no guidance

    net = make_net()
    label = torch.tensor([1, 2])
    sources, source_labels = torch.randint(0, K, (2, 1, 4, 4, 4)), torch.tensor([[0], [3]])
    model = Recorder(net)
    plain = MaskGiTSampler(num_steps=4, guidance_scale=1.0).sample(model, SHAPE, label, sources, source_labels,
                                                                  generator=seeded(0))
    assert len(model.calls) == 4  # one conditional call per step, no unconditional one
    assert all(torch.equal(c["label"], label) and c["sources"] is not None for c in model.calls)

    class NullIsGarbage(Recorder):  # proves guidance 1 never looks at the unconditional logits
        def forward(self, target_tokens, target_label, source_tokens=None, source_labels=None, grid_origin=None,
                    positions=None):
            out = super().forward(target_tokens, target_label, source_tokens, source_labels, grid_origin, positions)
            return torch.randn_like(out) * 100 if (target_label == self.null_label).all() else out

    same = MaskGiTSampler(num_steps=4).sample(NullIsGarbage(net), SHAPE, label, sources, source_labels,
                                              generator=seeded(0))
    assert torch.equal(same, plain)

    model = Recorder(net)
    guided = MaskGiTSampler(num_steps=4, guidance_scale=3.0).sample(model, SHAPE, label, sources, source_labels,
                                                                    generator=seeded(0))
    null_calls = [c for c in model.calls if (c["label"] == net.null_label).all()]
    assert len(model.calls) == 8 and len(null_calls) == 4 and all(c["sources"] is None for c in null_calls)
    assert not torch.equal(guided, plain)

    # s = 0 is exactly the unconditional model: the null label and no sources, the conditional pass skipped.
    model = Recorder(net)
    unconditional = MaskGiTSampler(num_steps=4, guidance_scale=0.0).sample(model, SHAPE, label, sources,
                                                                           source_labels, generator=seeded(0))
    assert len(model.calls) == 4 and all((c["label"] == net.null_label).all() for c in model.calls)
    null_only = MaskGiTSampler(num_steps=4).sample(net, SHAPE, torch.full_like(label, net.null_label),
                                                   generator=seeded(0))
    assert torch.equal(unconditional, null_only)

    # A crop's place in the grid reaches both the conditional and the unconditional call.
    origin = torch.tensor([[1, 0, 2], [0, 2, 1]])
    model = Recorder(net)
    MaskGiTSampler(num_steps=2, guidance_scale=2.0).sample(model, SHAPE, label, sources, source_labels,
                                                           generator=seeded(0), grid_origin=origin)
    assert len(model.calls) == 4 and all(c["origin"] is origin for c in model.calls)
    message = r"guidance_scale must be a finite number >= 0 \(1 = no guidance\), got "
    for bad in (-1, float("nan"), "2"):
        with pytest.raises(ValueError, match=message + re.escape(repr(bad))):
            MaskGiTSampler(guidance_scale=bad)


def test_inpainting_keeps_fixed_tokens_and_restores_training_mode():
    net = make_net().train()
    model = Recorder(net)
    initial = torch.randint(0, K, SHAPE, generator=seeded(5))
    keep = torch.zeros(SHAPE, dtype=torch.bool)
    keep[:, :2] = True  # keep the first half of each volume
    tokens = MaskGiTSampler(num_steps=5).sample(model, SHAPE, torch.tensor([0, 1]), generator=seeded(0),
                                                initial_tokens=initial, fixed_mask=keep)
    assert torch.equal(tokens[keep], initial[keep])
    assert (tokens == K).sum() == 0
    for call in model.calls:
        assert torch.equal(call["tokens"][keep], initial[keep])
        assert torch.equal(call["positions"], call["tokens"] == K)  # logits asked for the masked positions only
    assert (model.calls[0]["tokens"] == K).flatten(1).sum(1).tolist() == [32, 32]
    assert net.training  # restored after sampling in eval mode
    with pytest.raises(ValueError, match="fixed_mask needs initial_tokens"):
        MaskGiTSampler().sample(net, SHAPE, torch.tensor([0, 1]), fixed_mask=keep)


def test_sample_categorical_draws_softmax_frequencies_and_their_log_probabilities():
    probs = torch.tensor([0.05, 0.15, 0.0, 0.3, 0.5])
    logits = probs.clamp_min(1e-30).log().expand(20000, 5) + 3.0  # a shift changes nothing
    draws, log_probs = sample_categorical(logits, generator=seeded(0))  # 5 codes: 2 blocks of 3, one padded
    assert draws.shape == log_probs.shape == (20000,) and draws.dtype == torch.int64
    frequencies = torch.bincount(draws, minlength=5).double() / len(draws)
    assert torch.allclose(frequencies, probs.double(), atol=0.012)  # 4 standard errors at p = 0.5
    assert int((draws == 2).sum()) == 0  # a zero-probability code is never drawn
    assert torch.allclose(log_probs, torch.log_softmax(logits, -1).gather(-1, draws[:, None])[:, 0])
    again, _ = sample_categorical(logits, generator=seeded(0))
    assert torch.equal(draws, again)


def test_sample_categorical_keeps_its_draws_where_the_logits_change_little():
    """One noise, logits perturbed by total variation ~0.02 over 15,360 codes: few draws change (Gumbel-max's
    coupling; inverse transform sampling changed 64% of them), and the draws are not all one code."""
    generator = seeded(0)
    logits = 2.0 * torch.randn(2000, 15360, generator=generator)
    perturbed = logits + 0.05 * torch.randn(logits.shape, generator=generator)
    total_variation = 0.5 * (logits.softmax(-1) - perturbed.softmax(-1)).abs().sum(-1).mean()
    noise = categorical_noise((2000,), 15360, generator)
    draws, perturbed_draws = sample_categorical(logits, noise)[0], sample_categorical(perturbed, noise)[0]
    assert 0.01 < total_variation < 0.03
    assert (draws != perturbed_draws).double().mean() < 3 * total_variation
    assert len(draws.unique()) > 1000


class FixedLogits(nn.Module):
    """The same logits (K,) at every position: each sampled token is one draw from softmax(logits / tau)."""

    mask_token_id, null_label = 4, 1

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("fixed", logits)

    def forward(self, target_tokens, target_label, *args, positions=None, **kwargs):
        if positions is not None:  # (M, K): the rows the sampler asks for
            return self.fixed[None].expand(int(positions.sum()), -1)
        b, d, h, w = target_tokens.shape
        return self.fixed[None, :, None, None, None].expand(b, -1, d, h, w)


@pytest.mark.parametrize("sampling_temperature", [1.0, 0.5])
def test_one_step_tokens_follow_the_tempered_softmax(sampling_temperature):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    sampler = MaskGiTSampler(num_steps=1, sampling_temperature=sampling_temperature)
    tokens = sampler.sample(FixedLogits(probs.log()), (4, 16, 16, 16), torch.zeros(4, dtype=torch.long),
                            generator=seeded(1))
    expected = probs ** (1 / sampling_temperature)
    frequencies = torch.bincount(tokens.flatten(), minlength=4).double() / tokens.numel()
    assert torch.allclose(frequencies, (expected / expected.sum()).double(), atol=0.015)


def test_a_position_draws_the_same_token_whichever_others_are_still_masked():
    """Two runs from one seed that differ only in a region (here: tokens kept there) draw every other position alike
    (a ControlNet's change outside its mask is then the model's, not the sampler's); one step fixes every position."""
    probs = torch.full((8,), 1 / 8)
    sampler = MaskGiTSampler(num_steps=1)
    keep = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    keep[:, :4] = True  # half the grid kept: the other half's draws must not move
    free = sampler.sample(FixedLogits(probs.log()), keep.shape, torch.zeros(1, dtype=torch.long), generator=seeded(3))
    kept = sampler.sample(FixedLogits(probs.log()), keep.shape, torch.zeros(1, dtype=torch.long), generator=seeded(3),
                          initial_tokens=torch.zeros(keep.shape, dtype=torch.long), fixed_mask=keep)
    assert torch.equal(kept[keep], torch.zeros(256, dtype=torch.long))
    assert torch.equal(kept[~keep], free[~keep])
    assert len(free[~keep].unique()) == 8  # real draws (uniform over 8 codes), not a constant
