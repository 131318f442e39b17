"""Fixtures for unit tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test single-threaded: tiny matmuls on a shared 2-core machine are many times faster that way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
