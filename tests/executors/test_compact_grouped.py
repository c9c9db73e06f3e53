"""Grouped (not depthwise) convolutions: coupled targets keep every conv group equal, compaction keeps ``groups``."""

import copy

import pytest
import torch
from structured_helpers import random_structured_masks, randomize_norms
from torch import nn

from admmcompress.drivers.admm import ADMM
from admmcompress.drivers.magnitude import GradualMagnitude
from admmcompress.executors import get_executor
from admmcompress.executors.compact import CompactConfig, CompactionError, compact, even_blocks
from admmcompress.executors.manifest import load_compacted
from admmcompress.executors.purify import remove_unused_paths
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.plan.graph import channel_groups, channel_index, group_of
from admmcompress.structures import Filter
from admmcompress.structures.block import BlockFilter

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


class ResNeXtBlock(nn.Module):
    """1x1 -> 3x3 grouped (cardinality ``groups``) -> 1x1, BN after each, residual add (projection if needed)."""

    def __init__(self, cin: int, width: int, cout: int, groups: int = 4, stride: int = 1, bias: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class TinyResNeXt(nn.Module):
    """Stem, two ResNeXt blocks (groups=4; the second strided with a projection shortcut), pool, Linear."""

    input_shape = (3, 8, 8)

    def __init__(self, groups: int = 4):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b1 = ResNeXtBlock(16, 16, 16, groups)
        self.b2 = ResNeXtBlock(16, 32, 32, groups, stride=2, bias=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))


class Nested(nn.Module):
    """Two grouped convs back to back (groups 2 then 4, or 2 then 3): their conv groups split one channel space."""

    def __init__(self, second: int = 4):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.g1 = nn.Conv2d(12, 12, 3, padding=1, groups=2)
        self.g2 = nn.Conv2d(12, 12, 1, groups=second)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.g2(torch.relu(self.g1(torch.relu(self.a(x)))))))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def grouped_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}


def kept_per_conv_group(conv: nn.Conv2d) -> tuple[list[int], list[int]]:
    """Nonzero output filters and nonzero input channels in each conv group of a (masked) grouped conv."""
    w = conv.weight.detach()
    rows = (w.reshape(w.shape[0], -1) != 0).any(dim=1).view(conv.groups, -1).sum(dim=1).tolist()
    inputs = w.reshape(-1)[channel_index(w.shape, 1, conv.groups)]
    cols = (inputs != 0).any(dim=1).view(conv.groups, -1).sum(dim=1).tolist()
    return rows, cols


def coupled_masks(model: nn.Module, x: torch.Tensor, sparsity: float, mode: str = "strict", match: str = "*"):
    targets = Plan([Rule(Filter(sparsity=sparsity), match=match, type="Conv2d")]).resolve_coupled(model, x, mode)
    return targets, hard_prune(model, targets)


def test_channel_index_reads_grouped_conv_columns_per_conv_group():
    w = torch.arange(4 * 2).view(4, 2, 1, 1)  # conv(4 -> 4, groups=2): conv group 0 = inputs 0, 1
    assert w.reshape(-1)[channel_index(w.shape, 1, 2)].tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert channel_index(w.shape, 1).tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_the_graph_records_each_grouped_convs_conv_groups_as_blocks():
    groups = channel_groups(TinyResNeXt(), torch.zeros(2, 3, 8, 8))
    into = group_of(groups, "b1.conv1", ("producer",))
    out = group_of(groups, "b2.conv2", ("producer",))
    assert into.blocks == tuple(i // 4 for i in range(16)) and into.grouped == [("b1.conv2", 4)]
    assert out.blocks == tuple(i // 8 for i in range(32)) and not out.problems
    assert not group_of(groups, "stem", ("producer",)).blocks  # no grouped conv in the residual stream


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_coupled_targets_keep_the_same_count_in_every_conv_group(sparsity):
    torch.manual_seed(0)
    model = randomize_norms(TinyResNeXt())
    x = torch.randn(2, 3, 8, 8)
    targets, masks = coupled_masks(model, x, sparsity)
    assert {type(t.structure).__name__ for t in targets if t.layer in ("b1.conv1", "b2.conv2")} == {"BlockFilter"}
    for name, conv in grouped_convs(model).items():
        rows, cols = kept_per_conv_group(conv)
        per = conv.out_channels // conv.groups
        assert rows == [max(1, round(per * (1 - sparsity)))] * conv.groups, name
        assert len(set(cols)) == 1, name
    result = compact(model, x, masks)
    for name, conv in grouped_convs(model).items():
        small = dict(result.model.named_modules())[name]
        assert small.groups == conv.groups and small.out_channels < conv.out_channels, name
    fresh = torch.randn(4, 3, 8, 8)
    assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_structured_masks_through_coupled_targets_compact_with_the_same_outputs(seed):
    torch.manual_seed(seed)
    model = randomize_norms(TinyResNeXt(), seed)
    with torch.no_grad():  # scramble norms so each conv group's top channels differ between groups
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand(m.weight.shape[0], 1, 1, 1) * 2)
    x = torch.randn(2, 3, 8, 8)
    sparsity = (0.3, 0.5, 0.6)[seed]
    masks = random_structured_masks(model, x, sparsity=sparsity)
    result = compact(model, x, masks)
    small = dict(result.model.named_modules())
    assert all(small[n].groups == 4 and small[n].out_channels < m.out_channels for n, m in grouped_convs(model).items())
    assert result.params_after < result.params_before
    masked = copy.deepcopy(model)
    masks.apply(masked)
    fresh = torch.randn(4, 3, 8, 8)
    assert (outputs(result.model, fresh) - outputs(masked, fresh)).abs().max() <= 1e-4


def test_admm_and_gradual_magnitude_through_grouped_targets_are_compactable():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 10, (8,))
    for driver in ("admm", "gradual"):
        model = randomize_norms(TinyResNeXt()).train()
        targets = Plan([Rule(Filter(sparsity=0.5), type="Conv2d")]).resolve_coupled(model, x[:2])
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        if driver == "admm":
            admm = ADMM(model, targets, rho=1e-2)
            for _ in range(2):
                loss = nn.functional.cross_entropy(model(x), y) + admm.penalty()
                opt.zero_grad()
                loss.backward()
                opt.step()
                admm.step()
            masks = admm.finalize()
        else:
            gradual = GradualMagnitude(model, targets, updates=3)
            for _ in range(3):
                gradual.step()
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                gradual.masks.apply(model)
            masks = gradual.finalize()
        model.eval()
        for name, conv in grouped_convs(model).items():
            rows, cols = kept_per_conv_group(conv)
            assert len(set(rows)) == 1 and len(set(cols)) == 1, (driver, name, rows, cols)
        result = compact(model, x[:2], masks)
        fresh = torch.randn(3, 3, 8, 8)
        assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4, driver


def test_block_filter_is_the_per_block_top_k():
    w = torch.tensor([[0.1, 0.0], [3.0, 0.0], [2.0, 0.0], [0.2, 0.0], [0.5, 0.0], [0.4, 0.0]])
    s = BlockFilter(sparsity=0.5, blocks=(0, 0, 1, 1, 2, 2))
    assert s.project(w)[:, 0].tolist() == [0.0, 3.0, 2.0, 0.0, 0.5, 0.0]
    assert s.kept_groups(w) == 3 and s.with_sparsity(0.1).blocks == s.blocks
    with pytest.raises(ValueError, match="6 block ids for a matrix with 2 rows"):
        s.support(w[:2])


def test_even_blocks_removes_the_same_count_from_every_block_and_keeps_one():
    blocks = (0, 0, 0, 1, 1, 1)
    removable = torch.tensor([True, True, True, False, True, True])
    pruned = torch.tensor([False, True, True, False, False, True])
    assert even_blocks(blocks, removable, pruned).tolist() == [False, True, True, False, True, True]
    assert even_blocks(blocks, torch.ones(6, dtype=torch.bool), pruned).sum() == 4  # one kept per block


def test_nested_grouped_convs_prune_on_the_common_refinement():
    torch.manual_seed(0)
    model = Nested(second=4).eval()
    x = torch.randn(2, 3, 8, 8)
    groups = channel_groups(model, x)
    assert group_of(groups, "g1", ("producer",)).blocks == tuple(i // 3 for i in range(12))
    _, masks = coupled_masks(model, x, 0.5, match="[ag]*")
    result = compact(model, x, masks)
    assert (result.model.g1.groups, result.model.g2.groups) == (2, 4)
    assert result.model.g1.out_channels == result.model.g2.in_channels == 8  # round(3 * 0.5) = 2 per block
    fresh = torch.randn(3, 3, 8, 8)
    assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_grouped_convs_that_do_not_nest_are_a_plan_error_naming_both():
    model = Nested(second=3)
    with pytest.raises(PlanError, match=r"grouped convs 'g1' \(groups=2\), 'g2' \(groups=3\) split .* do not nest"):
        Plan([Rule(Filter(sparsity=0.5), match="[ag]*")]).resolve_coupled(model, torch.zeros(2, 3, 8, 8))


def test_user_masks_with_unequal_counts_per_conv_group_are_a_clear_error():
    torch.manual_seed(0)
    model = randomize_norms(TinyResNeXt())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # 3 channels of conv group 0 and 1 of conv group 1 pruned with their BN
        for c in (0, 1, 2, 5):
            model.b1.conv1.weight[c] = 0
            model.b1.bn1.weight[c] = 0
            model.b1.bn1.bias[c] = 0
    with pytest.raises(
        CompactionError,
        match=r"channels \[0, 1, 2, 5\] of 'b1.conv1' are pruned but grouped conv 'b1.conv2' \(groups=4\) needs the "
        r"same number .* per block are \[3, 1, 0, 0\]\. Prune through Plan.resolve_coupled",
    ):
        compact(model, x)
    with pytest.warns(RuntimeWarning, match="grouped conv 'b1.conv2'"):
        result = compact(model, x, config=CompactConfig(strict=False))
    assert result.model.b1.conv2.in_channels == 16  # nothing removable evenly (conv groups 2, 3 keep all)
    fresh = torch.randn(3, 3, 8, 8)
    assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_unused_path_removal_and_the_manifest_handle_grouped_convs(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(TinyResNeXt())
    x = torch.randn(2, 3, 8, 8)
    _, masks = coupled_masks(model, x, 0.5)
    before = outputs(model, x)
    report = remove_unused_paths(model, x, masks)
    assert (outputs(model, x) - before).abs().max() <= 1e-5
    assert report.masks is not None
    small = compact(model, x, report.masks).model
    get_executor("compact").save(small, tmp_path)
    restored = load_compacted(tmp_path, TinyResNeXt())
    assert restored.b2.conv2.groups == 4 and restored.b2.conv2.weight.shape == small.b2.conv2.weight.shape
    fresh = torch.randn(3, 3, 8, 8)
    assert (outputs(restored, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_a_grouped_conv_reading_a_concat_is_a_plan_error_naming_it():
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.g = nn.Conv2d(8, 4, 1, groups=2)

        def forward(self, x):
            return self.g(torch.cat([self.a(x), self.b(x)], 1))

    with pytest.raises(PlanError, match=r"grouped conv 'g' \(groups=2\) shares only part of its input channels"):
        Plan({"a": Filter(sparsity=0.5)}).resolve_coupled(Concat(), torch.zeros(2, 3, 8, 8))
