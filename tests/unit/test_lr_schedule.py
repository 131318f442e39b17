"""Learning-rate schedules: warm-up, cosine decay, a state that resumes without holding code, and a bad schedule (or
MAISI ControlNet scheduler override) refused before a run writes anything."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from prod9_components.engines.lr_schedule import lr_schedule
from tests.helpers import cli


def rates(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_warms_up_then_decays_to_zero():
    lr = rates(lr_schedule(optimizer(), "cosine", total_steps=110, warmup_steps=10), 115)
    assert lr[0] == pytest.approx(0.01) and lr[9] == pytest.approx(0.1)  # linear warm-up to the base rate
    assert lr[60] == pytest.approx(0.05)  # half-way through the decay: half the rate
    assert lr[110] == pytest.approx(0.0, abs=1e-12) and lr[114] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))


def test_constant_is_the_base_rate_after_its_warm_up():
    assert rates(lr_schedule(optimizer(), "constant", total_steps=5), 5) == pytest.approx([0.1] * 5)
    warmed = lr_schedule(optimizer(), "constant", total_steps=5, warmup_steps=2)
    assert rates(warmed, 3) == pytest.approx([0.05, 0.1, 0.1])


def test_resume_keeps_the_step_and_follows_the_new_run_length():
    first = lr_schedule(optimizer(), "cosine", total_steps=100)
    rates(first, 50)
    state = first.state_dict()
    pickle.loads(pickle.dumps(state))  # plain data: what a weights_only checkpoint can hold
    assert not any(callable(v) for v in state.values())
    longer = lr_schedule(optimizer(), "cosine", total_steps=200)  # the resumed run asked for more epochs
    longer.load_state_dict(state)
    assert longer.last_epoch == 50
    longer.optimizer.step()
    longer.step()  # step 51 of the new 200-step cosine, not of the old 100-step one
    assert longer.get_last_lr()[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 51 / 200)))


def test_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="'linear'"):
        lr_schedule(optimizer(), "linear", total_steps=10)


@pytest.mark.parametrize("command, flag, value, message", [
    ("prod9-train-autoencoder", "--lr-schedule", "linear", "lr_schedule must be one of constant, cosine, got 'linear'"),
    ("prod9-train-maisi-vae", "--lr-schedule", "$print(1)",
     "lr_schedule must be one of constant, cosine, got '$print(1)'"),  # read as data
    ("prod9-train-maisi-controlnet", "--warmup-steps", "-5", "warmup_steps must be a whole number >= 0, got -5"),
    # the ControlNet's scheduler_overrides, checked in the same place
    ("prod9-train-maisi-controlnet", "--scheduler-overrides#use_timestep_transfrom", "False",
     "scheduler_overrides: 'use_timestep_transfrom' is not an RFlowScheduler argument (one of base_img_size_numel, "
     "loc, num_train_timesteps, sample_method, scale, spatial_dim, steps_offset, transform_scale, "
     "use_discrete_timesteps, use_timestep_transform)"),
    ("prod9-train-maisi-controlnet", "--scheduler-overrides#use_timestep_transform", "[1]",
     "scheduler_overrides: use_timestep_transform must be a bool, finite number or string, got [1]"),
    ("prod9-train-maisi-controlnet", "--scheduler-overrides", "$print(1)",  # the flag parser refuses it first
     "--scheduler-overrides: expected a dict like the bundle's default {}, got '$print(1)' (flag values are data, "
     "never bundle expressions)"),
])
def test_a_bad_schedule_stops_the_run_before_it_writes_its_split(tmp_path, demo_dataset_dir, command, flag, value,
                                                                 message):
    out = tmp_path / "run"
    result = cli(command, "train", "--dataset-dir", demo_dataset_dir, "--output-dir", str(out), flag, value,
                 check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not out.exists()  # not even the split record (datalist.json)


def test_scheduler_overrides_from_a_config_file_must_be_a_mapping():
    from prod9_components.sampling.steps import check_scheduler_overrides

    check_scheduler_overrides({"use_timestep_transform": False, "base_img_size_numel": 268})
    with pytest.raises(ValueError, match=r"scheduler_overrides must be a mapping of RFlowScheduler arguments, got 5"):
        check_scheduler_overrides(5)
    # JSON config files can spell NaN and Infinity; a scheduler built from them would sample nothing useful
    with pytest.raises(ValueError, match=r"num_train_timesteps must be a bool, finite number or string, got nan"):
        check_scheduler_overrides({"num_train_timesteps": float("nan")})
