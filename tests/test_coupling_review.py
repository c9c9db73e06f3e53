"""Coupling and compaction review findings: depthwise channel multipliers, squeeze-excite next to a LayerNorm,
layers whose output the model drops, and examples compaction cannot run."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from admmcompress import Filter, Plan, Rule, compact, hard_prune
from admmcompress.executors.compact import CompactionError
from admmcompress.plan.graph import DEPTHWISE, channel_groups, group_of
from admmcompress.plan.targets import PlanError


def masked_and_compacted(model: nn.Module, x: torch.Tensor, rule: Rule, mode: str = "extend"):
    """Hard-prune ``model`` in place with the coupled ``rule``; the masked outputs and the compaction result."""
    model.eval()
    masks = hard_prune(model, Plan([rule]).resolve_coupled(model, x, mode=mode))
    with torch.no_grad():
        masked = model(x)
    return masked, compact(model, x, masks)


def zero_filters(conv: nn.Conv2d) -> int:
    return int((conv.weight.detach().flatten(1).abs().sum(1) == 0).sum())


# --- A: a depthwise conv with a channel multiplier ------------------------------------------------------------


def multiplier_net(mult: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                         nn.Conv2d(8, 8 * mult, 3, padding=1, groups=8), nn.GELU(), nn.Conv2d(8 * mult, 4, 1))


def test_a_channel_multiplier_conv_joins_its_input_group_with_k_rows_per_channel():
    groups = channel_groups(multiplier_net(), torch.zeros(1, 3, 16, 16))
    group = group_of(groups, "0", ("producer",))
    dw = next(m for m in group.members if m.layer == "3")
    head = next(m for m in group.members if m.layer == "5")
    assert group.size == 8 and not group.problems and not group.blocks
    assert dw.role == DEPTHWISE and dw.local == tuple(range(16)) and dw.root == tuple(i // 2 for i in range(16))
    assert head.root == dw.root
    assert not any(m.layer == "3" and m.role == "producer" for g in groups for m in g.members)  # no second group


@pytest.mark.parametrize("mult", [2, 3])
def test_filter_rule_before_a_channel_multiplier_conv_prunes_and_compacts_exactly(mult):
    torch.manual_seed(0)
    model, x = multiplier_net(mult), torch.randn(2, 3, 16, 16)
    masked, result = masked_and_compacted(model, x, Rule(Filter(sparsity=0.5), match="0"))
    assert zero_filters(model[0]) == 4 and zero_filters(model[3]) == 4 * mult
    small = result.model
    assert (small[0].out_channels, small[3].in_channels, small[3].groups, small[3].out_channels) == (4, 4, 4, 4 * mult)
    assert small[5].in_channels == 4 * mult and result.params_after < result.params_before
    torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=0)


def test_chained_channel_multiplier_convs_compact_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.ReLU(),
                          nn.Conv2d(8, 24, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(24, 4, 1))
    x = torch.randn(2, 3, 16, 16)
    masked, result = masked_and_compacted(model, x, Rule(Filter(sparsity=0.5), match="0"))
    assert result.removed["0+2+4"] == (2, 4)
    assert [result.model[i].out_channels for i in (0, 2, 4)] == [2, 4, 12] and result.model[6].in_channels == 12
    torch.testing.assert_close(result.model(x), masked, atol=1e-5, rtol=0)


def test_a_channel_multiplier_conv_whose_output_is_the_model_output_is_one_plan_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=8))
    plan = Plan([Rule(Filter(sparsity=0.5), match="0")])
    with pytest.raises(PlanError, match=r"^[^\n]*filter target on '0': .*model outputs \(from '2'\)$"):
        plan.resolve_coupled(model, torch.zeros(1, 3, 8, 8), mode="extend")


def test_a_conv_reducing_channels_with_groups_equal_to_outputs_is_one_plan_error():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    plan = Plan([Rule(Filter(sparsity=0.5), match="0")])
    expected = (r"filter target on '0': .*conv '2' \(groups=8\) reads 16 input channels into 8 outputs, but the "
                r"dependency graph \(Torch-Pruning\) takes it for a depthwise conv")
    with pytest.raises(PlanError, match=expected):
        plan.resolve_coupled(model, torch.zeros(1, 3, 8, 8), mode="extend")


def grouped_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.ReLU(),
                         nn.Conv2d(16, 4, 1))


def test_a_sparsity_the_conv_groups_cannot_meet_at_all_is_one_plan_error():
    plan = Plan([Rule(Filter(sparsity=0.2), match="0")])  # 8 channels: 2 asked, but each pair keeps both
    expected = (r"^[^\n]*filter target on '0': grouped conv '2' \(groups=4\) splits these 8 channels into blocks of 2 "
                r"that each keep the same number and at least one, so sparsity 0.2 removes none of them; drop the "
                r"target, or give the grouped conv fewer groups$")
    with pytest.raises(PlanError, match=expected):
        plan.resolve_coupled(grouped_net(), torch.zeros(1, 3, 8, 8), mode="extend")


def test_a_sparsity_the_conv_groups_meet_only_in_part_warns_with_the_counts():
    plan = Plan([Rule(Filter(sparsity=0.75), match="0")])
    with pytest.warns(UserWarning, match=r"grouped conv '2' \(groups=4\) keeps the same number of channels in each "
                                         r"block of 2, so sparsity 0.75 removes 4 of 8 channels, not 6"):
        plan.resolve_coupled(grouped_net(), torch.zeros(1, 3, 8, 8), mode="extend")


# --- B: squeeze-excite and a channels-last LayerNorm in one channel group -------------------------------------


class SqueezeExcite(nn.Module):
    """A conv, a channels-last LayerNorm, then ``x + y * sigmoid(fc2(relu(fc1(mean(y)))))`` with ``y = pw(x)``;
    ``gate_added`` adds the gate instead (a pruned channel then really carries sigmoid(0) = 0.5)."""

    def __init__(self, layernorm: bool = True, gate_added: bool = False, c: int = 8):
        super().__init__()
        self.conv, self.ln = nn.Conv2d(3, c, 3, padding=1), nn.LayerNorm(c) if layernorm else nn.Identity()
        self.pw, self.fc1, self.fc2, self.head = nn.Conv2d(c, c, 1), nn.Linear(c, 2), nn.Linear(2, c), nn.Linear(c, 5)
        self.gate_added = gate_added

    def forward(self, x):
        x = self.ln(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.pw(x)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3))))))[:, :, None, None]
        return self.head((x + y + g if self.gate_added else x + y * g).mean((2, 3)))


def test_a_gate_multiplying_a_zeroed_channel_keeps_the_group_zero_preserving():
    group = group_of(channel_groups(SqueezeExcite(), torch.zeros(1, 3, 8, 8)), "conv", ("producer",))
    assert "Sigmoid" in group.ops and group.leaks == [] and group.zero_preserving
    added = group_of(channel_groups(SqueezeExcite(gate_added=True), torch.zeros(1, 3, 8, 8)), "conv", ("producer",))
    assert added.leaks == ["op 'Sigmoid' makes them nonzero where 'head' reads them"] and not added.zero_preserving


@pytest.mark.parametrize("layernorm", [True, False])
def test_squeeze_excite_next_to_a_layernorm_compacts_exactly(layernorm):
    torch.manual_seed(0)
    model, x = SqueezeExcite(layernorm), torch.randn(2, 3, 16, 16)
    masked, result = masked_and_compacted(model, x, Rule(Filter(sparsity=0.5), type="Conv2d"))
    assert zero_filters(model.conv) == 4 and result.removed["conv+fc2+pw"] == (4, 8)
    small = result.model
    assert (small.conv.out_channels, small.pw.in_channels, small.fc2.out_features, small.head.in_features) == (4,) * 4
    torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=0)


def test_a_pruned_channel_that_carries_a_constant_into_a_layernorm_group_is_still_refused():
    torch.manual_seed(0)
    model, x = SqueezeExcite(gate_added=True), torch.randn(2, 3, 16, 16)
    expected = (r"have zero filters, but op 'Sigmoid' makes them nonzero where 'head' reads them \(the group has a "
                r"LayerNorm, so no constant is folded\); keep these channels")
    with pytest.raises(CompactionError, match=expected):
        masked_and_compacted(model, x, Rule(Filter(sparsity=0.5), type="Conv2d"))


def test_the_same_constant_without_a_layernorm_is_removed_as_unread_exactly():
    torch.manual_seed(0)
    model, x = SqueezeExcite(layernorm=False, gate_added=True), torch.randn(2, 3, 16, 16)
    masked, result = masked_and_compacted(model, x, Rule(Filter(sparsity=0.5), type="Conv2d"))
    assert result.removed["conv+fc2+pw"] == (4, 8)  # the coupled target zeroed every reader's columns
    torch.testing.assert_close(result.model(x), masked, atol=1e-5, rtol=0)


# --- C: a layer whose output the model drops; an example compaction cannot run --------------------------------


class AuxHead(nn.Module):
    """``aux_head`` reads the features but its output is dropped (``no_grad``: run without gradients too)."""

    def __init__(self, no_grad: bool = False):
        super().__init__()
        self.conv, self.head, self.aux_head = nn.Conv2d(3, 8, 3), nn.Linear(8, 5), nn.Linear(8, 5)
        self.no_grad = no_grad

    def forward(self, x):
        f = self.conv(x).relu().mean((2, 3))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.no_grad):
            _unused = self.aux_head(f)
        return self.head(f)


def test_a_layer_whose_output_is_dropped_is_a_consumer_and_compacts_exactly():
    torch.manual_seed(0)
    model, x = AuxHead(), torch.randn(2, 3, 8, 8)
    targets = Plan([Rule(Filter(sparsity=0.5), match="conv")]).resolve_coupled(model, x)
    assert targets[0].members == ("conv", "head", "aux_head")
    masked, result = masked_and_compacted(model, x, Rule(Filter(sparsity=0.5), match="conv"), mode="strict")
    assert result.model.aux_head.in_features == 4 and result.removed["conv"] == (4, 8)
    torch.testing.assert_close(result.model(x), masked, atol=1e-5, rtol=0)


def test_a_layer_the_trace_cannot_see_is_named_in_one_line():
    torch.manual_seed(0)
    model, x = AuxHead(no_grad=True), torch.randn(2, 3, 8, 8)
    expected = (r"^the compacted model fails in layer 'aux_head' \(Linear\): RuntimeError: mat1 and mat2 shapes cannot "
                r"be multiplied \(2x4 and 8x5\); the dependency trace did not see it read the channels that were "
                r"removed .*report the model$")
    with pytest.raises(CompactionError, match=expected):
        masked_and_compacted(model, x, Rule(Filter(sparsity=0.5), match="conv"), mode="strict")


def test_an_example_of_the_wrong_dtype_is_one_line_like_resolve_coupled():
    model, x = AuxHead().eval(), torch.randn(2, 3, 8, 8).double()
    with pytest.raises(PlanError) as planned:
        Plan([Rule(Filter(sparsity=0.5), match="conv")]).resolve_coupled(model, x)
    with pytest.raises(CompactionError) as compacted:
        compact(model, x)
    said = re.escape("the example input (tensor (2, 3, 8, 8) float64) does not fit AuxHead: RuntimeError: ")
    assert re.search(said, str(planned.value)) and re.match("compact: " + said, str(compacted.value))
    assert "\n" not in str(compacted.value)


@pytest.mark.parametrize(("coupling", "fix"), [
    ("extend", "(leave those layers out of the stage's rules, or drop 'compact')"),
    ("none", "(set 'coupling: strict' or 'coupling: extend' on the stage to prune tied layers together, or drop "
             "'compact')"),
])
def test_the_preflight_refusal_advises_what_the_stage_has_not_tried_yet(coupling, fix):
    """With coupling already set, the refusal does not tell the user to set it (review finding)."""
    from torch.utils.data import TensorDataset

    from admmcompress import compress
    from admmcompress.train.config import ConfigError

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,)))
    with pytest.raises(ConfigError) as err:
        compress(SqueezeExcite(gate_added=True), Plan([Rule(Filter(sparsity=0.5), type="Conv2d")]), data, data,
                 coupling=coupling, compact=True, admm={"epochs": 1}, progress=False)
    assert str(err.value).startswith("compact: the plan prunes channels that compaction cannot remove")
    assert str(err.value).endswith(fix)
