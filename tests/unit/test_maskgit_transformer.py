import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prod9_components.losses.masked_token import masked_token_loss
from prod9_components.networks.maskgit_transformer import TransformerDecoderSingleStream
from prod9_components.networks.modality_processor import ModalityProcessor

K = 64
GRID = (4, 5, 6)  # non-cubic on purpose: a transposed axis would show


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(seed: int = 0, **kwargs) -> TransformerDecoderSingleStream:
    torch.manual_seed(seed)
    args = dict(codebook_size=K, hidden_dim=32, num_layers=2, num_heads=4, max_context_length=3,
                max_grid_size=(8, 8, 8))
    args.update(kwargs)
    return TransformerDecoderSingleStream(**args).eval()


def rand_tokens(*shape, seed=0, high=K):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def block_input(net, *args):
    """The sequence fed to the first transformer block (all embeddings summed)."""
    seen = {}

    def hook(module, inputs):
        seen["x"] = inputs[0].detach().clone()

    handle = net.blocks[0].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            net(*args)
    finally:
        handle.remove()
    return seen["x"]


def test_shapes_properties_and_init_args_round_trip():
    net = make_net()
    assert net.mask_token_id == K and net.codebook_size == K and net.null_label == 4
    assert net.token_embedding.weight.shape == (K + 1, 32)
    assert net.context.modality_embedding.weight.shape == (5, 32)
    target = rand_tokens(2, *GRID)
    target[0, :2] = net.mask_token_id
    label = torch.tensor([0, 3])
    sources, source_labels = rand_tokens(2, 2, *GRID, seed=1), torch.tensor([[1, 2], [2, -1]])
    logits = net(target, label, sources, source_labels)
    assert logits.shape == (2, K, *GRID)

    rebuilt = TransformerDecoderSingleStream(**json.loads(json.dumps(net.init_args))).eval()
    rebuilt.load_state_dict(net.state_dict())
    assert rebuilt.init_args == net.init_args
    assert torch.equal(rebuilt(target, label, sources, source_labels), logits)
    # Init: small normal weights, zero biases.
    assert abs(net.head.weight.std().item() - 0.02) < 0.005 and net.head.bias.abs().max() == 0


def test_mask_token_uses_learned_mask_embedding_and_3d_positions():
    net = make_net()
    target = rand_tokens(1, *GRID)
    target[0, 1, 2, 3] = K
    emb = net.embed_target(target, torch.tensor([2]))  # (1, N, hidden)
    z_table, y_table, x_table = (t.weight for t in net.axis_positions)
    modality = net.context.modality_embedding.weight[2]
    flat = (1 * GRID[1] + 2) * GRID[2] + 3
    expected = net.token_embedding.weight[K] + z_table[1] + y_table[2] + x_table[3] + modality
    assert torch.allclose(emb[0, flat], expected, atol=1e-6)
    # Every position is (token row) + (z, y, x) tables: check all of them against a direct computation.
    zz, yy, xx = torch.meshgrid(*(torch.arange(s) for s in GRID), indexing="ij")
    direct = (net.token_embedding.weight[target[0].flatten()] + z_table[zz.flatten()] + y_table[yy.flatten()]
              + x_table[xx.flatten()] + modality)
    assert torch.allclose(emb[0], direct, atol=1e-6)


def test_target_positions_do_not_move_when_context_grows():
    net = make_net()
    target, label = rand_tokens(1, *GRID), torch.tensor([2])
    n = target[0].numel()
    inputs = [
        block_input(net, target, label),  # label only
        block_input(net, target, label, rand_tokens(1, 1, *GRID, seed=1), torch.tensor([[0]])),
        block_input(net, target, label, rand_tokens(1, 3, *GRID, seed=2), torch.tensor([[0, 1, 3]])),
    ]
    assert [x.shape[1] for x in inputs] == [n + 1, 2 * n + 1, 4 * n + 1]
    for x in inputs[1:]:
        assert torch.equal(x[:, -n:], inputs[0][:, -n:])
    # A source token and the target token of the same voxel share the position vector.
    sources = rand_tokens(1, 3, *GRID, seed=2)
    x = inputs[2]
    mod = net.context.modality_embedding.weight
    source_pos = x[0, n:2 * n] - net.token_embedding.weight[sources[0, 1].flatten()] - mod[1]
    target_pos = x[0, -n:] - net.token_embedding.weight[target[0].flatten()] - mod[2]
    assert torch.allclose(source_pos, target_pos, atol=1e-6)
    assert torch.allclose(target_pos, net.position_embedding(GRID), atol=1e-6)


def test_crop_positions_are_its_place_in_the_whole_grid():
    """A crop at grid_origin o gets the positions of cells o.. of the whole grid; padded cells share position 0."""
    net = make_net()
    whole = net.position_embedding(GRID)[0].reshape(*GRID, -1)
    origin = torch.tensor([[1, 0, 2], [-1, 1, 0]])
    crop = net.position_embedding((2, 3, 2), origin).reshape(2, 2, 3, 2, -1)
    torch.testing.assert_close(crop[0], whole[1:3, 0:3, 2:4])
    torch.testing.assert_close(crop[1, 1:], whole[0:1, 1:4, 0:2])  # the cell after the padded one is row 0
    torch.testing.assert_close(crop[1, 0], crop[1, 1])  # padded row clamps to position 0
    with pytest.raises(ValueError, match="max_grid_size"):
        net.position_embedding((2, 2, 2), torch.tensor([[net.max_grid_size[0] - 1, 0, 0]]))
    # The forward pass uses them: the same crop at another origin gives other logits.
    tokens = rand_tokens(1, 2, 3, 2)
    shifted = net(tokens, torch.tensor([1]), grid_origin=torch.tensor([[1, 0, 2]]))
    assert (shifted - net(tokens, torch.tensor([1]))).abs().max() > 1e-4


def test_output_depends_on_position_and_context():
    net = make_net()
    all_masked = torch.full((1, *GRID), K)
    logits = net(all_masked, torch.tensor([1]))
    # Identical inputs everywhere: only the 3D position tells positions apart.
    flat = logits.flatten(2)[0].T  # (N, K)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e9).min() > 1e-4
    # Sources change the prediction (the context is attended to), and so does the label.
    with_source = net(all_masked, torch.tensor([1]), rand_tokens(1, 1, *GRID), torch.tensor([[0]]))
    assert (with_source - logits).abs().max() > 1e-4
    assert (net(all_masked, torch.tensor([2])) - logits).abs().max() > 1e-4


def test_padding_is_ignored_in_a_mixed_batch():
    net = make_net()
    targets, labels = rand_tokens(2, *GRID), torch.tensor([2, 3])
    targets[:, 0] = K
    sources = rand_tokens(2, 3, *GRID, seed=1)
    source_labels = torch.tensor([[0, -1, -1], [0, 1, 2]])
    batched = net(targets, labels, sources, source_labels)
    alone_1 = net(targets[:1], labels[:1], sources[:1, :1], source_labels[:1, :1])
    alone_3 = net(targets[1:], labels[1:], sources[1:], source_labels[1:])
    assert torch.allclose(batched[:1], alone_1, atol=1e-5)
    assert torch.allclose(batched[1:], alone_3, atol=1e-5)
    # Garbage in a padded slot changes nothing.
    garbage = sources.clone()
    garbage[0, 1:] = K
    assert torch.allclose(net(targets, labels, garbage, source_labels), batched, atol=1e-6)
    # All sources absent == no sources at all.
    none = net(targets[:1], labels[:1], sources[:1], torch.full((1, 3), -1))
    assert torch.allclose(none, net(targets[:1], labels[:1]), atol=1e-5)


def test_modality_processor_layout_and_errors():
    proc = ModalityProcessor(num_modalities=4, hidden_dim=8, max_context_length=2)
    assert proc.null_label == 4
    emb = torch.randn(2, 2, 3, 8)
    labels = torch.tensor([[1, -1], [0, 3]])
    context, padding = proc(emb, labels, torch.tensor([2, 4]))
    assert context.shape == (2, 7, 8) and padding.shape == (2, 7)
    assert padding.tolist() == [[False] * 3 + [True] * 3 + [False], [False] * 7]
    table = proc.modality_embedding.weight
    assert torch.allclose(context[:, -1], table[[2, 4]])
    assert torch.allclose(context[1, 3:6], emb[1, 1] + table[3])
    assert torch.allclose(context[0, :3], emb[0, 0] + table[1])
    context, padding = proc(None, None, torch.tensor([0]))
    assert context.shape == (1, 1, 8) and not padding.any()
    with pytest.raises(ValueError, match="max_context_length=2"):
        proc(torch.randn(1, 3, 3, 8), torch.zeros(1, 3, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        proc(None, None, torch.tensor([5]))


def test_bad_inputs_raise():
    net = make_net()
    with pytest.raises(ValueError, match=r"exceeds max_grid_size \(8, 8, 8\)"):
        net(torch.zeros(1, 9, 4, 4, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="max_context_length=3"):
        net(torch.zeros(1, *GRID, dtype=torch.long), torch.tensor([0]),
            torch.zeros(1, 4, *GRID, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\]"):
        net(torch.full((1, *GRID), K + 1), torch.tensor([0]))
    with pytest.raises(ValueError, match="like the target grid"):
        net(torch.zeros(1, *GRID, dtype=torch.long), torch.tensor([0]),
            torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))


def test_masked_token_loss_polarity():
    torch.manual_seed(0)
    logits = torch.randn(2, K, *GRID, requires_grad=True)
    targets = rand_tokens(2, *GRID)
    mask = torch.rand(2, *GRID) < 0.3
    out = masked_token_loss(logits, targets, mask)
    ce = F.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(out["loss"], ce[mask].mean())
    assert not torch.allclose(out["loss"], ce[~mask].mean())
    out["loss"].backward()
    grad = logits.grad.abs().sum(dim=1)  # (B, d, h, w)
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask] > 0)
    # Accuracy counts masked positions only: make every visible prediction right, half the masked ones.
    perfect = F.one_hot(targets, K).permute(0, 4, 1, 2, 3).float() * 10
    wrong = F.one_hot((targets + 1) % K, K).permute(0, 4, 1, 2, 3).float() * 10
    masked_idx = mask.nonzero()
    half = torch.zeros_like(mask)
    half[tuple(masked_idx[::2].T)] = True
    mixed = torch.where(half[:, None], wrong, perfect)
    acc = masked_token_loss(mixed, targets, mask)["token_accuracy"].item()
    assert acc == pytest.approx(1 - len(masked_idx[::2]) / len(masked_idx))
    with pytest.raises(ValueError, match="no position"):
        masked_token_loss(logits, targets, torch.zeros_like(mask))


def test_training_on_masked_positions_learns_to_fill_from_visible_tokens():
    """Each volume is one repeated token: trained on masked positions only, the model must read the visible ones."""
    net = make_net().train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    grid, k, batch = (4, 4, 4), 8, 8

    def draw():
        target = torch.randint(0, k, (batch, 1, 1, 1), generator=gen).expand(batch, *grid)
        mask = torch.rand(batch, *grid, generator=gen) < 0.5
        return target, mask

    for _ in range(80):
        target, mask = draw()
        out = masked_token_loss(net(target.masked_fill(mask, K), torch.full((batch,), 2)), target, mask)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    net.eval()
    target, mask = draw()
    with torch.no_grad():
        out = masked_token_loss(net(target.masked_fill(mask, K), torch.full((batch,), 2)), target, mask)
    # Chance is 1/8 accuracy and ln(8) = 2.08 nats.
    assert out["token_accuracy"].item() > 0.9
    assert out["loss"].item() < 1.2


def full_grid_loss(logits, target, mask, label_smoothing=0.0):
    """The training loss before the trainer asked for the masked rows only, verbatim: cross-entropy of the full
    (B, K, d, h, w) grid, then the mean over the masked positions; accuracy of the grid's argmax there."""
    ce = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=label_smoothing)
    return ce[mask].mean(), (logits.argmax(dim=1) == target)[mask].float().mean()


def loss_and_grads(net, loss_fn, seed=0):
    """Loss, accuracy and every parameter gradient of one backward pass (the same dropout draws for each seed;
    None: the global generator as it is)."""
    net.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss, accuracy = loss_fn()
    loss.backward()
    return loss.detach(), accuracy, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def half_right(net, args, target, mask):
    """``target`` with about half of the masked positions set to the model's argmax there, so the token accuracy
    compared is neither 0 nor 1 (the masked positions are [MASK] in the input: the logits do not change)."""
    with torch.no_grad():
        guess = net(*args).argmax(dim=1)
    coin = torch.rand(mask.shape, generator=torch.Generator().manual_seed(7)) < 0.5
    return torch.where(mask & coin, guess, target)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_context,structured", [(False, False), (True, False), (True, True)])
def test_masked_rows_give_the_full_grid_loss_gradients_and_accuracy(with_context, structured, label_smoothing):
    """forward(..., positions=mask) -> (M, K) logits and token_loss: the training loss, every gradient (head
    included) and the token accuracy of the full-grid logits restricted to the masked positions (also with the
    FSQ-digit embeddings and aligned sources)."""
    from prod9_components.losses.masked_token import token_loss

    structure = {"code_levels": [4, 4, 4], "aligned_sources": True} if structured else {}
    net = make_net(dropout=0.1, **structure).train()  # dropout on: both passes must draw the same masks
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, K, (3, *GRID), generator=g)
    mask = torch.rand(3, *GRID, generator=g) < 0.4
    context = ((torch.randint(0, K, (3, 2, *GRID), generator=g), torch.tensor([[0, 1], [1, -1], [-1, -1]]))
               if with_context else (None, None))
    origin = torch.tensor([[0, 0, 0], [1, 2, 0], [-1, 0, 1]])
    args = (target.masked_fill(mask, K), torch.tensor([2, 3, net.null_label]), *context, origin)
    target = half_right(net.eval(), args, target, mask)
    net.train()

    old_loss, old_acc, old_grads = loss_and_grads(net, lambda: full_grid_loss(net(*args), target, mask,
                                                                                  label_smoothing))

    def rows_loss():
        rows = net(*args, positions=mask)
        assert rows.shape == (int(mask.sum()), K)
        out = token_loss(rows, target[mask], label_smoothing)
        return out["loss"], out["token_accuracy"]

    def fused_loss():  # the trainer's path: head and cross-entropy fused (no label smoothing there)
        out = net(*args, positions=mask, targets=target[mask])
        return out["loss"], out["token_accuracy"]

    paths = [rows_loss] + ([fused_loss] if label_smoothing == 0 else [])
    for path in paths:
        new_loss, new_acc, new_grads = loss_and_grads(net, path)
        assert 0 < old_acc < 1 and new_acc == old_acc
        torch.testing.assert_close(new_loss, old_loss, atol=1e-6, rtol=0)
        assert new_grads.keys() == old_grads.keys() and "head.weight" in new_grads
        for name, grad in new_grads.items():
            torch.testing.assert_close(grad, old_grads[name], atol=1e-6, rtol=1e-5, msg=f"{path.__name__}: {name}")
    # The rows are the full grid's logits at the masked positions, in target[mask] order.
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(*args, positions=mask), net(*args).movedim(1, -1)[mask], atol=1e-6, rtol=1e-5)
    # masked_token_loss (full-grid logits, evaluation) is the same loss.
    with torch.no_grad():
        logits = net(*args)
    out = masked_token_loss(logits, target, mask, label_smoothing)
    expected = full_grid_loss(logits, target, mask, label_smoothing)
    torch.testing.assert_close(out["loss"], expected[0], atol=1e-6, rtol=0)
    assert out["token_accuracy"] == expected[1]


def test_positions_must_be_a_bool_grid():
    net, target = make_net(), rand_tokens(2, *GRID)
    with pytest.raises(ValueError, match="positions must be a bool tensor"):
        net(target, torch.tensor([0, 1]), positions=torch.ones(2, *GRID, dtype=torch.long))
    with pytest.raises(ValueError, match="positions must be a bool tensor"):
        net(target, torch.tensor([0, 1]), positions=torch.ones(1, *GRID, dtype=torch.bool))
    from prod9_components.losses.masked_token import token_loss
    with pytest.raises(ValueError, match="no position"):
        token_loss(net(target, torch.tensor([0, 1]), positions=torch.zeros(2, *GRID, dtype=torch.bool)),
                   target[torch.zeros(2, *GRID, dtype=torch.bool)])


def trainer_step_against_full_grid(net, batch, monkeypatch, control_mask_key=None, grid=GRID, tumour_weight=1.0):
    """One MaskGiTTrainer iteration (masked rows only) beside the full-grid loss of the same mask: (output, grads of
    the trainer's step, loss, accuracy and grads of the full-grid reference). With ``tumour_weight``, the reference
    weights the masked cells that hold any tumour voxel (max-pooled by the downsampling factor) that many times."""
    import copy

    from prod9_components.engines import maskgit_trainer
    from prod9_components.engines.maskgit_context import TokenContextBuilder, control_inputs

    batch_size = batch["tokens"].shape[0]
    mask = torch.rand(batch_size, *grid, generator=torch.Generator().manual_seed(5)) < 0.5
    monkeypatch.setattr(maskgit_trainer, "sample_training_mask", lambda shape, schedule: mask)
    builder = TokenContextBuilder(target_modalities=["t2"], source_modalities=["t1", "flair"],
                                  random_source_subsets=False)
    reference = copy.deepcopy(net)
    trainer = maskgit_trainer.MaskGiTTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch], network=net,
        optimizer=torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.0), context_builder=builder,
        grad_clip=None, control_mask_key=control_mask_key, tumour_weight=tumour_weight)
    torch.manual_seed(0)
    output = trainer._iteration(trainer, batch)
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    torch.manual_seed(0)  # the trainer's draws: the builder's target pick, then dropout
    inputs = builder(batch["tokens"], train=True)
    target = inputs["target_tokens"]

    def full():
        controls = control_inputs(batch, inputs["rows"], control_mask_key)
        logits = reference.train()(target.masked_fill(mask, reference.mask_token_id),
                                   inputs["target_label"], inputs["source_tokens"], inputs["source_labels"],
                                   batch["grid_origin"], **controls)
        loss, accuracy = full_grid_loss(logits, target, mask)
        if tumour_weight == 1.0:
            return loss, accuracy
        seg = controls["control_mask"][:, None]  # (B, 1, D, H, W)
        tumour = F.max_pool3d((seg > 0).float(), seg.shape[-1] // grid[-1])[:, 0]  # (B, d, h, w)
        weights = (1.0 + (tumour_weight - 1.0) * tumour)[mask]
        ce = F.cross_entropy(logits.float(), target, reduction="none")[mask]
        return (ce * weights).sum() / weights.sum(), accuracy

    return (output, grads, *loss_and_grads(reference, full, seed=None))


def test_trainer_loss_and_gradients_are_the_full_grid_ones(monkeypatch):
    net = make_net(dropout=0.1)
    g = torch.Generator().manual_seed(4)
    batch = {"tokens": torch.randint(0, K, (2, 4, *GRID), generator=g), "grid_origin": torch.tensor([[0, 1, 0],
                                                                                                      [1, 0, 2]])}
    output, grads, loss, accuracy, expected = trainer_step_against_full_grid(net, batch, monkeypatch)
    torch.testing.assert_close(output["loss"], loss, atol=1e-6, rtol=0)
    assert output["token_accuracy"] == accuracy
    assert grads.keys() == expected.keys() and "head.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_code_levels_share_what_is_learned_between_fsq_neighbours():
    """With code_levels, a step that raises one id's logit raises those of ids sharing FSQ digits with it far more
    than those of ids sharing none; without, every other id's logit moves alike (one free row per id)."""
    target_id = 21  # digits (1, 1, 1) of levels [4, 4, 4]
    digits = [(k % 4, k // 4 % 4, k // 16) for k in range(K)]
    shared = [k for k in range(K) if k != target_id and sum(a == b for a, b in zip(digits[k], digits[target_id])) == 2]
    unrelated = [k for k in range(K) if all(a != b for a, b in zip(digits[k], digits[target_id]))]
    gaps = {}
    for code_levels in (None, [4, 4, 4]):
        net = make_net(code_levels=code_levels).train()
        target = rand_tokens(1, *GRID)
        mask = torch.zeros(1, *GRID, dtype=torch.bool)
        mask[0, 1, 2, 3] = True
        args = (target.masked_fill(mask, K), torch.tensor([2]))
        before = net(*args, positions=mask).detach()[0]
        net(*args, positions=mask, targets=torch.tensor([target_id]))["loss"].backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.05 * p.grad
        change = net(*args, positions=mask).detach()[0] - before
        gaps[str(code_levels)] = float(change[shared].mean() - change[unrelated].mean())
    assert gaps["[4, 4, 4]"] > 0.05 and abs(gaps["None"]) < 0.2 * gaps["[4, 4, 4]"], gaps


@pytest.mark.parametrize("codebook,levels", [(K, [4, 4, 3]), (K, [128, 0.5]), (K, [1, 64]), (K, [-4, -16]),
                                             (K, []), (128, [128])])
def test_code_levels_must_be_fsq_levels_that_make_the_codebook(codebook, levels):
    """A record's code_levels must be FSQ levels in [2, 64] whose product is the codebook: a single level of K (a
    (K, K) digit table), negative or unit levels are refused in one line before anything is allocated."""
    with pytest.raises(ValueError, match=r"code_levels (must be FSQ levels in \[2, 64\]|\[4, 4, 3\] make 48 codes)"):
        make_net(codebook_size=codebook, code_levels=levels)


def test_aligned_sources_reach_the_target_voxel_they_share():
    """aligned_sources adds the source token at the same voxel to the target's input: changing one source token
    changes that target voxel's embedding only; absent sources (the null context) add nothing."""
    target, label = rand_tokens(1, *GRID), torch.tensor([2])
    sources, labels = rand_tokens(1, 1, *GRID, seed=1), torch.tensor([[0]])
    changed = sources.clone()
    changed[0, 0, 1, 2, 3] = (changed[0, 0, 1, 2, 3] + 1) % K
    voxel = np.ravel_multi_index((1, 2, 3), GRID)
    for aligned in (False, True):
        net = make_net(aligned_sources=aligned)
        n = int(np.prod(GRID))
        a, b = (block_input(net, target, label, s, labels)[0, -n:] for s in (sources, changed))
        moved = (a - b).abs().sum(1) > 0
        assert moved.tolist() == [aligned and i == voxel for i in range(n)]
    net = make_net(aligned_sources=True)
    absent = torch.tensor([[-1]])
    a, b = (block_input(net, target, label, s, absent)[0, -n:] for s in (sources, changed))
    assert torch.equal(a, b)


def test_code_weight_adds_the_expected_codes_squared_error_to_the_trainer_loss(monkeypatch):
    """code_weight w: the trainer's loss is the masked cross-entropy + w x the mean squared error (over the masked
    positions and code channels) of softmax(logits) @ codes against the true code, computed from the full grid's
    logits (its gradient: tests/unit/test_linear_token_loss.py); code_error is reported. Without code_levels, or with a
    negative or non-finite weight, it is refused."""
    from prod9_components.engines.maskgit_context import TokenContextBuilder
    from prod9_components.engines import maskgit_trainer
    from prod9_components.engines.maskgit_trainer import MaskGiTTrainer
    from prod9_components.networks.fsq import FiniteScalarQuantizer

    codes = FiniteScalarQuantizer([4, 4, 4]).codebook()  # (K, 3)
    g = torch.Generator().manual_seed(4)
    batch = {"tokens": torch.randint(0, K, (2, 4, *GRID), generator=g), "grid_origin": torch.tensor([[0, 1, 0],
                                                                                                      [1, 0, 2]])}
    plain = trainer_step_against_full_grid(make_net(code_levels=[4, 4, 4]), batch, monkeypatch)[0]
    net = make_net(code_levels=[4, 4, 4])
    mask = maskgit_trainer.sample_training_mask((2, *GRID), "cosine")  # the fixed mask the helper patched in
    builder = TokenContextBuilder(target_modalities=["t2"], source_modalities=["t1", "flair"],
                                  random_source_subsets=False)
    torch.manual_seed(0)
    inputs = builder(batch["tokens"], train=True)
    target = inputs["target_tokens"]
    logits = net.train()(target.masked_fill(mask, net.mask_token_id), inputs["target_label"],
                         inputs["source_tokens"], inputs["source_labels"], batch["grid_origin"]).detach()
    rows = logits.movedim(1, -1)[mask].float()  # (M, K)
    error = ((rows.softmax(-1) @ codes - codes[target[mask]]) ** 2).mean()

    trainer = MaskGiTTrainer(device="cpu", max_epochs=1, train_data_loader=[batch], network=net,
                             optimizer=torch.optim.SGD(net.parameters(), lr=0.0), context_builder=builder,
                             grad_clip=None, code_weight=30.0)
    torch.manual_seed(0)
    output = trainer._iteration(trainer, batch)
    torch.testing.assert_close(output["code_error"], error, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(output["loss"], plain["loss"] + 30.0 * error, atol=1e-5, rtol=1e-5)
    assert float(error) > 0.01  # a real term, not a rounding

    with pytest.raises(ValueError, match="code_weight needs a transformer built with code_levels"):
        make_net()(target.masked_fill(mask, K), inputs["target_label"], positions=mask, targets=target[mask],
                   code_weight=1.0)
    for name, bad in [("code_weight", b) for b in (-1.0, float("nan"), float("inf"), "abc", None)] + [
            ("tumour_weight", b) for b in (0.5, "abc")]:
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= [01], got {bad!r}"):
            MaskGiTTrainer(device="cpu", max_epochs=1, train_data_loader=[batch], network=net,
                           optimizer=torch.optim.SGD(net.parameters(), lr=0.0), context_builder=builder,
                           **{name: bad})
    assert MaskGiTTrainer(device="cpu", max_epochs=1, train_data_loader=[batch], network=net,
                          optimizer=torch.optim.SGD(net.parameters(), lr=0.0), context_builder=builder,
                          code_weight="20").code_weight == 20.0  # `monai.bundle run --code_weight 20` hands a string
