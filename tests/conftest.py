"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread. Elementwise ops on tensors of more than 32k elements go multi-threaded; on
    a busy 2-core machine the thread pool's spin-waits made a 1000-step sampler ~50x slower (measured 140 s instead
    of 1.8 s). One thread is fast. Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
