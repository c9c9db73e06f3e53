"""ONNX export of a quantized model: integer weights + DequantizeLinear, checked with ONNX Runtime."""

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from admmcompress.executors.onnx_export import export_onnx, integer_codes, run_onnx  # noqa: E402
from admmcompress.models import create_model  # noqa: E402
from admmcompress.structures.quantization import Clustering, FixedPoint, Ternary  # noqa: E402


def test_integer_codes_reproduce_the_weight_exactly():
    torch.manual_seed(0)  # reported flaky under other tests' RNG state; a fixed input keeps CI deterministic
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
    assert summary.float_weights == ["fc2.weight"]  # clustered: a table of values, no integer grid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet5.onnx"]  # self-contained: no side file
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "DequantizeLinear" for node in graph.node) == 3
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(run_onnx(path, x)[0] - expected).max() < 1e-5


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
    assert main(["export", "--onnx", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "'fc1.weight': 'int8'" in printed and "float weights: none" in printed
    diff = float(printed.rsplit("test inputs: ", 1)[1].split()[0])
    assert diff < 1e-5


