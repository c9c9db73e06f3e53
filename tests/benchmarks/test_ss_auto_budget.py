"""The SS-Auto benchmark compares methods at equal MACs: every baseline meets the budget as compacted."""

from __future__ import annotations

import pytest
import torch

from admmcompress.data import Split, load_dataset

pytestmark = pytest.mark.slow


@pytest.fixture()
def ss_auto(load_benchmark):
    return load_benchmark("ss_auto")


@pytest.mark.parametrize("method", ["uniform", "handset"])
def test_rate_baselines_meet_the_budget_after_admm(ss_auto, method, tmp_path):
    """Rates found on the dense weights no longer meet the budget after ADMM (fewer channels end up unread);
    the benchmark finds them again on the trained weights, so the compacted model is within budget."""
    train = ss_auto.shuffled(load_dataset("mnist", "train"), 600)
    data = (Split(train.x[:500], train.y[:500], train.source), Split(train.x[500:], train.y[500:], train.source),
            Split(train.x[500:], train.y[500:], train.source))
    with torch.random.fork_rng():
        record = ss_auto.one_run("lenet5", method, 4.0, 0, data, tmp_path, lambda line: None, quick=True)
    assert record["macs_compacted"] == record["macs_budget_count"]
    assert record["macs_dense"] / record["macs_compacted"] >= 4.0
    assert record["plan"] and record["plan_before_admm"]
