"""Reports of runs whose layers were factorized (Tucker-2, PENNI shared kernels), not pruned: each such layer's row
counts the dense conv it replaced against its factors, and the model's parameters are counted against the dense
model's; ``admmcompress run`` and ``admmcompress report`` write the same figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from admmcompress.cli import main
from admmcompress.drivers.factorize import FactorizeTransform
from admmcompress.report.metrics import measure
from admmcompress.report.render import render_markdown
from admmcompress.report.storage import storage
from admmcompress.structures import SharedKernels, Tucker2

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

LENET5_DENSE = Path(__file__).resolve().parents[2] / "checkpoints" / "lenet5_mnist_dense.safetensors"
# LeNet-5: conv1 1->20 5x5, conv2 20->50 5x5, fc1 800->500, fc2 500->10 (each with a bias)
LENET5_PARAMS = (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
CONV2_DENSE = 50 * 20 * 25


def two_convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3))


def test_a_tucker2_layer_is_counted_as_its_factors_against_the_dense_conv():
    pytest.importorskip("tensorly")
    model = two_convs()
    dense_params = sum(p.numel() for p in model.parameters())  # (8*4*9 + 8) + (6*8*9 + 6) = 734
    FactorizeTransform({"2": Tucker2(ranks=(3, 2))}).apply(model)  # r_out 3, r_in 2
    factors = 8 * 2 + 2 * 3 * 9 + 3 * 6  # first 1x1 8->2, core 3x3 2->3, last 1x1 3->6: 88
    final_params = dense_params - 6 * 8 * 9 + factors  # the bias stays: 390
    assert dense_params == 734 and sum(p.numel() for p in model.parameters()) == final_params == 390

    stats = measure(model, ["0", "2"])
    plain, tucker = stats.layers
    assert (plain.params, plain.kept, plain.factors) == (288, 288, None)
    assert (tucker.name, tucker.type, tucker.shape) == ("2", "Tucker2Conv", [6, 8, 3, 3])
    assert (tucker.params, tucker.kept, tucker.factors) == (6 * 8 * 9, factors, factors)
    assert tucker.factorized == "Tucker-2, ranks 3x2"
    assert tucker.compression == pytest.approx(432 / 88) and tucker.sparsity == 0.0
    assert (stats.total_params, stats.model_params, stats.nonzero_params) == (734, 390, 390)
    assert stats.overall_compression == pytest.approx((288 + 432) / (288 + 88))
    assert stats.compression_all_params == pytest.approx(734 / 390)

    data = stats.to_dict()
    assert (data["total_params"], data["model_params"], data["factorized_layers"]) == (734, 390, 1)
    assert data["layers"][1]["factors"] == 88 and "factors" not in data["layers"][0]
    report = render_markdown({"stats": data})
    assert f"| 2 | Tucker2Conv | 6x8x3x3 | 432 | 88 | factorized (Tucker-2, ranks 3x2) | {432 / 88:.1f}x |" in report
    assert "| **total (pruned and factorized layers)** | | | 720 | 376 | - |" in report
    assert "Factorized, not pruned: 1 layer(s)" in report
    assert (f"Compression over all 734 parameters of the dense model (biases and uncompressed layers included): "
            f"{734 / 390:.1f}x (the model as it ends holds 390 parameters, 390 of them nonzero)") in report
    assert "Tucker2Conv | 6x8x3x3 | 432 | 432 | 0.00% | 1.0x" not in report  # what it said before

    # storage: the factors' rows, not the dense weight they make (nor the factors twice, when layers=None)
    for layers in (["0", "2"], None):
        table = storage(model, layers)
        assert [row.name for row in table.layers] == ["0.weight", "2.first.weight", "2.core.weight", "2.last.weight"]
        # the reductions start from the dense conv the factors replaced, as the layer table's compression does
        assert table.params == 288 + 432 and table.other_params == 8 + 6 and table.factorized == {"2": 432}
        assert table.dense_bits == 32 * (288 + 432) and table.weight_reduction == pytest.approx(720 / 376)
        assert table.storage_reduction() == pytest.approx(32 * 720 / table.bits())  # bits: the rows, the factors'
    assert "the reductions above start from the dense convs they replaced, 432 weights" in render_markdown(
        {"stats": data, "storage": storage(model, ["0", "2"]).to_dict()})


def test_shared_kernels_with_pruned_coefficients_count_the_nonzero_factors():
    model = two_convs()
    FactorizeTransform({"2": SharedKernels(bases=4)}).apply(model)
    with torch.no_grad():
        model[2].coefs.view(-1)[:100] = 0.0  # 100 of the 6*8*4 = 192 coefficients pruned
    factors = 4 * 9 + 192  # basis (4, 3, 3) + coefs (6, 8, 4)
    stats = measure(model, ["2"])
    (row,) = stats.layers
    assert (row.params, row.factors, row.kept) == (432, factors, factors - 100)
    assert row.sparsity == pytest.approx(100 / factors) and row.compression == pytest.approx(432 / 128)
    assert (stats.total_params, stats.model_params) == (734, 734 - 432 + factors)
    assert stats.nonzero_params == 734 - 432 + 128
    report = render_markdown({"stats": stats.to_dict()})
    assert (f"| 2 | SharedKernelConv | 6x8x3x3 | 432 | 128 | factorized (4 shared kernels), "
            f"{100 * 100 / factors:.2f}% of its factor weights zero | {432 / 128:.1f}x |") in report
    assert "| **total (factorized layers)** | | | 432 | 128 | - |" in report


def test_a_pruned_model_has_no_factorized_entries():
    model = two_convs()
    with torch.no_grad():
        model[0].weight[:4] = 0.0
    data = measure(model, ["0"]).to_dict()
    assert "model_params" not in data and "factors" not in data["layers"][0]
    assert list(data["layers"][0]) == ["name", "type", "shape", "params", "kept", "sparsity", "compression"]
    assert "factorized" not in storage(model, ["0"]).to_dict()
    report = render_markdown({"stats": data})
    assert "| 0 | Conv2d | 8x4x3x3 | 288 | 144 | 50.00% | 2.0x |" in report
    assert "| **total (pruned layers)** | | | 288 | 144 | 50.00% | **2.0x** |" in report
    assert "- Compression over all 734 parameters (biases and unpruned layers included): " in report


def run_and_report(tmp_path: Path, stages: list[dict]) -> tuple[str, dict, Path]:
    """A LeNet-5 run from the shipped dense weights; checks that `admmcompress report` writes what it wrote."""
    spec = {
        "name": "factorized", "seed": 0, "threads": 1, "model": {"name": "lenet5"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 128, "test_limit": 64},
        "pretrained": str(LENET5_DENSE), "stages": stages,
    }
    config, out = tmp_path / "run.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    report, metrics = (out / "report.md").read_text(), json.loads((out / "metrics.json").read_text())["metrics"]
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report
    again = json.loads((out / "metrics.json").read_text())["metrics"]
    assert again["stats"] == metrics["stats"] and again["storage"] == metrics["storage"]
    return report, metrics, out


def test_tucker2_run_and_report_count_the_factors_against_the_dense_model(tmp_path, capsys):
    pytest.importorskip("tensorly")
    plan = {"rules": [{"match": "conv1", "structure": "filter", "sparsity": 0.5},
                      {"match": "conv2", "structure": "tucker2", "ranks": [10, 5]}]}
    stage = {"plan": plan, "method": "admm", "admm": {"epochs": 1, "update_every_steps": 1}, "retrain": {"epochs": 1}}
    report, metrics, out = run_and_report(tmp_path, [stage])
    factors = 20 * 5 + 5 * 10 * 25 + 10 * 50  # first 1x1 20->5, core 5x5 5->10, last 1x1 10->50: 1,850
    kept = 10 * 25 + factors  # conv1 keeps 10 of its 20 filters
    final = LENET5_PARAMS - CONV2_DENSE + factors
    weights = load_file(str(out / "model.safetensors"))
    assert sum(t.numel() for t in weights.values() if t.is_floating_point()) == final
    assert int(torch.count_nonzero(weights["conv1.weight"])) == 250

    stats = metrics["stats"]
    conv1, conv2 = stats["layers"]
    assert (conv1["params"], conv1["kept"], conv1["sparsity"]) == (500, 250, 0.5)
    assert conv2 == {"name": "conv2", "type": "Tucker2Conv", "shape": [50, 20, 5, 5], "params": CONV2_DENSE,
                     "kept": factors, "factors": factors, "factorized": "Tucker-2, ranks 10x5", "sparsity": 0.0,
                     "compression": pytest.approx(CONV2_DENSE / factors)}
    assert (stats["total_params"], stats["model_params"], stats["nonzero_params"]) == (
        LENET5_PARAMS, final, final - 250)
    assert stats["overall_compression"] == pytest.approx((500 + CONV2_DENSE) / kept)
    assert stats["compression_all_params"] == pytest.approx(LENET5_PARAMS / (final - 250))
    assert metrics["stages"][0]["overall_compression"] == pytest.approx((500 + CONV2_DENSE) / kept)

    assert "| conv1 | Conv2d | 20x1x5x5 | 500 | 250 | 50.00% | 2.0x |" in report
    assert (f"| conv2 | Tucker2Conv | 50x20x5x5 | 25,000 | 1,850 | factorized (Tucker-2, ranks 10x5) | "
            f"{CONV2_DENSE / factors:.1f}x |") in report
    assert f"| **total (pruned and factorized layers)** | | | 25,500 | {kept:,} | - |" in report
    assert (f"- Compression over all {LENET5_PARAMS:,} parameters of the dense model (biases and uncompressed layers "
            f"included): {LENET5_PARAMS / (final - 250):.1f}x (the model as it ends holds {final:,} parameters, "
            f"{final - 250:,} of them nonzero)") in report
    assert "conv2.core.weight" in report and "| conv2.weight |" not in report  # storage: the factors

    # exports: the packed file and the compacted folder load back from their model spec alone, factors included
    capsys.readouterr()
    assert main(["export", "--packed", str(out), "--out", str(tmp_path / "m.admmpk")]) == 0
    printed = capsys.readouterr().out
    assert "round trip: state dict bit-identical, outputs identical (eval mode)" in printed
    from admmcompress.executors.manifest import load_compacted
    from admmcompress.executors.packed import load_packed
    from admmcompress.run_export import load_run_model

    run_model = load_run_model(out)[0].eval()
    x = torch.randn(4, 1, 28, 28)
    packed = load_packed(tmp_path / "m.admmpk").eval()
    assert type(packed.conv2).__name__ == "Tucker2Conv" and torch.equal(packed(x), run_model(x))
    assert main(["export", "--compact", str(out), "--out", str(tmp_path / "cmp")]) == 0
    compacted = load_compacted(tmp_path / "cmp").eval()
    assert compacted.conv1.out_channels == 10 and compacted.conv2.first.in_channels == 10  # 10 filters went
    assert compacted.conv2.ranks == (10, 5)
    assert torch.allclose(compacted(x), run_model(x), atol=1e-4)


def test_a_penni_run_with_compact_ends_in_a_folder_that_loads_with_its_shared_kernels(tmp_path):
    """A run that factorizes may end in ``compact:`` (it was refused before training until 2026-12-07): the
    compacted model keeps its shared-kernel convs, and its folder loads from the manifest alone."""
    from admmcompress.executors.manifest import load_compacted
    from admmcompress.executors.penni import SharedKernelConv
    from admmcompress.run_export import load_run_model

    filters = {"rules": [{"match": "conv1", "structure": "filter", "sparsity": 0.5}]}
    shared = {"rules": [{"match": "conv2", "structure": "shared_kernels", "bases": 5}]}
    spec = {
        "name": "factorized", "seed": 0, "threads": 1, "model": {"name": "lenet5"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 128, "test_limit": 64},
        "pretrained": str(LENET5_DENSE), "compact": {"samples": 2},
        "stages": [{"plan": filters, "method": "admm", "admm": {"epochs": 0}, "retrain": {"epochs": 0}},
                   {"plan": shared, "method": "penni", "admm": {"epochs": 0}, "retrain": {"epochs": 0}}],
    }
    config, out = tmp_path / "run.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["compaction"]["removed"]["conv1"] == [10, 20]
    assert metrics["compaction"]["params_after"] < metrics["compaction"]["params_before"]
    compacted = load_compacted(out / "compact").eval()
    assert isinstance(compacted.conv2, SharedKernelConv)
    assert (compacted.conv1.out_channels, compacted.conv2.in_channels) == (10, 10)
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(compacted(x), load_run_model(out)[0].eval()(x), atol=1e-4)


def test_penni_run_and_report_count_basis_and_nonzero_coefficients(tmp_path):
    plan = {"rules": [{"match": "conv2", "structure": "shared_kernels", "bases": 5}]}
    stages = [
        {"plan": plan, "method": "penni", "admm": {"epochs": 0}, "retrain": {"epochs": 0}},
        {"plan": plan, "method": "penni", "options": {"l1": 1e-3, "prune_std": 1.0},
         "admm": {"epochs": 1, "update_every_epochs": 1}, "retrain": {"epochs": 0}},
    ]
    report, metrics, out = run_and_report(tmp_path, stages)
    factors = 5 * 25 + 50 * 20 * 5  # basis (5, 5, 5) + coefs (50, 20, 5): 5,125
    weights = load_file(str(out / "model.safetensors"))
    kept = int(torch.count_nonzero(weights["conv2.coefs"])) + int(torch.count_nonzero(weights["conv2.basis"]))
    assert kept < factors  # the second stage pruned coefficients
    final = LENET5_PARAMS - CONV2_DENSE + factors
    (row,) = metrics["stats"]["layers"]
    assert (row["params"], row["factors"], row["kept"], row["factorized"]) == (CONV2_DENSE, factors, kept,
                                                                               "5 shared kernels")
    assert row["compression"] == pytest.approx(CONV2_DENSE / kept)
    stats = metrics["stats"]
    assert (stats["total_params"], stats["model_params"]) == (LENET5_PARAMS, final)
    assert stats["compression_all_params"] == pytest.approx(LENET5_PARAMS / (final - (factors - kept)))
    # stage 1 only decomposed: 25,000 dense weights as 5,125 factor weights
    assert metrics["stages"][0]["overall_compression"] == pytest.approx(CONV2_DENSE / factors)
    assert f"| conv2 | SharedKernelConv | 50x20x5x5 | 25,000 | {kept:,} | factorized (5 shared kernels), " in report
    assert "Factorized, not pruned: 1 layer(s)" in report


def test_packed_codes_the_factors_the_storage_table_counts():
    """The packed file codes the factors (coefficients, basis, Tucker factors) that the storage table counts."""
    import io

    from admmcompress.encoding import weight_tensors
    from admmcompress.executors.packed import load_packed, save_packed_bytes

    def factorized() -> nn.Sequential:
        model = two_convs()
        FactorizeTransform({"0": SharedKernels(bases=4)}).apply(model)
        model[2] = nn.Conv2d(8, 6, 3)  # (a plain conv stays one row)
        return model

    model = factorized()
    with torch.no_grad():
        model[0].coefs.view(-1)[:50] = 0.0
    names = [row.name for row in storage(model).layers]
    assert names == ["0.basis", "0.coefs", "2.weight"] and list(weight_tensors(model)) == names
    restored = load_packed(io.BytesIO(save_packed_bytes(model)), factorized())
    assert all(torch.equal(value, restored.state_dict()[name]) for name, value in model.state_dict().items())


def test_the_training_logs_sparsity_of_a_factorized_layer_is_of_its_factors():
    from admmcompress.train.logging import layer_sparsity

    model = two_convs()
    FactorizeTransform({"0": SharedKernels(bases=4)}).apply(model)
    with torch.no_grad():
        model[0].coefs[:4] = 0  # 4 of 8 output channels' coefficients: 4 * 4 * 4 = 64 of 8 * 4 * 4 + 4 * 9 = 164
    assert layer_sparsity(model, ["0", "2"]) == {"0": pytest.approx(64 / 164), "2": 0.0}


@pytest.mark.parametrize("method", ["magnitude", "reweighted"])
def test_a_method_that_does_not_factorize_refuses_low_rank_targets(tmp_path, capsys, method):
    """magnitude/gradual/reweighted drove a tucker2 target as masks and left the conv dense (silently)."""
    spec = {
        "name": "factorized", "seed": 0, "threads": 1, "model": {"name": "lenet5"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 128, "test_limit": 64},
        "pretrained": str(LENET5_DENSE), "compact": True,
        "stages": [{"plan": {"rules": [{"match": "conv2", "structure": "tucker2", "ranks": [10, 5]},
                                       {"match": "conv1", "structure": "filter", "sparsity": 0.5}]},
                    "method": method, "admm": {"epochs": 1}, "retrain": {"epochs": 1}}],
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"method '{method}' does not factorize layers, so its 'tucker2' targets would stay dense" in err
    assert "compact:" not in err  # the stage is refused for what it is, not for the compaction


def test_a_layer_list_naming_the_factors_too_counts_each_factor_once():
    """weight_layers() lists a Tucker2Conv and its three convs: measure() counts the factors in the layer's row."""
    from admmcompress.encoding import weight_layers

    pytest.importorskip("tensorly")
    model = two_convs()
    FactorizeTransform({"2": Tucker2(ranks=(3, 2))}).apply(model)
    listed = weight_layers(model)
    assert {"2", "2.first", "2.core", "2.last"} <= set(listed)
    assert measure(model, listed).to_dict() == measure(model, ["0", "2"]).to_dict()
