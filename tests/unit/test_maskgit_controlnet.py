"""MaskGiT ControlNet: identity at initialisation, frozen base, trained control path, control-type switches."""

import pytest
import torch

from prod9_components.losses.masked_token import masked_token_loss
from prod9_components.networks.maskgit_controlnet import MaskGiTControlNet
from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream

K, GRID, F = 32, (3, 4, 2), 2  # token grid; image grid = GRID * F


def make_base() -> TransformerDecoderSingleStream:
    torch.manual_seed(0)
    return TransformerDecoderSingleStream(K, hidden_dim=32, num_layers=2, num_heads=4, max_grid_size=(8, 8, 8),
                                          dropout=0.1)


def make_control(control_type: str = "mask+label", randomise_projections: bool = False) -> MaskGiTControlNet:
    net = MaskGiTControlNet.from_base(make_base(), control_type=control_type, downsample_factor=F,
                                      encoder_channels=8)
    if randomise_projections:  # as after training: the branch now reaches the output
        for projection in net.zero_projections:
            torch.nn.init.normal_(projection.weight, std=0.2)
    return net.eval()


def inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, K, (batch, *GRID), generator=g)
    tokens[:, 0] = K  # some masked positions
    mask = torch.randint(0, 4, (batch, *(s * F for s in GRID)), generator=g)
    return {"target_tokens": tokens, "target_label": torch.tensor([0, 2])[:batch], "control_mask": mask}


@pytest.mark.parametrize("control_type", ["mask", "label", "mask+label"])
def test_output_equals_base_at_initialisation(control_type):
    net, x = make_control(control_type), inputs()
    sources, source_labels = torch.randint(0, K, (2, 1, *GRID)), torch.tensor([[1], [3]])
    with torch.no_grad():
        base = net.base(x["target_tokens"], x["target_label"], sources, source_labels)
        controlled = net(x["target_tokens"], x["target_label"], sources, source_labels,
                         control_mask=x["control_mask"])
    assert torch.equal(controlled, base)
    # The branch starts as a copy of the base's first blocks.
    assert len(net.control_blocks) == 1
    for name, value in net.control_blocks[0].state_dict().items():
        assert torch.equal(value, net.base.blocks[0].state_dict()[name])


def test_conditioning_scale_multiplies_the_branch_zero_is_the_base():
    """``conditioning_scale`` scales what the branch adds to the base: 0 gives the base's logits, 1 (the default) the
    trained model's, and the logits' departure from the base grows with the scale."""
    net, x = make_control("mask+label", randomise_projections=True), inputs()
    with torch.no_grad():
        base = net.base(x["target_tokens"], x["target_label"])
        logits = {s: net(**x, conditioning_scale=s) for s in (0.0, 1.0, 3.0)}
        assert torch.equal(net(**x), logits[1.0])
    departure = {s: float((v - base).abs().mean()) for s, v in logits.items()}
    assert departure[0.0] == 0.0 and 1e-3 < departure[1.0] < departure[3.0]


def test_base_is_frozen_and_the_mask_encoder_learns(one_thread):
    net = make_control("mask+label").train()
    assert not net.base.training  # no dropout in the frozen base
    before = {k: v.clone() for k, v in net.base.state_dict().items()}
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    assert not any(p.requires_grad for p in net.base.parameters())
    x, target = inputs(), torch.randint(0, K, (2, *GRID))
    masked = x["target_tokens"] == K
    encoder_grads = []
    for _ in range(3):
        loss = masked_token_loss(net(x["target_tokens"], x["target_label"], control_mask=x["control_mask"]),
                                 target, masked)["loss"]
        optimizer.zero_grad()
        loss.backward()
        encoder_grads.append(sum(p.grad.abs().sum() for p in net.mask_encoder.parameters()).item())
        assert net.zero_projections[0].weight.grad.abs().sum() > 0
        optimizer.step()
    # Step 0: the zero projections block the gradient upstream; once they moved, the encoder trains.
    assert encoder_grads[0] == 0 and encoder_grads[1] > 0 and encoder_grads[2] > 0
    for name, value in net.base.state_dict().items():
        assert torch.equal(value, before[name]), name  # bit-identical


def test_control_type_picks_the_inputs_used():
    x = inputs()
    other_mask = torch.zeros_like(x["control_mask"])
    other_label = torch.tensor([3, 1])
    with torch.no_grad():
        for control_type, uses_mask, uses_label in (("mask", True, False), ("label", False, True),
                                                    ("mask+label", True, True)):
            net = make_control(control_type, randomise_projections=True)
            ref = net(x["target_tokens"], x["target_label"], control_mask=x["control_mask"])
            new_mask = net(x["target_tokens"], x["target_label"], control_mask=other_mask)
            new_label = net(x["target_tokens"], x["target_label"], control_mask=x["control_mask"],
                            control_label=other_label)
            assert ((new_mask - ref).abs().max() > 1e-4) == uses_mask, control_type
            assert ((new_label - ref).abs().max() > 1e-4) == uses_label, control_type
    label_only = make_control("label", randomise_projections=True)
    assert label_only.mask_encoder is None
    label_only(x["target_tokens"], x["target_label"])  # no mask needed


def test_bad_control_inputs():
    net, x = make_control("mask"), inputs()
    with pytest.raises(ValueError, match="needs control_mask"):
        net(x["target_tokens"], x["target_label"])
    with pytest.raises(ValueError, match=r"control_mask must be \(2, 6, 8, 4\)"):
        net(x["target_tokens"], x["target_label"], control_mask=x["control_mask"][:, :4])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        net(x["target_tokens"], x["target_label"], control_mask=x["control_mask"] + 4)
    with pytest.raises(ValueError, match=r"unknown control type 'seg': join mask, image, label with '\+' \(the MaskGiT "
                                         r"ControlNet supports mask, label, mask\+label\)"):
        MaskGiTControlNet(make_base().init_args, control_type="seg")
    with pytest.raises(ValueError, match="power of two"):
        MaskGiTControlNet(make_base().init_args, downsample_factor=3)
    for width in (0, -3, 2.5, "16", True):  # a careless --encoder-channels or a record's value: one line naming it
        with pytest.raises(ValueError, match=rf"encoder_channels must be a whole number >= 1, got {width!r}"):
            MaskGiTControlNet(make_base().init_args, encoder_channels=width)


def test_a_mask_encoded_once_gives_the_logits_of_the_mask_itself():
    """A sampler's steps share one mask: ``encode_mask`` once, then ``mask_embedding`` in every call, is the same
    model (and with ``positions``, the same logits for those rows); a wrong shape or a label-only net is refused."""
    net, x = make_control("mask+label", randomise_projections=True), inputs()
    positions = x["target_tokens"] == K
    with torch.no_grad():
        encoded = net.encode_mask(x["control_mask"], GRID)
        assert encoded.shape == (2, GRID[0] * GRID[1] * GRID[2], 32)
        for scale in (1.0, 3.0):
            direct = net(x["target_tokens"], x["target_label"], control_mask=x["control_mask"],
                         conditioning_scale=scale)
            assert torch.equal(net(x["target_tokens"], x["target_label"], mask_embedding=encoded,
                                   conditioning_scale=scale), direct)
            rows = net(x["target_tokens"], x["target_label"], mask_embedding=encoded, positions=positions,
                       conditioning_scale=scale)  # (M, K): the masked rows, row-major
            assert torch.allclose(rows, direct.movedim(1, -1)[positions], atol=1e-5)
        with pytest.raises(ValueError, match=r"mask_embedding must have shape \(2, 24, 32\), got \(2, 23, 32\)"):
            net(x["target_tokens"], x["target_label"], mask_embedding=encoded[:, 1:])
    with pytest.raises(ValueError, match="control_type 'label' takes no mask"):
        make_control("label").encode_mask(x["control_mask"], GRID)


def test_rebuilds_from_init_args():
    net = make_control("mask+label", randomise_projections=True)
    rebuilt = MaskGiTControlNet(**net.init_args).eval()
    rebuilt.load_state_dict(net.state_dict())
    x = inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(x["target_tokens"], x["target_label"], control_mask=x["control_mask"]),
                           net(x["target_tokens"], x["target_label"], control_mask=x["control_mask"]))


def test_masked_rows_give_the_full_grid_loss_and_gradients(monkeypatch):
    """forward(..., positions=mask) -> (M, K) and the trainer's step on it: the loss, token accuracy and every
    trainable gradient of the full-grid logits restricted to the masked positions (control branch in train mode,
    its dropout drawn alike)."""
    from prod9_components.losses.masked_token import token_loss
    from tests.unit.test_maskgit_transformer import full_grid_loss, loss_and_grads, trainer_step_against_full_grid

    net, x = make_control("mask+label", randomise_projections=True).train(), inputs()
    mask = torch.rand(2, *GRID, generator=torch.Generator().manual_seed(1)) < 0.5
    target = torch.randint(0, K, (2, *GRID), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # about half of the masked positions predicted right: accuracy neither 0 nor 1
        guess = net.eval()(target.masked_fill(mask, K), x["target_label"], control_mask=x["control_mask"]).argmax(1)
    target = torch.where(mask & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) < 0.5),
                         guess, target)
    net.train()
    args = (target.masked_fill(mask, K), x["target_label"])

    old = loss_and_grads(net, lambda: full_grid_loss(net(*args, control_mask=x["control_mask"]), target, mask))

    def rows_loss():
        out = token_loss(net(*args, control_mask=x["control_mask"], positions=mask), target[mask])
        return out["loss"], out["token_accuracy"]

    new = loss_and_grads(net, rows_loss)
    assert 0 < old[1] < 1 and new[1] == old[1]
    torch.testing.assert_close(new[0], old[0], atol=1e-6, rtol=0)
    assert new[2].keys() == old[2].keys() and "zero_projections.0.weight" in new[2]
    assert not any(name.startswith("base.") for name in new[2])  # the base stays frozen
    for name, grad in new[2].items():
        torch.testing.assert_close(grad, old[2][name], atol=1e-6, rtol=1e-5, msg=name)

    # The trainer (control_mask_key="seg"), as maskgit_stage3_controlnet builds it.
    g = torch.Generator().manual_seed(4)
    batch = {"tokens": torch.randint(0, K, (2, 4, *GRID), generator=g), "grid_origin": torch.zeros(2, 3).long(),
             "seg": torch.randint(0, 4, (2, 1, *(s * F for s in GRID)), generator=g)}
    batch["seg"][:, :, 4:] = 0  # tumour in some token cells only, so the weights vary
    losses = []
    for tumour_weight in (1.0, 20.0):  # and with the tumour's tokens weighted 20x in the mean
        output, grads, loss, accuracy, expected = trainer_step_against_full_grid(net, batch, monkeypatch, "seg", GRID,
                                                                                 tumour_weight)
        torch.testing.assert_close(output["loss"], loss, atol=1e-6, rtol=0)
        assert output["token_accuracy"] == accuracy
        assert grads.keys() == expected.keys() and "mask_encoder.net.0.weight" in grads
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
        losses.append(float(loss))
    assert abs(losses[0] - losses[1]) > 1e-3
    with pytest.raises(ValueError, match="tumour_weight needs a mask condition"):
        trainer_step_against_full_grid(net, batch, monkeypatch, None, GRID, 5.0)
