"""The CLI's one-line error keeps the file name even when a DataLoader worker raised it (torch re-raises it in the
main process as "Caught ValueError in DataLoader worker process 0." followed by the worker's traceback as text)."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, Dataset

from prod9_components.cli.bundle_runner import one_line, root_cause


class _TruncatedVolume(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise ValueError("/data/BraTS2021_00000/BraTS2021_00000_t1.nii.gz: cannot read (EOFError: truncated)")


def test_a_worker_error_keeps_the_file_name():
    with pytest.raises(ValueError) as error:
        next(iter(DataLoader(_TruncatedVolume(), num_workers=1)))
    assert str(error.value).startswith("Caught ValueError in DataLoader worker process 0")  # what torch gives
    assert one_line(root_cause(error.value)) == (
        "/data/BraTS2021_00000/BraTS2021_00000_t1.nii.gz: cannot read (EOFError: truncated)")


def test_other_errors_keep_their_first_line():
    assert one_line(ValueError("--seed: expected a number\nmore detail")) == "--seed: expected a number"
    assert one_line(KeyError()) == "KeyError"
