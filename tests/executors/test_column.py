"""Column (shape) executors compute only the kept GEMM columns and match the dense layer."""

import pytest
import torch
from torch import nn

from admmcompress.executors.column import ColumnConv2d, ColumnLinear, apply_column_executors, column_executor


def column_pruned_conv(k=3, stride=1, padding=1, dilation=1, keep=0.4, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 5, k, stride, padding, dilation)
    with torch.no_grad():
        conv.weight.mul_((torch.rand(6 * k * k) < keep).view(1, 6, k, k))
    return conv


@pytest.mark.parametrize(
    ("k", "stride", "padding", "dilation"), [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 2), (1, 2, 0, 1)]
)
def test_column_conv_matches_the_dense_conv(k, stride, padding, dilation):
    conv = column_pruned_conv(k, stride, padding, dilation)
    fast = ColumnConv2d.from_conv(conv)
    assert fast.kept.numel() < 6 * k * k and fast.weight.shape == (5, fast.kept.numel())
    for shape in ((1, 6, 9, 11), (4, 6, 8, 8)):
        x = torch.randn(shape)
        torch.testing.assert_close(fast(x), conv(x), atol=1e-5, rtol=1e-5)


def test_column_linear_matches_and_skips_dead_features():
    torch.manual_seed(0)
    linear = nn.Linear(12, 4)
    with torch.no_grad():
        linear.weight[:, ::3] = 0
    fast = ColumnLinear.from_linear(linear)
    x = torch.randn(3, 12)
    assert fast.kept.tolist() == [1, 2, 4, 5, 7, 8, 10, 11]
    torch.testing.assert_close(fast(x), linear(x), atol=1e-6, rtol=1e-6)


def test_layers_without_pruned_columns_or_with_groups_get_no_executor():
    assert column_executor(nn.Conv2d(4, 4, 3)) is None
    assert column_executor(nn.Conv2d(4, 4, 3, groups=2)) is None
    with pytest.raises(ValueError, match="ColumnConv2d needs groups=1"):
        ColumnConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))


def test_apply_column_executors_on_and_auto():
    model = nn.Sequential(column_pruned_conv(keep=0.2), nn.ReLU(), nn.Conv2d(5, 3, 3)).eval()
    x = torch.randn(2, 6, 10, 10)
    with torch.no_grad():
        expected = model(x)
        decisions = apply_column_executors(model, x, mode="auto", rounds=3)
        assert set(decisions) == {"0"} and {"dense_ms", "column_ms", "executor"} <= set(decisions["0"])
        assert isinstance(model[0], ColumnConv2d) == (decisions["0"]["executor"] == "column")
        apply_column_executors(model, x, mode="on")
        assert isinstance(model[0], ColumnConv2d)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mode='fast' must be 'auto' or 'on'"):
        apply_column_executors(model, x, mode="fast")


def test_kept_columns_outside_the_layer_are_refused_when_a_folder_is_loaded(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from admmcompress.executors.manifest import (
        SELF_CHECKSUM,
        ManifestError,
        _write_compacted,
        canonical_sha256,
        load_compacted,
        sha256_hex,
    )

    linear = nn.Linear(6, 3)
    with torch.no_grad():
        linear.weight[:, 1] = 0
    model = nn.Sequential(ColumnLinear.from_linear(linear))
    _write_compacted(model, tmp_path)
    assert torch.equal(load_compacted(tmp_path, nn.Sequential(nn.Linear(6, 3)))[0].kept, model[0].kept)
    state = load_file(tmp_path / "model.safetensors")
    state["0.kept"] = torch.tensor([0, 2, 3, 4, 9])  # 9: past the 6 input features
    save_file(state, tmp_path / "model.safetensors")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    weights = (tmp_path / "model.safetensors").read_bytes()
    manifest["weights"] = {**manifest["weights"], "bytes": len(weights), "sha256": sha256_hex(weights)}
    manifest = {k: v for k, v in manifest.items() if k != SELF_CHECKSUM}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, SELF_CHECKSUM: canonical_sha256(manifest)}))
    with pytest.raises(ManifestError, match="kept columns run outside its 6 columns"):
        load_compacted(tmp_path, nn.Sequential(nn.Linear(6, 3)))
