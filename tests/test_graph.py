"""Channel groups from Torch-Pruning's dependency graph: residual, concat, depthwise, flatten, outputs."""

import pytest
import torch
from torch import nn

from admmcompress.models import create_model
from admmcompress.plan.graph import CONSUMER, DEPTHWISE, NORM, PRODUCER, channel_groups, group_of


def roles(group):
    return {(m.layer, m.role) for m in group.members}


def test_residual_stream_is_one_group_with_every_producer_and_consumer():
    model = create_model("resnet20")
    groups = channel_groups(model, torch.zeros(1, 3, 32, 32))
    stream = group_of(groups, "layers.0.0.conv2", (PRODUCER,))
    assert sorted(stream.producers) == ["conv1", "layers.0.0.conv2", "layers.0.1.conv2", "layers.0.2.conv2"]
    assert {"layers.1.0.conv1", "layers.1.0.shortcut.0", "layers.0.1.conv1"} <= set(stream.consumers)
    assert ("bn1", NORM) in roles(stream) and stream.size == 16 and not stream.problems
    inner = group_of(groups, "layers.0.0.conv1", (PRODUCER,))
    assert roles(inner) == {
        ("layers.0.0.conv1", PRODUCER),
        ("layers.0.0.bn1", NORM),
        ("layers.0.0.conv2", CONSUMER),
    }


def test_model_outputs_are_never_a_removable_group():
    model = create_model("resnet20")
    groups = channel_groups(model, torch.zeros(1, 3, 32, 32))
    out = [g for g in groups if g.root == "linear"]
    assert out and "model outputs" in out[0].problems[0]


class Branches(nn.Module):
    """Concat of two convs, BN, a grouped conv, a depthwise conv and a Linear after flatten."""

    input_shape = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.g = nn.Conv2d(6, 4, 1, groups=2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = self.g(torch.relu(self.dw(self.c(y))))
        return self.fc(nn.functional.avg_pool2d(y, 2).flatten(1))


def test_concat_maps_each_branch_to_its_slice_of_the_consumer():
    groups = channel_groups(Branches(), torch.zeros(1, 3, 8, 8))
    b = group_of(groups, "b", (PRODUCER,))
    consumer = next(m for m in b.members if m.layer == "c")
    assert consumer.local == (4, 5, 6, 7, 8, 9) and consumer.root == (0, 1, 2, 3, 4, 5)


def test_depthwise_joins_its_producer_and_grouped_conv_splits_it_into_blocks():
    groups = channel_groups(Branches(), torch.zeros(1, 3, 8, 8))
    c = group_of(groups, "c", (PRODUCER,))
    assert ("dw", DEPTHWISE) in roles(c)
    assert not c.problems and c.grouped == [("g", 2)] and c.blocks == (0, 0, 0, 1, 1, 1)
    g = next(m for m in c.members if m.layer == "g")
    assert g.role == CONSUMER and g.groups == 2


def test_flatten_maps_one_channel_to_many_linear_columns():
    model = create_model("lenet5")
    groups = channel_groups(model, torch.zeros(1, 1, 28, 28))
    conv2 = group_of(groups, "conv2", (PRODUCER,))
    fc1 = next(m for m in conv2.members if m.layer == "fc1")
    assert len(fc1.local) == 800 and fc1.root[:16] == (0,) * 16 and fc1.root[16] == 1


def test_unknown_op_is_reported_not_assumed_channelwise():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x):
            return self.b(torch.erf(self.a(x)))

    groups = channel_groups(Odd(), torch.zeros(2, 3, 8, 8))
    a = group_of(groups, "a", (PRODUCER,))
    assert any("op 'Erf' (feeding 'b') is not known" in p and "register_channelwise_op('Erf')" in p
               for p in a.problems)
    again = channel_groups(Odd(), torch.zeros(2, 3, 8, 8), extra_channelwise_ops=("Erf",))
    assert not group_of(again, "a", (PRODUCER,)).problems


class _Cube(torch.autograd.Function):  # a user's own activation: autograd names its node "_CubeBackward"
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class _CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        return self.b(_Cube.apply(self.a(x)))


def test_a_registered_op_is_channelwise_for_every_later_trace(tmp_path):
    """Declared once, a user's op reaches the paths that take no extra_channelwise_ops argument: compress(), run
    configs (through a plugin) and compaction; the cache of traced groups does not serve the old answer."""
    from admmcompress import Filter, Plan, Rule, compact, hard_prune
    from admmcompress.plan import PlanError, register_channelwise_op, unregister_channelwise_op

    torch.manual_seed(0)
    model, x = _CubeNet().eval(), torch.randn(2, 3, 8, 8)
    plan = Plan([Rule(Filter(sparsity=0.5), match="a")])
    with pytest.raises(PlanError, match="op '_Cube' .*register_channelwise_op\\('_Cube'\\)"):
        plan.resolve_coupled(model, x)
    register_channelwise_op("_CubeBackward", keeps_zero=True)
    try:
        result = compact(model, x, hard_prune(model, plan.resolve_coupled(model, x)))
        assert result.model.a.out_channels == 4 and result.max_abs_diff <= 1e-5
    finally:
        unregister_channelwise_op("_CubeBackward")  # the suffix is stripped on the way out too
    with pytest.raises(PlanError, match="op '_Cube'"):
        plan.resolve_coupled(model, x)


@pytest.mark.parametrize("name, problem", [("Mm", "combines or moves channels"), ("PixelShuffle", "combines"),
                                           ("", "not an autograd op name"), (3, "not an autograd op name")])
def test_registering_a_mixing_or_malformed_op_is_one_line(name, problem):
    from admmcompress.plan import register_channelwise_op

    with pytest.raises(ValueError, match=problem) as err:
        register_channelwise_op(name)
    assert "\n" not in str(err.value)


def test_tracing_restores_the_training_mode():
    model = create_model("resnet20").train()
    channel_groups(model, torch.zeros(1, 3, 32, 32))
    assert all(m.training for m in model.modules())


def test_a_batch_of_one_is_traced_as_a_batch():
    """Torch-Pruning's default call would unpack a (1, C, H, W) tensor into one unbatched sample."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 3))
    groups = channel_groups(model, torch.randn(1, 3, 8, 8))
    assert groups[0].ops == ["Relu"] and not groups[0].problems


def test_each_layer_role_belongs_to_exactly_one_group():
    from collections import Counter

    for name in ("mobilenetv2_cifar", "resnet20", "lenet5"):
        model = create_model(name)
        groups = channel_groups(model, torch.zeros(1, *model.input_shape))
        seen = Counter((m.layer, m.role) for g in groups for m in g.members)
        assert max(seen.values()) == 1, name


class _Flip(torch.autograd.Function):  # reverses the channel order: not per channel, whatever a user declares
    @staticmethod
    def forward(ctx, x):
        return x.flip(1)

    @staticmethod
    def backward(ctx, grad):
        return grad.flip(1)


class _FlipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(_Flip.apply(self.a(x)))))


def test_an_output_mismatch_names_the_first_layer_whose_output_differs():
    """The error named no layer; it now points at the first layer (in execution order) that keeps its width and
    gives another output, here the conv after the wrongly declared op."""
    from admmcompress import Filter, Plan, Rule, compact, hard_prune
    from admmcompress.executors.compact import CompactConfig, CompactionError

    torch.manual_seed(0)
    model, x = _FlipNet().eval(), torch.randn(2, 3, 4, 4)
    targets = Plan([Rule(Filter(sparsity=0.5), match="a")]).resolve_coupled(model, x,
                                                                            extra_channelwise_ops=("_Flip",))
    masks = hard_prune(model, targets)
    with pytest.raises(CompactionError, match=r"first at the output of 'b' \(Conv2d, by "):
        compact(model, x, masks, CompactConfig(extra_channelwise_ops=("_Flip",)))
