"""`export.load_weights`, what an exported bundle's inference.json loads models/*.pt with: tensors only (a pickle
that would run code is refused), a strict fit, a ControlNet's base merged from its own file, one-line errors naming
the file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prod9_components.networks.export import load_weights


class Controlled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(3, 2)
        self.branch = nn.Linear(2, 2)


def test_a_controlnet_loads_its_branch_and_its_base_from_two_files(tmp_path):
    trained = Controlled()
    state = trained.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("base.")}, tmp_path / "model.pt")
    torch.save(trained.base.state_dict(), tmp_path / "base.pt")
    loaded = load_weights(Controlled(), tmp_path / "model.pt", base=tmp_path / "base.pt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match=r"model.pt: the weights do not fit Controlled \(.*base"):
        load_weights(Controlled(), tmp_path / "model.pt")  # the base missing: refused, not left at random


class Runs:  # a pickle that would call code when loaded without weights_only
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize("content, message", [
    ({"weight": Runs()}, "not a loadable weights file"),
    ([torch.zeros(2)], "not a state dict"),
    ({"weight": 3}, "not a state dict"),
])
def test_files_that_are_not_state_dicts_are_refused(tmp_path, content, message, capsys):
    torch.save(content, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.pt'}: {message}"):
        load_weights(nn.Linear(3, 2), tmp_path / "model.pt")
    assert "ran" not in capsys.readouterr().out


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'model.pt'}: weights file not found"):
        load_weights(nn.Linear(3, 2), tmp_path / "model.pt")
