"""Compacted models saved as a shape manifest + safetensors (the compact executor), rebuilt without the original
widths; ONNX (the onnx executor)."""

import io
import json

import pytest
import torch
from structured_helpers import random_structured_masks, randomize_norms

from admmcompress.executors import get_executor
from admmcompress.executors.compact import CompactConfig, compact
from admmcompress.executors.manifest import load_compacted
from admmcompress.executors.packed import load_packed, save_packed_bytes
from admmcompress.models import create_model

COMPACT = get_executor("compact")


@pytest.fixture(scope="module")
def compacted():
    torch.manual_seed(0)
    model = randomize_norms(create_model("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    result = compact(model, x, random_structured_masks(model, x), CompactConfig(columns="on"))
    return result.model.eval(), x


def test_manifest_round_trip_by_registry_name(compacted, tmp_path):
    model, x = compacted
    COMPACT.save(model, tmp_path, model_spec={"name": "resnet20", "kwargs": {}})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (
        manifest["format"] == "admmcompress.compacted/1" and manifest["layers"]["conv1"]["out_channels"] < 16
    )
    restored = COMPACT.load(tmp_path).eval()  # built from the registry at full width, then reshaped
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    assert restored.state_dict().keys() == model.state_dict().keys()


def test_loading_needs_a_manifest_and_a_skeleton(tmp_path, compacted):
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        load_compacted(tmp_path)
    COMPACT.save(compacted[0], tmp_path)
    with pytest.raises(ValueError, match="names no registered model; pass the skeleton"):
        load_compacted(tmp_path)
    assert load_compacted(tmp_path, create_model("resnet20")) is not None


@pytest.mark.filterwarnings("ignore")
def test_compacted_model_runs_in_onnxruntime_with_the_same_outputs(compacted, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from admmcompress.executors.onnx_export import run_onnx

    model, x = compacted
    COMPACT.save(model, tmp_path, model_spec={"name": "resnet20", "kwargs": {}})
    with torch.no_grad():
        assert torch.equal(COMPACT.load(tmp_path).eval()(x), model(x))
    get_executor("onnx").save(model, tmp_path / "model.onnx", example=x, atol=1e-4)  # checked in onnxruntime
    with torch.no_grad():
        assert abs(run_onnx(tmp_path / "model.onnx", x)[0] - model(x).numpy()).max() <= 1e-4
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.safetensors").is_file()


def test_a_compacted_model_loads_in_eval_mode_whatever_its_skeletons(compacted, tmp_path):
    """Rebuilt layers and a freshly built skeleton start in train mode, where BatchNorms use the batch's statistics
    and every call moves the running ones (reviewers' findings: outputs off by 0.78, then by 4.39 from the
    registry-built model): the loaders give the model back in eval mode, as ``from_pretrained`` does."""
    model, x = compacted
    COMPACT.save(model, tmp_path, model_spec={"name": "resnet20", "kwargs": {}})
    for restored in (COMPACT.load(tmp_path, create_model("resnet20").train()), COMPACT.load(tmp_path)):
        assert not any(m.training for m in restored.modules())
        before = restored.bn1.running_mean.clone()
        with torch.no_grad():
            assert torch.equal(restored(x), model(x))
        assert torch.equal(restored.bn1.running_mean, before)
    dense = create_model("resnet20")
    for skeleton in (create_model("resnet20").train(), None):
        packed = load_packed(io.BytesIO(save_packed_bytes(dense, model_spec={"name": "resnet20"})), skeleton)
        assert not any(m.training for m in packed.modules())
