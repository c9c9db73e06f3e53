"""Test plugin: method ``admm_stop`` is ADMM that kills rank 0 (os._exit) once ``ADMM_STOP_AT`` updates are done.

The kill lands in the first penalty after that update, so after the epoch's checkpoint was written: a
deterministic crash of a torchrun run for the resume tests (tests/train/test_distributed.py).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from admmcompress.drivers.admm import ADMM, ADMMConfig
from admmcompress.drivers.base import register_driver


@register_driver("admm_stop", ADMMConfig)
class StoppingADMM(ADMM):
    """ADMM whose rank 0 dies at the first penalty after ``ADMM_STOP_AT`` updates (unset or 0: never)."""

    def penalty(self) -> torch.Tensor:
        stop = int(os.environ.get("ADMM_STOP_AT", "0"))
        if stop and self.iteration >= stop and (not dist.is_initialized() or dist.get_rank() == 0):
            os._exit(9)
        return super().penalty()


@register_driver("admm_rankdiff", ADMMConfig)
class RankDependentADMM(ADMM):
    """ADMM whose update adds the rank to U: a driver whose state would drift apart across ranks."""

    def step(self) -> dict:
        entry = super().step()
        if dist.is_initialized():
            first = next(iter(self.state.values()))
            first["U"] += 1e-3 * dist.get_rank()
            self._refresh_anchors()
        return entry
