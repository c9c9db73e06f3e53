"""Models whose weights are in channels-last memory format prune, fold and compact as their contiguous twins."""

import copy

import pytest
import torch
from tests.test_api import SHORT, Residual, data
from torch import nn

from admmcompress import Block, Channel, Column, Filter, Plan, Rule, compress, one_shot
from admmcompress.structures.groups import as_matrix

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


def test_as_matrix_reads_a_channels_last_weight_in_logical_order():
    weight = torch.randn(4, 3, 2, 2)
    last = weight.contiguous(memory_format=torch.channels_last)
    assert not last.is_contiguous()
    assert torch.equal(as_matrix(last), weight.reshape(4, -1))


@pytest.mark.parametrize("structure", [Filter(sparsity=0.5), Column(sparsity=0.5), Channel(sparsity=0.5),
                                       Block(sparsity=0.5, block=(2, 8))], ids=lambda s: type(s).__name__)
def test_one_shot_on_channels_last_weights_matches_the_contiguous_model(structure):
    torch.manual_seed(0)
    model = Residual()
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not last.conv2.weight.is_contiguous()
    plan = Plan({"conv2": structure})
    masks, masks_last = one_shot(model, plan), one_shot(last, plan)
    assert torch.equal(masks["conv2.weight"], masks_last["conv2.weight"])
    assert torch.equal(model.conv2.weight, last.conv2.weight)


def test_compress_and_compact_a_channels_last_model(tmp_path):
    torch.manual_seed(0)
    model = Residual().to(memory_format=torch.channels_last)
    result = compress(model, Plan([Rule(Filter(sparsity=0.5), type="Conv2d")]), data(), data(8, 1),
                      coupling="strict", compact={"samples": 2}, out_dir=tmp_path, **SHORT)
    figures = result.metrics["compaction"]
    assert figures["params_after"] < figures["params_before"] and figures["max_abs_diff"] <= 1e-4
    x = torch.randn(3, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert (result.compacted.eval()(x) - result.model.eval()(x)).abs().max() <= 1e-4


def test_zero_constant_inputs_of_a_channels_last_grouped_conv_fold_as_in_the_contiguous_one():
    from admmcompress.executors.fold import _fold_into

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, groups=2)
    last = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    local, zero = torch.tensor([1, 2]), torch.zeros(2)
    with torch.no_grad():
        assert _fold_into(conv, local, zero) == _fold_into(last, local, zero) == 36  # 2 channels x 2 filters x 9
    assert torch.equal(conv.weight, last.weight) and not last.weight.is_contiguous()
