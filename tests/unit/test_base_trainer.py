"""The trainers' shared part: AMP only on CUDA, and the one optimiser step (with and without loss scaling)."""

from __future__ import annotations

import copy

import torch

from prod9_components.engines.base_trainer import BaseTrainer, channels_last_on_cpu, cuda_amp


def _step(trainer: BaseTrainer, x: torch.Tensor, scaler=None) -> None:
    trainer.optimizer_step((trainer.network(x) ** 2).sum() * 10, scaler=scaler)


def test_amp_only_on_cuda():
    assert not cuda_amp(True, "cpu") and not cuda_amp(False, "cuda") and cuda_amp(True, torch.device("cuda", 1))
    trainer = BaseTrainer("cpu", 1, [], torch.nn.Linear(3, 2), torch.optim.SGD([torch.zeros(1)], lr=1.0), amp=True,
                          amp_dtype=torch.float16)
    assert not trainer.amp and not trainer.scaler.is_enabled()  # float32 on CPU; the scaler exists for resumes
    assert BaseTrainer("cpu", 1, [], torch.nn.Linear(3, 2), trainer.optimizer).scaler is None  # bfloat16: none


def test_cpu_trainers_lay_conv3d_weights_out_channels_last_and_step_the_same():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.GELU(), torch.nn.Conv3d(4, 1, 1),
                                  torch.nn.Flatten(), torch.nn.Linear(6**3, 2))
    reference, x = copy.deepcopy(network), torch.randn(2, 2, 6, 6, 6)
    trainer = BaseTrainer("cpu", 1, [], network, torch.optim.SGD(network.parameters(), lr=0.1))
    assert network[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not network[0].weight.is_contiguous()  # really re-laid out
    assert network[4].weight.is_contiguous()  # 2D weights untouched
    _step(trainer, x)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    optimizer.zero_grad()
    ((reference(x) ** 2).sum() * 10).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer.step()
    for p, q in zip(network.parameters(), reference.parameters()):  # the same step, up to summation order
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # CUDA keeps its layout (nothing is moved: only the layout decision is checked)
    cuda_net = torch.nn.Conv3d(1, 4, 3)
    assert channels_last_on_cpu(cuda_net, "cuda") is cuda_net and cuda_net.weight.is_contiguous()


def test_optimizer_step_clips_and_steps_like_the_hand_written_loop():
    torch.manual_seed(0)
    network, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    expected = copy.deepcopy(network)
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        ((expected(x) ** 2).sum() * 10).backward()
        torch.nn.utils.clip_grad_norm_(expected.parameters(), 0.5)
        optimizer.step()

    plain, scaled = copy.deepcopy(network), copy.deepcopy(network)
    trainers = [BaseTrainer("cpu", 1, [], net, torch.optim.SGD(net.parameters(), lr=0.1), grad_clip=0.5)
                for net in (plain, scaled)]
    # A power-of-two loss scale is exact: unscaled before clipping, the scaled step equals the plain one.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scaler.is_enabled()
    for _ in range(2):
        _step(trainers[0], x)
        _step(trainers[1], x, scaler)
    for net in (plain, scaled):
        for p, q in zip(net.parameters(), expected.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_last_ckpt_holds_the_loss_scaler(tmp_path):
    """MONAI attaches handlers inside the workflow's constructor, before the trainer makes its scaler: the checkpoint
    handler must still find it, or a resumed float16 run starts from a fresh loss scale."""
    from prod9_components.handlers.checkpoint import CheckpointHandler

    class Trainer(BaseTrainer):
        def _iteration(self, engine, batch):
            self.optimizer_step(self.network(batch).pow(2).sum())
            return {"loss": 0.0}

    network = torch.nn.Linear(3, 1)
    handler = CheckpointHandler(str(tmp_path), network, save_dict={})
    trainer = Trainer("cpu", 1, [torch.ones(2, 3)], network, torch.optim.SGD(network.parameters(), lr=0.1),
                      train_handlers=[handler], amp=True, amp_dtype=torch.float16)
    trainer.run()
    assert "scaler" in torch.load(tmp_path / "last.ckpt", weights_only=True)
