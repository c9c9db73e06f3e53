"""Physical compaction: the compacted model computes what the masked model computes, and is smaller."""

import copy

import pytest
import torch
from structured_helpers import IMAGE_MODELS, random_structured_masks, randomize_norms
from torch import nn

from admmcompress.executors.compact import CompactConfig, CompactionError, compact, count_params
from admmcompress.finalize import hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Channel, Filter


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_compacted_equals_masked_on_every_registered_model(name):
    torch.manual_seed(0)
    model = randomize_norms(create_model(name))
    x = torch.randn(2, *model.input_shape)
    masks = random_structured_masks(model, x)
    result = compact(model, x, masks)
    fresh = torch.randn(3, *model.input_shape)  # not the input the compactor checked itself on
    assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4
    assert result.params_after < result.params_before == count_params(model)
    assert any(removed for removed, _ in result.removed.values())


def test_uniform_half_pruning_has_exactly_the_half_width_models_shapes():
    model = randomize_norms(create_model("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), type="Conv2d")]).resolve_coupled(model, x))
    small = compact(model, x, masks).model
    ideal = create_model("resnet20", width_mult=0.5)
    assert {k: v.shape for k, v in small.state_dict().items()} == {
        k: v.shape for k, v in ideal.state_dict().items()
    }


def test_a_pruned_filter_kept_alive_by_its_residual_group_is_a_clear_error():
    model = randomize_norms(create_model("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    masks = hard_prune(model, Plan({"layers.0.0.conv2": Filter(sparsity=0.5)}).resolve(model))
    with pytest.raises(
        CompactionError, match=r"zero filters in some layers but \['conv1'.*Plan.resolve_coupled"
    ):
        compact(model, x, masks)
    with pytest.warns(RuntimeWarning, match="still compute them"):
        result = compact(model, x, masks, CompactConfig(strict=False))
    assert result.params_after == result.params_before and result.kept


def test_bias_constants_of_pruned_filters_fold_into_unpadded_consumers():
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    x = torch.randn(2, 1, 28, 28)
    masks = hard_prune(
        model, Plan({"conv*": Filter(sparsity=0.5), "fc1": Filter(sparsity=0.5)}).resolve(model)
    )
    assert model.conv1.bias.abs().min() > 0  # the zero filters still output their bias
    result = compact(model, x, masks)
    assert (
        result.model.conv1.out_channels,
        result.model.conv2.out_channels,
        result.model.fc1.out_features,
    ) == (
        10,
        25,
        250,
    )
    assert result.folded == {"conv1": 10, "conv2": 25, "fc1": 250}
    fresh = torch.randn(4, 1, 28, 28)
    assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_a_bn_shift_before_a_padded_conv_cannot_fold_and_says_why():
    model = randomize_norms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1))
    )
    x = torch.randn(2, 3, 10, 10)
    masks = hard_prune(model, Plan({"0": Filter(sparsity=0.5)}).resolve(model))  # BN not pruned with it
    with pytest.raises(CompactionError, match=r"nonzero constant \(bias / BN shift\).*'2' pads its input"):
        compact(model, x, masks)


def test_channel_pruning_of_the_only_consumer_removes_the_producers_filters():
    model = randomize_norms(create_model("vgg16_cifar"))
    x = torch.randn(2, 3, 32, 32)
    masks = hard_prune(model, Plan({"features.3": Channel(sparsity=0.5)}).resolve(model))
    result = compact(model, x, masks)
    assert result.model.features[0].out_channels == 32 and result.model.features[1].num_features == 32


class Branches(nn.Module):
    def __init__(self, grouped: bool = False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 6, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.g = nn.Conv2d(6, 4, 1, groups=2 if grouped else 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = self.g(torch.relu(self.bn2(self.dw(self.c(y)))))
        return self.fc(nn.functional.avg_pool2d(y, 2).flatten(1))


def test_concat_depthwise_and_linear_after_flatten():
    torch.manual_seed(0)
    model = randomize_norms(Branches())
    x = torch.randn(2, 3, 8, 8)
    plan = Plan([Rule(Filter(sparsity=0.5), match=n) for n in ("a", "b", "c", "dw", "g")])
    masks = hard_prune(model, plan.resolve_coupled(model, x))
    result = compact(model, x, masks)
    small = result.model
    assert (small.a.out_channels, small.b.out_channels, small.bn.num_features) == (2, 3, 5)
    assert (small.c.in_channels, small.dw.groups, small.g.in_channels, small.fc.in_features) == (
        5,
        3,
        3,
        2 * 16,
    )
    fresh = torch.randn(3, 3, 8, 8)
    assert (outputs(small, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_grouped_conv_channels_go_evenly_per_conv_group():
    model = randomize_norms(Branches(grouped=True))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # channel 1 of g's first conv group and channel 4 of its second: zero filters + BN
        for ch in (1, 4):
            model.c.weight[ch] = 0
            model.bn2.weight[ch] = 0
            model.bn2.bias[ch] = 0
    result = compact(model, x)
    assert (result.model.g.in_channels, result.model.g.groups, result.model.dw.groups) == (4, 2, 4)
    fresh = torch.randn(3, 3, 8, 8)
    assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_compaction_leaves_the_input_model_alone():
    model = randomize_norms(create_model("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    masks = random_structured_masks(model, x, columns=False)
    before = copy.deepcopy(model.state_dict())
    compact(model, x, masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_column_executor_inside_compaction_keeps_outputs():
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    x = torch.randn(2, 1, 28, 28)
    from admmcompress.structures import Column

    masks = hard_prune(model, Plan({"conv2": Column(sparsity=0.6)}).resolve(model))
    result = compact(model, x, masks, CompactConfig(columns="on"))
    assert type(result.model.conv2).__name__ == "ColumnConv2d"
    assert result.columns["conv2"]["executor"] == "column"
    fresh = torch.randn(3, 1, 28, 28)
    assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_config_is_validated():
    with pytest.raises(ValueError, match="columns='fast' must be one of"):
        CompactConfig(columns="fast")
