"""Shared settings for the fast suite: few threads, modest hypothesis budgets."""

import pytest
import torch
from hypothesis import HealthCheck, settings

# The tensors here are tiny: one thread avoids OpenMP spin-waits that make every op ~100x
# slower when the machine's cores are busy with something else.
torch.set_num_threads(1)

settings.register_profile(
    "fast",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fast")


@pytest.fixture(autouse=True)
def keep_thread_count():
    """A config's `threads:` sets torch's thread count for the whole process; put it back after every test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
