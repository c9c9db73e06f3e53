"""The shared timing helpers: interleaved medians and the per-machine latency cache."""

from __future__ import annotations

import json

import pytest
import torch

from admmcompress.timing import LatencyCache, machine_key, median_ms, time_interleaved


def test_interleaved_runs_every_call_warmup_plus_rounds_times():
    counts = {"a": 0, "b": 0}

    def bump(name):
        counts[name] += 1

    times = time_interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, rounds=5, warmup=2)
    assert counts == {"a": 7, "b": 7}
    assert set(times) == {"a", "b"} and all(ms >= 0 for ms in times.values())
    assert median_ms(lambda: None, rounds=3) >= 0


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds=0"):
        time_interleaved({"a": lambda: None}, rounds=0)


def test_machine_key_names_threads_and_torch():
    key = machine_key()
    assert torch.__version__ in key and f"{torch.get_num_threads()} threads" in key


def test_cache_measures_once_and_persists(tmp_path):
    calls = []
    cache = LatencyCache("t", folder=tmp_path)
    assert cache.get_or_measure("k", lambda: calls.append(1) or 2.0) == 2.0
    assert cache.get_or_measure("k", lambda: calls.append(1) or 3.0) == 2.0
    assert calls == [1]
    again = LatencyCache("t", folder=tmp_path)
    assert again.get("k") == 2.0 and len(again) == 1


def test_cache_ignores_corrupt_or_foreign_files(tmp_path):
    cache = LatencyCache("t", folder=tmp_path)
    cache.path.write_text("{not json")
    assert LatencyCache("t", folder=tmp_path).get("k") is None
    cache.path.write_text(json.dumps({"machine": "another machine", "ms": {"k": 1.0}}))
    assert LatencyCache("t", folder=tmp_path).get("k") is None
    # a corrupt file is rewritten whole on the next measurement
    fresh = LatencyCache("t", folder=tmp_path)
    fresh.put("k", 4.0)
    assert LatencyCache("t", folder=tmp_path).get("k") == 4.0
