"""Coupling on sequence inputs: a Linear fed (batch, sequence, features), i.e. every transformer FFN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.executors.compact import compact
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.structures import Filter


class FFN(nn.Module):
    """Pre-norm-free transformer FFN with its residual and LayerNorm."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 16, bias=bias)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


@pytest.mark.parametrize("bias", [True, False])
def test_ffn_hidden_units_compact_exactly_on_3d_inputs(bias):
    torch.manual_seed(0)
    model = FFN(bias).eval()
    x = torch.randn(2, 5, 16)
    targets = Plan([Rule(Filter(sparsity=0.5), match="fc1")]).resolve_coupled(model, x)
    assert [t.members for t in targets] == [("fc1", "fc2")]
    masks = hard_prune(model, targets)
    small = compact(model, x, masks).model
    assert small.fc1.out_features == 16 and small.fc2.in_features == 16
    for shape in [(2, 5, 16), (3, 7, 16)]:  # another batch and sequence length
        y = torch.randn(shape)
        torch.testing.assert_close(small(y), model(y), atol=1e-5, rtol=0)


class AddmmLayer(nn.Module):
    """A GEMM layer that is not an nn.Linear (weight stored (in, out), like GPT-2's Conv1D)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return flat.view(*x.shape[:-1], -1)


def test_a_matrix_product_outside_a_linear_still_blocks_the_group():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), AddmmLayer(16, 4))
    with pytest.raises(PlanError, match="op 'Addmm' mixes or moves channels") as err:
        Plan([Rule(Filter(sparsity=0.5), match="0")]).resolve_coupled(model, torch.randn(2, 3, 8))
    assert "extra_channelwise_ops" not in str(err.value)  # not offered: a matrix product is not channelwise


def padded(value: float) -> nn.Module:
    pad = nn.ZeroPad2d((1, 0, 1, 0)) if value == 0 else nn.ConstantPad2d((1, 0, 1, 0), value)
    return nn.Sequential(nn.Conv2d(3, 8, 1), pad, nn.Conv2d(8, 8, 2, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_zero_padding_modules_are_channelwise_and_compact_exactly():
    torch.manual_seed(0)
    model = padded(0.0).eval()
    x = torch.randn(2, 3, 6, 6)
    targets = Plan([Rule(Filter(sparsity=0.5), match="0")]).resolve_coupled(model, x, mode="extend")
    small = compact(model, x, hard_prune(model, targets)).model
    assert small[0].out_channels == 4 and small[2].groups == 4
    y = torch.randn(3, 3, 9, 9)
    torch.testing.assert_close(small(y), model(y), atol=1e-5, rtol=0)


def test_padding_with_a_nonzero_value_still_blocks_the_group():
    with pytest.raises(PlanError, match="op 'ConstantPadNd' .*is not known to act on each channel separately"):
        Plan([Rule(Filter(sparsity=0.5), match="0")]).resolve_coupled(padded(1.0), torch.randn(2, 3, 6, 6))
