"""Fixtures for the toolkit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def single_thread():
    """Run torch on one thread: the tests' models are tiny, and on a busy 2-core machine two OpenMP threads
    wait on each other far longer than they compute."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
