"""Benchmark scripts imported as modules: ``benchmarks/`` on the path, and the modules dropped afterwards."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
HELPERS = ("bench_runs", "structured_common")  # siblings the scripts import


@pytest.fixture()
def load_benchmark(monkeypatch):
    """``load_benchmark("ss_auto")`` imports ``benchmarks/ss_auto.py`` fresh for this test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    loaded: list[str] = []

    def load(name: str):
        loaded.append(name)
        return importlib.import_module(name)

    yield load
    for name in (*loaded, *HELPERS):
        sys.modules.pop(name, None)
