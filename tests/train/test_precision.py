"""bf16 autocast on a CPU without native bf16 is emulated (10-16x slower): a run says so at its start."""

from __future__ import annotations

import warnings

import pytest
import torch

from admmcompress.data.datasets import Split
from admmcompress.models import create_model
from admmcompress.train import precision
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import Runner


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)


def test_bf16_on_an_emulating_cpu_is_said_and_nothing_else_is(no_native_bf16, monkeypatch):
    with pytest.warns(UserWarning, match=r"autocast: bf16: this CPU \(.*\) has no native bf16 .* 10-16x slower"):
        assert precision.warn_if_emulated_bf16(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not precision.warn_if_emulated_bf16(None)  # float32
        monkeypatch.setattr(precision, "native_bf16", lambda: True)
        assert not precision.warn_if_emulated_bf16(torch.bfloat16)


def test_the_probe_answers_on_any_machine(monkeypatch):
    precision.native_bf16.cache_clear()
    try:
        assert isinstance(precision.native_bf16(), bool)
        precision.native_bf16.cache_clear()
        monkeypatch.setattr(precision.platform, "machine", lambda: "arm64")
        assert precision.native_bf16() is True  # no probe there: nothing is said
    finally:
        precision.native_bf16.cache_clear()


def test_a_run_asking_for_bf16_warns_at_its_start(no_native_bf16):
    spec = {"model": {"name": "lenet300100"}, "pretrained": "unused.safetensors", "autocast": "bf16",
            "data": {"batch_size": 4}, "stages": []}
    data = Split(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    with pytest.warns(UserWarning, match="has no native bf16"):
        Runner(RunConfig.from_dict(spec), create_model("lenet300100"), data, data, progress=False)
