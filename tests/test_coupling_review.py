"""Coupling and compaction review findings: depthwise channel multipliers, squeeze-excite next to a LayerNorm,
layers whose output the model drops, and examples compaction cannot run."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from admmcompress import Channel, Filter, Plan, Rule, compact, hard_prune
from admmcompress.executors.compact import CompactConfig, CompactionError
from admmcompress.plan.graph import channel_groups, group_of
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


@pytest.mark.parametrize("mult", [2, 3])
def test_a_filter_rule_feeding_a_channel_multiplier_conv_is_one_plan_error_not_a_silent_no_op(mult):
    """Its input channels cannot be removed here (each is a conv group of its own): said in one line, where the
    rule used to prune nothing without a word (review finding)."""
    plan = Plan([Rule(Filter(sparsity=0.5), match="0")])
    expected = (r"^[^\n]*filter target on '0': these 8 channels are read by grouped conv '3' \(groups=8\), a depthwise "
                r"conv with a channel multiplier, whose input channels cannot be removed here; prune its own filters "
                r"instead")
    for mode in ("extend", "strict"):
        with pytest.raises(PlanError, match=expected):
            plan.resolve_coupled(multiplier_net(mult), torch.zeros(1, 3, 16, 16), mode=mode)


def test_filters_of_a_channel_multiplier_conv_prune_evenly_per_input_channel_and_compact_exactly():
    """The conv itself keeps the same number of its k filters per input channel (a regression a review caught when
    such convs were briefly merged into their input's group)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([0.01, 0.01, 1, 1, 0.02, 1]).view(6, 1, 1, 1))
    masked, result = masked_and_compacted(model, x, Rule(Filter(sparsity=0.5), match="0"))
    rows = (model[0].weight.detach().flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()
    assert rows == [0, 2, 4]  # one of the two rows of every input channel, not both rows of input 0
    assert (result.model[0].in_channels, result.model[0].out_channels, result.model[0].groups) == (3, 3, 3)
    torch.testing.assert_close(result.model(x), masked, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    chained = multiplier_net()
    masked, result = masked_and_compacted(chained, x, Rule(Filter(sparsity=0.5), match="3"), mode="strict")
    assert result.model[3].out_channels == 8 and result.model[5].in_channels == 8
    torch.testing.assert_close(result.model(x), masked, atol=1e-5, rtol=0)


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
    ("extend", "; leave those layers out of the stage's rules, or drop 'compact'. First: "),
    ("none", "; set 'coupling: strict' or 'coupling: extend' on the stage to prune tied layers together, or drop "
             "'compact'. First: "),
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
    assert str(err.value).startswith("compact: the plan prunes channels that compaction cannot remove" + fix)
    assert "\n" not in str(err.value) and len(str(err.value)) < 1000  # one reason, not one per channel group


# --- second review: results read where the trace cannot follow, 0/0, NaN and infinities in the output check ---


class StoredAux(nn.Module):
    """``aux`` is computed and kept in an attribute (``branch``: compared in an ``if`` instead), not returned."""

    def __init__(self, branch: bool = False):
        super().__init__()
        self.body, self.aux, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 10, 1), nn.Conv2d(8, 10, 1)
        self.branch = branch

    def forward(self, x):
        y = F.relu(self.body(x))
        if self.branch:
            return self.head(y) if self.aux(y).mean() > 0.1 else -self.head(y)
        self.aux_logits = self.aux(y)
        return self.head(y)


@pytest.mark.parametrize("branch", [False, True])
def test_the_channels_of_a_result_the_model_does_not_return_are_kept(branch):
    """Its layer's filters cannot be pruned coupled (it may be read outside the trace: 10 auxiliary classes became 5
    silently, a branch flipped on other inputs); the layers it reads still compact exactly."""
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(PlanError, match=r"filter target on 'aux': its channels leave 'aux' in a result the model "
                                        r"computes but does not return"):
        Plan([Rule(Filter(sparsity=0.5), match="aux")]).resolve_coupled(StoredAux(branch), x)
    torch.manual_seed(0)
    model = StoredAux(branch)
    masked, result = masked_and_compacted(model, x, Rule(Filter(sparsity=0.5), match="body"))
    assert result.model.aux.in_channels == 4 and result.model.aux.out_channels == 10
    torch.testing.assert_close(result.model(x), masked, atol=1e-5, rtol=0)


def test_a_quotient_of_two_pruned_channels_is_not_zero_preserving():
    class Quotient(nn.Module):
        def __init__(self, divide_by_group: bool):
            super().__init__()
            self.c1, self.g = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 4, 1)
            self.divide_by_group = divide_by_group

        def forward(self, x):
            return self.head(self.c1(x) / (self.g(x) if self.divide_by_group else 2.0))

    x = torch.zeros(1, 3, 8, 8)
    both = group_of(channel_groups(Quotient(True), x), "c1", ("producer",))
    assert both.leaks == ["op 'Div' makes them nonzero where 'head' reads them"] and not both.zero_preserving
    assert group_of(channel_groups(Quotient(False), x), "c1", ("producer",)).zero_preserving


class Offset(nn.Module):
    """conv -> ``between`` -> head: whether a zeroed conv channel reaches the head as zero depends on ``between``."""

    def __init__(self, between):
        super().__init__()
        self.conv, self.head, self.between = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), between
        self.register_buffer("shift", torch.linspace(0.5, 1.0, 8).view(1, 8, 1, 1))

    def forward(self, x):
        return self.head(self.between(self, self.conv(x)))


# f(0) != 0 where an argument or an operand outside the trace decides it; f(0) == 0 for the same op elsewhere.
OFFSETS = {
    "Add(constant)": lambda m, y: y + 1.0,
    "Sub(constant)": lambda m, y: y - 0.5,
    "Rsub": lambda m, y: 1 - y,
    "Hardtanh(f(0) != 0)": lambda m, y: F.hardtanh(y, 0.1, 1.0),
    "Clamp(f(0) != 0)": lambda m, y: y.clamp(max=-0.1),
    "Threshold(f(0) != 0)": lambda m, y: F.threshold(y, 0.5, 2.0),
}
ZERO_KEEPING = [lambda m, y: F.relu6(y), lambda m, y: y.clamp(min=0), lambda m, y: F.threshold(y, -0.5, 2.0),
                lambda m, y: y * 2.0, lambda m, y: y + y]


def filter_pruned_and_compacted(between):
    """A filter rule alone (the head's columns stay): a zero conv channel reaches the head through ``between``."""
    torch.manual_seed(0)
    model, x = Offset(between).eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.conv.bias.zero_()  # the pruned channels are exactly 0 before ``between``
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), match="conv")]))
    with torch.no_grad():
        masked = model(x)
    result = compact(model, x, masks)
    torch.testing.assert_close(result.model(x), masked, atol=1e-5, rtol=0)
    assert result.model.conv.out_channels == 4
    return group_of(channel_groups(Offset(between), x), "conv", ("producer",)), result


@pytest.mark.parametrize("op", list(OFFSETS))
def test_an_op_mapping_zero_to_a_constant_is_named_and_its_constant_folded(op):
    group, result = filter_pruned_and_compacted(OFFSETS[op])
    assert group.leaks == [f"op '{op}' makes them nonzero where 'head' reads them"] and not group.zero_preserving
    assert result.folded == {"conv": 4}  # before: removed as zero, and the output check failed after training


@pytest.mark.parametrize("between", ZERO_KEEPING)
def test_the_same_ops_keeping_zero_remove_the_channels_without_folding(between):
    group, result = filter_pruned_and_compacted(between)
    assert group.zero_preserving and result.folded == {}


def test_a_buffer_added_per_channel_is_refused_by_compaction_in_one_line():
    torch.manual_seed(0)
    model, x = Offset(lambda m, y: y + m.shift).eval(), torch.randn(2, 3, 8, 8)
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), match="conv")]))
    with pytest.raises(CompactionError, match="the dependency trace did not see it read the channels"):
        compact(model, x, masks)


def test_the_output_check_sees_nan_and_ignores_equal_infinities():
    from admmcompress.executors.compact import _max_diff

    inf, nan = float("inf"), float("nan")
    assert _max_diff([torch.tensor([1.0, -inf])], [torch.tensor([1.0, -inf])]) == 0.0  # a masked_fill(-inf)
    assert _max_diff([torch.tensor([nan])], [torch.tensor([nan])]) == 0.0
    assert _max_diff([torch.zeros(1), torch.tensor([1.0, nan])], [torch.zeros(1), torch.tensor([1.0, 2.0])]) == inf
    assert _max_diff([torch.tensor([-inf, 1.0])], [torch.tensor([-inf, 1.25])]) == 0.25  # was lost behind the NaN


def test_grouped_conv_blocks_that_remove_more_than_asked_warn_too():
    plan = Plan([Rule(Filter(sparsity=0.3), match="0")])  # 2 of 8 asked; blocks of 2 each lose one: 4
    with pytest.warns(UserWarning, match=r"sparsity 0.3 removes 4 of 8 channels, not 2"):
        plan.resolve_coupled(grouped_net(), torch.zeros(1, 3, 8, 8), mode="extend")


def test_a_layer_broadcast_over_the_group_is_named_not_an_index_error():
    """Conv2d(3, 1) added to 8 channels: Torch-Pruning puts it in their group (an IndexError deep in the coupled
    target, a review found); one line naming the layer."""

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.s, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 1, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.c1(x) + self.s(x))

    with pytest.raises(PlanError, match=r"layer 's' writes 1 channel\(s\) that are broadcast over these 8 \(an add or "
                                        r"multiply\), so its channels cannot follow the group's"):
        Plan([Rule(Filter(sparsity=0.5), match="c1")]).resolve_coupled(Broadcast(), torch.zeros(1, 3, 8, 8), "extend")


class ChannelMean(nn.Module):
    """``y * (1 + relu(y.mean(channels) - 3))``: every channel depends on the others (``over="positions"``: a
    global average pool instead, which keeps them apart)."""

    def __init__(self, c: int = 8, over: str = "channels"):
        super().__init__()
        self.c1, self.head, self.over = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 4, 1), over

    def forward(self, x):
        y = self.c1(x)
        m = y.mean(1, keepdim=True) if self.over == "channels" else y.mean((2, 3), keepdim=True)
        return self.head(y * (1 + F.relu(m - 3)))


@pytest.mark.parametrize(("c", "hw"), [(8, 8), (16, 8), (8, 16)])
def test_a_mean_over_the_channel_axis_is_refused_and_a_pool_is_not(c, hw):
    """A mean over channels passed as channelwise: compaction's output check passed on small inputs while large
    ones differed by ~300 (a review's finding). 8 channels at 8 x 8 is decided by NCHW's channel axis."""
    x = torch.zeros(1, 3, hw, hw)
    with pytest.raises(PlanError, match=r"op 'Mean' \(feeding 'head'\) reduces over the channel axis"):
        Plan([Rule(Filter(sparsity=0.5), match="c1")]).resolve_coupled(ChannelMean(c), x, mode="extend")
    assert not group_of(channel_groups(ChannelMean(c, "positions"), x), "c1", ("producer",)).problems


# --- a value added to pruned channels that is not a constant, or that the trace has no node for -----------------


class AddsInput(nn.Module):
    """fc1 -> relu -> + t -> fc2, with ``t`` an input of the model (a noise level, a time step)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, t):
        return self.fc2(torch.relu(self.fc1(x)) + t)


@pytest.mark.parametrize("batch", [1, 4])
def test_an_input_added_to_pruned_channels_is_not_folded_as_a_constant(batch):
    """A batch sharing t (or a batch of one) showed t as a constant: it was folded and the compacted model differed
    by 0.67 on other inputs, while the check on the example passed."""
    torch.manual_seed(0)
    model = AddsInput().eval()
    with torch.no_grad():
        model.fc1.weight[:4] = 0
        model.fc1.bias[:4] = 0
    example = (torch.randn(batch, 8), torch.full((batch, 1), 0.3))
    with pytest.raises(CompactionError, match="with a value that changes with the input"):
        compact(model, example)
    kept = compact(model, example, config=CompactConfig(strict=False))
    x, t = torch.randn(16, 8), torch.rand(16, 1)
    torch.testing.assert_close(kept.model(x, t), model(x, t), atol=1e-5, rtol=0)


def test_a_scalar_parameter_added_to_pruned_channels_is_folded_not_taken_for_zero():
    torch.manual_seed(0)

    class AddsScalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 4, 1)
            self.shift = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.head(self.conv(x) + self.shift)

    model, x = AddsScalar().eval(), torch.randn(2, 3, 8, 8)
    group = group_of(channel_groups(model, x), "conv", ("producer",))
    assert group.leaks == ["op 'Add' makes them nonzero where 'head' reads them"]
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), match="conv")]))
    with torch.no_grad():
        masked = model(x)
    result = compact(model, x, masks)  # before: removed as zero, and the output check failed after training
    assert result.folded == {"conv": 4} and result.model.conv.out_channels == 4
    torch.testing.assert_close(result.model(x), masked, atol=1e-5, rtol=0)


def test_a_value_that_turns_nan_on_the_noisy_example_is_not_taken_for_a_constant():
    """log(t) of a noisy t is NaN in places; a NaN spread used to compare as 'not above the tolerance'."""
    torch.manual_seed(0)

    class AddsLog(AddsInput):
        def forward(self, x, t):
            return self.fc2(torch.relu(self.fc1(x)) + torch.log(t))

    model = AddsLog().eval()
    with torch.no_grad():
        model.fc1.weight[:4] = 0
        model.fc1.bias[:4] = 0
    with pytest.raises(CompactionError, match="with a value that changes with the input"):
        compact(model, (torch.randn(4, 8), torch.full((4, 1), 0.3)))


# --- stop 45's review of modern CNNs: concatenations, collapsed groups, resampling, channel-moving ops ---


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3))


@pytest.mark.parametrize("mode", ["strict", "extend"])
def test_a_channel_rule_on_a_conv_reading_a_concat_prunes_every_part(mode):
    """Only the first part's group was found: 4 of 16 input channels went where the rule asked for 8, silently."""
    torch.manual_seed(0)
    model, x = _Concat().eval(), torch.randn(2, 3, 16, 16)
    targets = Plan([Rule(Channel(sparsity=0.5), match="c")]).resolve_coupled(model, x, mode=mode)
    assert sorted(t.key for t in targets) == ["a:coupled-filter", "b:coupled-filter"]
    hard_prune(model, targets)
    read = model.c.weight.transpose(0, 1).flatten(1).abs().sum(1) != 0
    assert int(read[:8].sum()) == 4 and int(read[8:].sum()) == 4
    assert compact(model, x).model.c.in_channels == 8


class _ChannelMeanGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        m = y.permute(0, 2, 3, 1).mean(-1, keepdim=True).permute(0, 3, 1, 2)  # a mean over the channels
        return self.out(y * torch.sigmoid(self.gate(m))).mean((2, 3))


def test_a_group_the_trace_collapses_to_one_channel_is_refused():
    """Accepted before as one 'conv+gate' group of one channel: the filter rule pruned 0 of 8 filters, silently."""
    with pytest.raises(PlanError, match="layer 'conv' writes 8 channels, but the trace ties them to one channel"):
        Plan([Rule(Filter(sparsity=0.5), match="conv")]).resolve_coupled(_ChannelMeanGate().eval(),
                                                                         torch.randn(2, 3, 8, 8), mode="extend")


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_upsampling_between_convs_is_per_channel(mode):
    """A U-Net's decoder upsamples before its next conv: refused before ('not known to act on each channel')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2, mode=mode),
                          nn.ReflectionPad2d(1), nn.Conv2d(8, 4, 3), nn.Mish()).eval()
    x = torch.randn(2, 3, 8, 8)
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), match="0")]).resolve_coupled(model, x))
    result = compact(model, x, masks)
    assert result.model[4].in_channels == 4 and result.max_abs_diff <= 1e-5


def test_a_pixel_shuffle_is_never_taken_for_a_channelwise_op():
    """The refusal offered extra_channelwise_ops=('PixelShuffle',); following it ended in an IndexError."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(2, 4, 3, padding=1)).eval()
    plan, x = Plan([Rule(Filter(sparsity=0.5), match="0")]), torch.randn(2, 3, 8, 8)
    with pytest.raises(PlanError, match="op 'PixelShuffle' .* mixes or moves channels") as err:
        plan.resolve_coupled(model, x)
    assert "extra_channelwise_ops" not in str(err.value)
    with pytest.raises(ValueError, match=r"extra_channelwise_ops: \['PixelShuffle'\] cannot act on each channel"):
        plan.resolve_coupled(model, x, extra_channelwise_ops=("PixelShuffle",))


def test_a_channel_shuffle_written_with_view_and_transpose_is_refused():
    """ShuffleNet's shuffle (view into groups, transpose, reshape) was accepted and compaction failed at the end."""

    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1, groups=2)
            self.c3 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.c2(torch.relu(self.c1(x)))
            b, c, h, w = y.shape
            return self.c3(y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w))

    for shape in [(1, 3, 8, 8), (2, 3, 6, 5)]:  # spatial sizes equal to and unlike the channel count
        with pytest.raises(PlanError, match="a view splits the channel axis .* \\(a channel shuffle\\)"):
            Plan([Rule(Filter(sparsity=0.5), match="c2")]).resolve_coupled(Shuffle().eval(), torch.randn(shape))


def test_a_flatten_then_transpose_stays_accepted():
    """A patch embedding (conv, flatten of the positions, transpose to channels-last) merges positions only."""
    torch.manual_seed(0)

    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Conv2d(3, 8, 2, stride=2), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.embed(x).flatten(2).transpose(1, 2)).mean(1))

    model, x = Patches().eval(), torch.randn(2, 3, 8, 8)
    targets = Plan([Rule(Filter(sparsity=0.5), match="embed")]).resolve_coupled(model, x)
    result = compact(model, x, hard_prune(model, targets))
    assert result.model.embed.out_channels == 4 and result.max_abs_diff <= 1e-5


def test_layernorms_are_known_by_their_class():
    """transformers' ConvNextV2LayerNorm, the same code as the supported ConvNextLayerNorm, was refused by its name;
    CLIP-style subclasses called LayerNorm (a float32 cast around torch's) stay accepted; another name is refused."""

    class LayerNorm2d(nn.LayerNorm):  # channels first, by permuting around torch's
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class LayerNorm(nn.LayerNorm):  # CLIP's and open_clip's: the last axis, in float32
        def forward(self, x):
            return super().forward(x.float()).to(x.dtype)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), LayerNorm2d(8), nn.Conv2d(8, 4, 1)).eval()
    with pytest.raises(PlanError, match=r"LayerNorm subclass '1' \(LayerNorm2d\) has a forward this library cannot"):
        Plan([Rule(Filter(sparsity=0.5), match="0")]).resolve_coupled(model, torch.randn(2, 3, 8, 8), mode="extend")
    torch.manual_seed(0)
    clip = nn.Sequential(nn.Linear(6, 8), LayerNorm(8), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        clip[1].weight.uniform_(0.5, 1.5)
        clip[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 6)
    targets = Plan([Rule(Filter(sparsity=0.5), match="0")]).resolve_coupled(clip, x, mode="extend")
    result = compact(clip, x, hard_prune(clip, targets))
    assert result.params_after < result.params_before and result.max_abs_diff <= 1e-5
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextV2Config(num_stages=2, depths=[1, 1], hidden_sizes=[16, 32], num_labels=10,
                                           image_size=32)
    torch.manual_seed(0)
    convnext = transformers.ConvNextV2ForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    targets = Plan([Rule(Filter(sparsity=0.5), type="Conv2d")]).resolve_coupled(convnext, x, mode="extend")
    result = compact(convnext, x, hard_prune(convnext, targets))
    assert result.params_after < 0.6 * result.params_before and result.max_abs_diff <= 1e-5


@pytest.mark.parametrize("reduce, accepted", [(lambda y: y.amax((2, 3)), True), (lambda y: y.max(3)[0].max(2)[0], True),
                                              (lambda y: y.amax(1, keepdim=True) * y, False),
                                              (lambda y: y.max(1, keepdim=True)[0] * y, False)])
def test_a_max_is_per_channel_over_positions_and_refused_over_channels(reduce, accepted):
    """A global max pool is per channel (it was an unknown op, and declaring Amax channelwise also let a max over
    the channels through, which mixes them)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 2)

        def forward(self, x):
            y = reduce(torch.relu(self.body(x)))
            return self.head(y.flatten(2).mean(2) if y.dim() == 4 else y)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    plan = Plan([Rule(Filter(sparsity=0.5), match="body")])
    if accepted:
        result = compact(model, x, hard_prune(model, plan.resolve_coupled(model, x)))
        assert result.model.body.out_channels == 4 and result.max_abs_diff <= 1e-5
    else:
        with pytest.raises(PlanError, match=r"op '(Amax|Max)' .*reduces over the channel axis"):
            plan.resolve_coupled(model, x)


class _FrozenBatchNorm2d(nn.Module):  # torchvision.ops.misc.FrozenBatchNorm2d's computation: per channel
    def __init__(self, n):
        super().__init__()
        for key, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)), ("running_mean", torch.zeros(n)),
                           ("running_var", torch.ones(n))):
            self.register_buffer(key, value)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale


class _GatedRMSNorm(nn.Module):  # Mamba2 / Qwen3-Next style: a second input, the gate, from elsewhere
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x, gate):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nn.functional.silu(gate)


class _GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.norm, self.c = _GatedRMSNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.l0(x))
        return self.c(self.norm(self.a(h), self.b(h)))


def test_only_norms_that_reduce_are_unknown_norms_and_a_gate_stays_outside():
    """The unknown-norm refusal took a frozen BatchNorm (x * scale + bias, per channel) for a norm whose statistics
    span the channels, and followed a gated norm's gate up through the network, refusing unrelated groups (a
    review of the change)."""
    from admmcompress.plan.graph import channel_groups

    frozen = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _FrozenBatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    group = next(g for g in channel_groups(frozen, torch.randn(1, 3, 8, 8)) if "0" in [m.layer for m in g.members])
    assert not group.problems
    groups = {tuple(sorted(m.layer for m in g.members)): g.problems for g in channel_groups(_GatedNet(),
                                                                                         torch.randn(2, 8))}
    assert groups[("a", "b", "l0")] == []
    assert any("normalization 'norm' (_GatedRMSNorm) is not one this library knows" in p
               for p in groups[("a", "b", "c", "norm.weight")])
