"""Shared settings for the fast suite: few threads, modest hypothesis budgets."""

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(2)

settings.register_profile(
    "fast",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fast")
