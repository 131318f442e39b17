"""TokenContextBuilder: which tokens become the target and the context, in training and evaluation."""

from __future__ import annotations

import pytest
import torch

from prod9_components.engines.maskgit_context import TokenContextBuilder


def _tokens(batch=3, grid=(2, 3, 2)):
    # Modality m of item b holds the value 100*b + m everywhere, so every selection is checkable.
    values = 100 * torch.arange(batch)[:, None] + torch.arange(4)[None]
    return values[:, :, None, None, None].expand(batch, 4, *grid).clone()


def test_label_mode_evaluation_expands_every_modality():
    builder = TokenContextBuilder()
    out = builder(_tokens(2), train=False)
    assert out["source_tokens"] is None and out["source_labels"] is None
    assert out["target_label"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert out["target_tokens"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]


def test_incontext_sources_targets_and_subsets():
    builder = TokenContextBuilder(target_modalities=["FLAIR"], source_modalities=["T1", "t1c", "T2"])
    out = builder(_tokens(3), train=False)
    assert out["target_label"].tolist() == [3, 3, 3]
    assert out["source_labels"].tolist() == [[0, 1, 2]] * 3
    assert out["source_tokens"][1, :, 0, 0, 0].tolist() == [100, 101, 102]

    torch.manual_seed(0)
    seen = set()
    for _ in range(50):
        labels = builder(_tokens(8), train=True)["source_labels"]
        assert ((labels >= 0).sum(1) >= 1).all(), "every sample keeps at least one source"
        seen.update(int(n) for n in (labels >= 0).sum(1))
    assert seen == {1, 2, 3}


def test_context_dropout_gives_the_null_context():
    builder = TokenContextBuilder(target_modalities=["T2"], source_modalities=["T1"], context_dropout=0.5,
                                  null_label=4)
    torch.manual_seed(0)
    out = builder(_tokens(400), train=True)
    dropped = out["target_label"] == 4
    assert 0.4 < dropped.float().mean() < 0.6
    assert (out["source_labels"][dropped] == -1).all() and (out["source_labels"][~dropped] == 0).all()
    assert (builder(_tokens(400), train=False)["target_label"] == 2).all(), "no dropout in evaluation"


def test_bad_modalities():
    with pytest.raises(ValueError, match="T2 is both a source and the target"):
        TokenContextBuilder(target_modalities=["T2"], source_modalities=["T1", "t2w"])
    with pytest.raises(ValueError, match="unknown modality 'PD'"):
        TokenContextBuilder(target_modalities=["PD"])
