"""benchmarks/lenet5_mnist.py: the seed table reads each run's 71.2x step (the last one of a progressive run)."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("lenet5_mnist")
    yield module
    sys.modules.pop("lenet5_mnist", None)


def write_run(root: Path, folder: str, stages: list[tuple[float, float]], finished: bool = True) -> None:
    metrics = {"accuracy_before": 99.4,
               "stages": [{"overall_compression": rate, "accuracy_after_retrain": acc} for rate, acc in stages]}
    if finished:
        metrics["accuracy_after"] = stages[-1][1]
    (root / folder).mkdir(parents=True)
    (root / folder / "metrics.json").write_text(json.dumps({"metrics": metrics}))


def test_seed_table_lists_every_seed_at_the_last_step_and_skips_unfinished_runs(bench, tmp_path):
    write_run(tmp_path, "admm_71x", [(71.2, 99.2)])
    write_run(tmp_path, "admm_71x_seed1", [(71.2, 99.0)])
    write_run(tmp_path, "admm_71x_seed2", [(71.2, 98.0)], finished=False)
    write_run(tmp_path, "admm_71x_progressive", [(29.3, 99.3), (71.2, 99.25)])
    write_run(tmp_path, "admm_71x_progressive_seed2", [(29.3, 99.1), (71.2, 99.15)])
    table = "\n".join(bench.seed_table(tmp_path, dense=99.4))
    assert "| admm_71x | 2 | 99.20 (seed 0), 99.00 (seed 1) | 99.10% | +0.30 |" in table
    assert "| admm_71x_progressive | 2 | 99.25 (seed 0), 99.15 (seed 2) | 99.20% | +0.20 |" in table
    assert "admm_71x_long" not in table  # no runs, no row
