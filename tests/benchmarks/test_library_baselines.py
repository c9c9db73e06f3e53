"""benchmarks/library_baselines.py: the torch.nn.utils.prune contenders keep exactly the ADMM run's weights."""

import json

import pytest
import torch

from admmcompress.models import create_model

ADMM_KEPT = {"conv1": 100, "conv2": 2000, "fc1": 3600, "fc2": 350}  # configs/lenet5_admm_71x.yaml: 6,050 weights


@pytest.fixture()
def bench(load_benchmark):
    return load_benchmark("library_baselines")


def test_kept_counts_are_the_admm_configs(bench):
    assert bench.kept_target(create_model(name="lenet5")) == ADMM_KEPT


def test_cubic_schedule_starts_at_zero_ends_at_the_rate_and_never_falls(bench):
    values = [bench.cubic(step, 40, 0.93) for step in range(41)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.93)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_repeated_pruning_reaches_the_exact_count_and_never_revives_a_weight(bench):
    torch.manual_seed(0)
    layer = torch.nn.Linear(50, 40)
    pruned_before = torch.zeros(40, 50, dtype=torch.bool)
    for step in range(1, 11):
        bench.prune_to(layer, bench.cubic(step, 10, 0.991))
        zero = layer.weight == 0
        assert bool(zero[pruned_before].all())  # a pruned weight stays pruned
        assert int(zero.sum()) == round(bench.cubic(step, 10, 0.991) * 2000)
        pruned_before = zero
    bench.prune_to(layer, 0.991)  # already there: no empty step is added
    assert int((layer.weight != 0).sum()) == 18


@pytest.mark.parametrize("contender", ["admm", "torch_layer", "torch_global", "torch_gradual"])
def test_each_contender_runs_and_keeps_6050_weights(bench, tmp_path, contender):
    record = bench.one_run(contender, 0, tmp_path, quick=True)
    assert sum(record["kept"].values()) == sum(ADMM_KEPT.values())
    if contender != "torch_global":  # global ranking chooses its own per-layer split of the same total
        assert record["kept"] == ADMM_KEPT
    assert 0.0 <= record["accuracy"] <= 100.0
    again = bench.one_run(contender, 0, tmp_path, quick=True)  # finished: read back, not retrained
    assert again == json.loads((tmp_path / f"{contender}_s0" / "result.json").read_text())
    with pytest.raises(SystemExit, match="holds a --quick smoke result; pass another --out"):
        bench.one_run(contender, 0, tmp_path, quick=False)  # a smoke result is not taken for a real one
    table = bench.summarize(tmp_path)
    assert table.startswith("smoke runs (--quick): not results")


def test_nni_admm_runs_and_keeps_the_per_layer_counts(bench, tmp_path):
    pytest.importorskip("nni.algorithms.compression.v2.pytorch.pruning", reason="NNI 2.10.1 is not installed")
    record = bench.one_run("nni_admm", 0, tmp_path, quick=True)
    # NNI 2.10.1's penalty sqrt(||W - Z + U||) has no gradient at its start (Z = W, U = 0): NaN at step 1
    assert record["accuracy"] is None and "loss became nan at step 1;" in record["diverged"]
    assert "nni_admm | diverged in 1 of 1 seeds" in bench.summarize(tmp_path)


def test_summary_averages_the_seeds_of_each_contender(bench, tmp_path):
    for seed, accuracy in enumerate((99.1, 99.2, 99.3)):
        folder = tmp_path / f"torch_global_s{seed}"
        folder.mkdir()
        (folder / "result.json").write_text(json.dumps(
            {"contender": "torch_global", "seed": seed, "accuracy": accuracy, "kept": ADMM_KEPT,
             "compression": 71.16, "minutes": 10.0}))
    table = bench.summarize(tmp_path)
    assert "| torch_global | 99.20 +- 0.10 (3) | +0.19 | 71.2x | 100/2000/3600/350 | 10.0 |" in table
    assert "admm" not in table.split("\n", 2)[2]  # no finished ADMM run: no row
