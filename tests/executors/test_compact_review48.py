"""Review 48: compaction, purification, column executors and compacted-model files (each test failed before its fix)."""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.executors import get_executor
from admmcompress.executors.column import ColumnConv2d, ColumnLinear, apply_column_executors
from admmcompress.executors.compact import CompactConfig, compact
from admmcompress.executors.purify import purify
from admmcompress.finalize import MaskSet


def test_constant_ffn_units_fold_when_the_linear_reads_a_sequence() -> None:
    """A Linear fed (batch, sequence, features): its channels are the last dim (dim 1 was read: an IndexError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[:6] = 0
        model[0].bias[:6] = 0.3  # six units output the constant relu(0.3): folded into the next bias
    x = torch.randn(2, 5, 8)
    result = compact(model, x)
    assert result.model[0].out_features == 10 and result.folded == {"0": 6}
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5)


class _DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.b(torch.relu(self.a(x)))}


def test_purify_checks_a_model_that_returns_a_dict() -> None:
    """The output check read a dict's keys, so it saw no tensor and every change was 0."""
    torch.manual_seed(0)
    model = _DictOutput()
    with torch.no_grad():
        model.a.weight[2] *= 1e-3
    masks = MaskSet()
    masks.masks["a.weight"] = torch.ones_like(model.a.weight, dtype=torch.bool)
    report = purify(model, torch.randn(4, 6), masks, threshold=0.1)
    assert report.passes[0].filters == {"a": 1}
    assert report.passes[0].max_output_change > 0


def test_purify_zeroes_a_channels_last_weight_when_it_reports() -> None:
    """reshape copies a channels-last weight: the weak filter was zeroed only at the end, its change reported 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).to(memory_format=torch.channels_last)
    with torch.no_grad():
        model[0].weight[1] *= 1e-3
    masks = MaskSet()
    masks.masks["0.weight"] = torch.ones_like(model[0].weight, dtype=torch.bool)
    report = purify(model, torch.randn(2, 3, 8, 8), masks, threshold=0.1)
    assert report.passes[0].max_output_change > 0 and bool((model[0].weight[1] == 0).all())


def test_column_executors_keep_the_layer_dtype() -> None:
    conv = nn.Conv2d(4, 3, 3, padding=1).double()
    linear = nn.Linear(6, 3).double()
    with torch.no_grad():
        conv.weight[:, :, 0, :] = 0
        linear.weight[:, :2] = 0
    x, v = torch.randn(1, 4, 5, 5, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    fast_conv, fast_linear = ColumnConv2d.from_conv(conv), ColumnLinear.from_linear(linear)
    assert fast_conv.weight.dtype == fast_linear.weight.dtype == torch.float64
    assert torch.allclose(fast_conv(x), conv(x)) and torch.allclose(fast_linear(v), linear(v))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), conv).double().eval()
    result = compact(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), config=CompactConfig(columns="on"))
    assert result.columns["2"]["executor"] == "column"


class _Spare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.spare = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def test_auto_columns_keep_a_layer_the_example_does_not_call() -> None:
    """mode='auto' timed every candidate on its captured input: an uncalled layer was a KeyError."""
    model = _Spare()
    with torch.no_grad():
        model.a.weight[:, :3] = 0
        model.spare.weight[:, :3] = 0
    decisions = apply_column_executors(model, torch.randn(4, 6), mode="auto", rounds=1)
    assert decisions["spare"]["executor"] == "dense" and isinstance(model.spare, nn.Linear)


def test_compacted_float64_model_loads(tmp_path) -> None:
    """Layers were built in float32, so a float64 (or half) compacted model was refused as another architecture."""
    executor = get_executor("compact")
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1)).double().eval()
    executor.save(model, tmp_path)
    skeleton = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    restored = executor.load(tmp_path, skeleton)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert restored[0].weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
