"""ONNX export of a quantized model: integer weights + DequantizeLinear, checked with ONNX Runtime."""

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from admmcompress.executors.onnx_export import (  # noqa: E402
    codebook_indices,
    export_onnx,
    integer_codes,
    run_onnx,
)
from admmcompress.models import create_model  # noqa: E402
from admmcompress.report.integrity import record_output_checksums  # noqa: E402
from admmcompress.structures.quantization import Clustering, FixedPoint, Ternary  # noqa: E402


def test_integer_codes_reproduce_the_weight_exactly():
    torch.manual_seed(0)  # deterministic input; test_integer_codes_hold_for_any_rng_state covers others
    w = FixedPoint(bits=4).project(torch.randn(20, 30))
    codes, scale = integer_codes(w)
    assert codes.dtype.name == "int8"
    assert torch.equal(torch.tensor(scale, dtype=torch.float32) * torch.from_numpy(codes).float(), w)
    wide = 0.1 * torch.tensor([-128.0, -3.0, 1.0, 128.0])  # 8-bit fixed point uses codes up to +-128
    codes, scale = integer_codes(wide)
    assert codes.dtype.name == "int16" and codes.tolist() == [-128, -3, 1, 128]
    assert scale == pytest.approx(0.1)
    assert integer_codes(torch.randn(5, 5)) is None  # float weights have no grid


@pytest.mark.filterwarnings("ignore")
def test_quantized_lenet5_runs_in_onnxruntime_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    with torch.no_grad():
        model.conv1.weight.copy_(FixedPoint(bits=8).project(model.conv1.weight))
        w = model.conv2.weight * (torch.rand_like(model.conv2.weight) < 0.3)
        model.conv2.weight.copy_(FixedPoint(bits=4).project(w))
        model.fc1.weight.copy_(Ternary().project(model.fc1.weight))
        model.fc2.weight.copy_(Clustering(clusters=4).project(model.fc2.weight))
    x = torch.randn(3, 1, 28, 28)
    path = tmp_path / "lenet5.onnx"
    summary = export_onnx(model, (x,), path)
    assert summary.quantized == {"conv1.weight": "int16", "conv2.weight": "int8", "fc1.weight": "int8"}
    # Clustered: a table of values on no integer grid: uint8 indices + Gather from the codebook.
    assert summary.codebook == {"fc2.weight": "uint8 K=4"} and summary.float_weights == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet5.onnx"]  # self-contained: no side file
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "DequantizeLinear" for node in graph.node) == 3
    assert sum(node.op_type == "Gather" for node in graph.node) == 1
    # The batch dimension is dynamic: any batch size runs, with the model's outputs.
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for batch in (3, 1, 17):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = model(x).numpy()
        out = run_onnx(path, x)[0]
        assert out.shape == (batch, 10) and abs(out - expected).max() < 1e-5


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_integer_codes_hold_for_any_rng_state(bits):
    # The flaky report could not be reproduced (40,000 seeds of the test above): levels are formed
    # as float32(q) * c, so the grid search finds float32(q) exactly. Many states, every width here.
    generator = torch.Generator().manual_seed(bits)
    for _ in range(40):
        w = FixedPoint(bits=bits).project(torch.randn(20, 30, generator=generator))
        codes, scale = integer_codes(w)
        assert torch.equal(torch.tensor(scale, dtype=torch.float32) * torch.from_numpy(codes).float(), w)
    # Interval exactly on a float32 binade boundary, and the float just below it.
    for q in (torch.tensor(2.0**-5), torch.nextafter(torch.tensor(2.0**-5), torch.tensor(0.0))):
        w = q * torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1) + 1, dtype=torch.float32)
        codes, scale = integer_codes(w)
        assert torch.equal(torch.tensor(scale, dtype=torch.float32) * torch.from_numpy(codes).float(), w)


def test_codebook_indices_reproduce_the_weight_exactly():
    torch.manual_seed(0)
    w = Clustering(clusters=5).project(torch.randn(30, 40) * (torch.rand(30, 40) < 0.5))
    indices, table = codebook_indices(w)
    assert indices.dtype.name == "uint8" and table.size == 6  # 5 centroids and the pruned zero
    assert torch.equal(torch.from_numpy(table)[torch.from_numpy(indices).long()], w)
    assert codebook_indices(torch.randn(8, 8)) is None  # 64 distinct floats: a table would be larger
    wide = (torch.arange(10_000) % 1000).float().reshape(100, 100) * 0.37  # 1000 values, 10 times each
    assert codebook_indices(wide)[0].dtype.name == "uint16"


@pytest.mark.filterwarnings("ignore")
def test_static_batch_and_a_batch_of_one_example(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet300100").eval()
    with torch.no_grad():
        model.fc1.weight.copy_(Ternary().project(model.fc1.weight))
    one = torch.randn(1, 1, 28, 28)
    dynamic = export_onnx(model, (one,), tmp_path / "dynamic.onnx")  # traced at batch 2, runs at any
    assert dynamic.dynamic_batch
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert abs(run_onnx(tmp_path / "dynamic.onnx", x)[0] - model(x).numpy()).max() < 1e-5
        assert abs(run_onnx(tmp_path / "dynamic.onnx", one)[0] - model(one).numpy()).max() < 1e-5
    static = export_onnx(model, (one,), tmp_path / "static.onnx", dynamic_batch=False)
    assert not static.dynamic_batch
    assert onnx.load(str(tmp_path / "static.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


@pytest.mark.filterwarnings("ignore")
def test_cli_export_onnx_checks_against_onnxruntime(tmp_path, capsys):
    from admmcompress.cli import main
    from admmcompress.train import checkpoint as ckpt

    torch.manual_seed(0)
    model = create_model("lenet300100")
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.fc3):
            layer.weight.copy_(FixedPoint(bits=2).project(layer.weight))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "model: {name: lenet300100}\ndata: {dataset: mnist}\npretrained: dense.safetensors\nstages: []\n"
    )
    ckpt.save_tensors(run / "model.safetensors", model.state_dict())
    ckpt.save_tensors(run / "masks.safetensors", {})  # a run without pruning stages writes no masks, but the file
    (run / "metrics.json").write_text('{"metrics": {}, "history": []}')  # a finished run's: export verifies it
    record_output_checksums(run)
    assert main(["export", "--onnx", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "'fc1.weight': 'int8'" in printed and "float weights: none" in printed
    assert "dynamic batch: True" in printed and "batches of 8 and 1" in printed
    diff = float(printed.strip().rsplit(": ", 1)[1])
    assert diff < 1e-5




def test_a_model_over_protobufs_limit_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    """The limit is 2 GiB; lowered here to a LeNet-300-100's size so the test stays small."""
    from admmcompress.executors import onnx_export

    monkeypatch.setattr(onnx_export, "MAX_ONNX_BYTES", 100_000)  # the model is about 1 MiB
    model = create_model("lenet300100").eval()
    with pytest.raises(ValueError) as err:
        export_onnx(model, (torch.randn(1, 1, 28, 28),), tmp_path / "big.onnx")
    message = str(err.value)
    assert message.startswith("ONNX export: the model is 0.00 GiB as one ONNX file, over protobuf's 2 GiB limit")
    assert "--compact" in message and "\n" not in message and not any(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore")
def test_a_pruned_models_weights_are_stored_sparse_and_run_the_same(tmp_path):
    """A pruned, unquantized layer has one distinct value per nonzero: it was written as a uint16 codebook, 2 bytes
    per weight (898 KB against the packed file's 34 KB in a user review); its nonzeros and their positions are
    smaller. The same for the codes of a sparse quantized layer and the indices of a pruned clustered one."""
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    with torch.no_grad():
        model.fc1.weight.mul_(torch.rand_like(model.fc1.weight) < 0.02)  # 98% pruned, float
        conv2 = model.conv2.weight * (torch.rand_like(model.conv2.weight) < 0.05)
        model.conv2.weight.copy_(FixedPoint(bits=7).project(conv2))  # 95% pruned, int8 codes
        fc2 = model.fc2.weight * (torch.rand_like(model.fc2.weight) < 0.05)
        model.fc2.weight.copy_(Clustering(clusters=4).project(fc2))  # 95% pruned, 4 shared values
    x = torch.randn(3, 1, 28, 28)
    summary = export_onnx(model, (x,), tmp_path / "sparse.onnx")
    assert set(summary.sparse) == {"fc1.weight", "conv2.weight", "fc2.weight"}
    assert summary.quantized == {"conv2.weight": "int8"} and summary.codebook == {"fc2.weight": "uint8 K=5"}
    assert "fc1.weight" in summary.float_weights and "conv1.weight" not in summary.sparse  # dense stays dense
    graph = onnx.load(str(tmp_path / "sparse.onnx")).graph
    assert {t.values.name for t in graph.sparse_initializer} == {"fc1.weight", "conv2.weight_quantized",
                                                                 "fc2.weight_indices"}
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(run_onnx(tmp_path / "sparse.onnx", x)[0] - expected).max() < 1e-5
    nonzeros = sum(int(torch.count_nonzero(getattr(model, n).weight)) for n in ("fc1", "conv2", "fc2"))
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert (tmp_path / "sparse.onnx").stat().st_size < 0.2 * dense_bytes  # fc1 alone is 94% of the weights
    assert nonzeros * 9 < (tmp_path / "sparse.onnx").stat().st_size


def test_codebook_indices_put_zero_first():
    w = torch.tensor([[-0.5, 0.0, 0.25], [0.0, 0.25, -0.5]])
    indices, table = codebook_indices(w)
    assert table[0] == 0.0 and sorted(table.tolist()) == [-0.5, 0.0, 0.25]
    assert torch.equal(torch.from_numpy(table)[torch.from_numpy(indices).long()], w)
    assert (indices == 0).sum() == 2


@pytest.mark.filterwarnings("ignore")
def test_a_file_with_sparse_weights_passes_onnx_shape_inference(tmp_path):
    """The exporter's value_info declared a sparse-stored weight dense: shape inference failed (a review's finding)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) < 0.1)
        model[2].weight.zero_()
    summary = export_onnx(model, (torch.randn(2, 16),), tmp_path / "m.onnx")
    assert set(summary.sparse) == {"0.weight", "2.weight"}
    onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "m.onnx")), strict_mode=True)


def test_a_quantized_conv_before_batchnorm_keeps_its_integer_weights(tmp_path):
    """The exporter's optimizer folded BatchNorm into the conv, so no initializer equalled the quantized weight and
    it was written dense in float32; exported unoptimized, BatchNormalization stays and the conv is int8."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(FixedPoint(bits=4).project(model[0].weight))
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    summary = export_onnx(model, (x,), tmp_path / "m.onnx")
    assert summary.quantized["0.weight"] == "int8"  # (BatchNorm's all-ones scale is on a grid too)
    assert torch.allclose(torch.from_numpy(run_onnx(tmp_path / "m.onnx", x)[0]), model(x), atol=1e-5)
