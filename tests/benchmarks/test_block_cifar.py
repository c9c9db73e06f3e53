"""benchmarks/block_cifar.py: the configs it builds and its table (the runs themselves are CPU hours)."""

import argparse
import json

import pytest
import torch

from admmcompress.models import create_model


@pytest.fixture()
def bench(load_benchmark):
    return load_benchmark("block_cifar")


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"threads": 1, "admm_epochs": 3, "retrain_epochs": 3, "rho": 0.1, **kw})


@pytest.mark.parametrize("structure", ["block", "filter"])
def test_config_targets_the_block_convs_at_the_rate(bench, structure):
    config = bench.run_config(structure, 4.0, 2, args(), steps=352)
    stage = config.stages[0]
    assert config.seed == 2 and stage.admm.epochs == 3 and stage.retrain.epochs == 3
    assert stage.admm.update_every_steps == 88 and stage.coupling == "none"
    assert stage.options.rho == 0.1
    targets = stage.plan.resolve(create_model("resnet20"))
    assert len(targets) == 18 and all(t.structure.kind == structure for t in targets)


def test_equal_weights_and_summary(bench, tmp_path):
    model = create_model("resnet20")
    with torch.no_grad():
        model.layers[0][0].conv1.weight[:8] = 0
    kept, total = bench.targeted_weights(model)
    assert total == 267_264 and kept == total - 8 * 16 * 9  # the 1x1 shortcut convs are not counted
    rows = [{"structure": s, "rate": 4.0, "seed": seed, "kept_weights": 66_816, "total_weights": total,
             "dense_accuracy": 88.39, "accuracy_after_hard_prune": 80.0, "accuracy": 85.0 + seed}
            for s in ("block", "filter") for seed in (0, 1, 2)]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = bench.summary(tmp_path)
    assert "| block | 4x | 66,816 of 267,264 | 80.00 | 86.00 +- 1.00 (3) | 2.39 |" in table
