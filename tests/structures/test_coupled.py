"""Coupled filter/channel targets: one projection per channel group, through ADMM, hard_prune and gradual."""

import pytest
import torch
from torch import nn

from admmcompress.drivers import ADMM, GradualMagnitude
from admmcompress.finalize import hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.plan.coupled import CoupledTarget, couple
from admmcompress.structures import Channel, Column, Filter
from admmcompress.structures.groups import kept_count


class Residual(nn.Module):
    """stem -> BN -> [conv-BN-ReLU-conv-BN] + identity -> Linear: the stream couples stem and conv2."""

    def __init__(self, width=6):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.relu(x + y).mean(dim=(2, 3)))


X = torch.randn(2, 3, 8, 8)


def stream_target(model, sparsity=0.5, mode="strict"):
    plan = Plan(
        [Rule(Filter(sparsity=sparsity), match="stem"), Rule(Filter(sparsity=sparsity), match="conv2")]
    )
    targets = couple(model, plan.resolve(model), X, mode=mode)
    assert len(targets) == 1 and isinstance(targets[0], CoupledTarget)
    return targets[0]


def test_group_score_is_the_sum_of_every_members_squared_norms():
    torch.manual_seed(0)
    model = Residual()
    target = stream_target(model)
    params = dict(model.named_parameters())
    expected = torch.zeros(6, dtype=torch.float64)
    for name in ("stem.weight", "conv2.weight"):
        expected += params[name].detach().double().reshape(6, -1).pow(2).sum(1)
    for name in ("bn0.weight", "bn0.bias", "bn2.weight", "bn2.bias"):
        expected += params[name].detach().double().pow(2)
    expected += params["conv1.weight"].detach().double().transpose(0, 1).reshape(6, -1).pow(2).sum(1)
    expected += params["fc.weight"].detach().double().pow(2).sum(0)
    value = target.value(params).double()
    assert torch.allclose(value.pow(2).sum(1), expected)
    keep = target.structure.support(value).any(1)
    assert keep.sum() == 3 and set(torch.topk(expected, 3).indices.tolist()) == set(
        torch.nonzero(keep).flatten().tolist()
    )


def test_masks_zero_the_same_channels_in_every_member():
    torch.manual_seed(1)
    model = Residual()
    target = stream_target(model)
    masks = hard_prune(model, [target])
    dropped = torch.nonzero(~masks["stem.weight"].reshape(6, -1).any(1)).flatten()
    assert len(dropped) == 3
    for name in ("conv2.weight", "bn0.weight", "bn0.bias", "bn2.weight", "bn2.bias"):
        assert torch.equal(torch.nonzero(~masks[name].reshape(6, -1).any(1)).flatten(), dropped)
    assert not masks["conv1.weight"][:, dropped].any() and not masks["fc.weight"][:, dropped].any()
    assert masks["conv1.weight"].sum() == 5 * 3 * 9  # only the stream's columns of conv1 are pruned


def test_value_is_differentiable_for_the_admm_penalty():
    model = Residual()
    target = stream_target(model)
    params = dict(model.named_parameters())
    target.value(params).pow(2).sum().backward()
    assert model.stem.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert torch.allclose(model.bn0.weight.grad, 2 * model.bn0.weight.detach())


def test_strict_mode_names_the_coupled_layers_without_a_target():
    model = Residual()
    with pytest.raises(
        PlanError, match=r"'conv2' share channels .* with 'stem', which have no filter target"
    ):
        couple(model, Plan({"conv2": Filter(sparsity=0.5)}).resolve(model), X)
    extended = couple(model, Plan({"conv2": Filter(sparsity=0.5)}).resolve(model), X, mode="extend")
    assert set(extended[0].members) >= {"stem", "conv2", "bn0", "bn2", "conv1", "fc"}


def test_coupled_layers_must_share_one_sparsity():
    model = Residual()
    plan = Plan([Rule(Filter(sparsity=0.5), match="stem"), Rule(Filter(sparsity=0.25), match="conv2")])
    with pytest.raises(PlanError, match="coupled layers must share one sparsity.*'stem' filter 0.5"):
        couple(model, plan.resolve(model), X)


def test_a_filter_target_on_the_output_layer_is_refused():
    model = Residual()
    with pytest.raises(PlanError, match="filter target on 'fc': its channels are model outputs"):
        couple(model, Plan({"fc": Filter(sparsity=0.5)}).resolve(model), X)


def test_channel_target_on_the_only_consumer_couples_its_producer():
    model = Residual()
    targets = couple(model, Plan({"conv2": Channel(sparsity=0.4)}).resolve(model), X)
    assert targets[0].layer == "conv1" and targets[0].size == 5
    masks = hard_prune(model, targets)
    assert (~masks["conv1.weight"].reshape(5, -1).any(1)).sum() == 2


def test_other_targets_pass_through_and_plan_resolve_coupled():
    model = Residual()
    plan = Plan([Rule(Filter(sparsity=0.5), match="conv1"), Rule(Column(sparsity=0.6), match="conv1")])
    targets = plan.resolve_coupled(model, X)
    assert [t.structure.kind for t in targets] == ["filter", "column"]
    assert isinstance(targets[0], CoupledTarget) and not isinstance(targets[1], CoupledTarget)


@pytest.mark.filterwarnings("ignore:ADMM residual")
def test_admm_drives_coupled_and_column_targets_on_one_layer_and_resumes():
    """Per-layer combined targets: 50% filters (coupled) + 60% columns, each with its own Z/U."""
    torch.manual_seed(0)
    model = Residual()
    plan = Plan([Rule(Filter(sparsity=0.5), match="conv1"), Rule(Column(sparsity=0.6), match="conv1")])
    targets = plan.resolve_coupled(model, X)
    admm = ADMM(model, targets, rho=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    y = torch.randint(0, 4, (2,))
    for _ in range(3):
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(X), y) + admm.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        admm.step()
    assert set(admm.state) == {"conv1:coupled-filter", "conv1.weight:column"}
    state = admm.state_dict()
    again = ADMM(model, targets, rho=1e-2)
    again.load_state_dict(state)
    assert torch.equal(again.state["conv1:coupled-filter"]["Z"], admm.state["conv1:coupled-filter"]["Z"])
    masks = admm.finalize()
    rows = masks["conv1.weight"].reshape(5, -1)
    assert rows.any(1).sum() == kept_count(5, 0.5) == 2  # round-half-to-even keeps 2 of 5
    columns_pruned = int((~masks["conv1.weight"].reshape(5, -1).any(0)).sum())
    assert columns_pruned >= 54 - kept_count(54, 0.6)  # conv1 sees 6 channels x 9 positions
    assert torch.equal(masks["bn1.weight"], rows.any(1)) and not masks["conv2.weight"][:, ~rows.any(1)].any()


def test_gradual_magnitude_steps_a_coupled_target():
    model = create_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    plan = Plan([Rule(Filter(sparsity=0.5), type="Conv2d")])
    targets = plan.resolve_coupled(model, x)
    gradual = GradualMagnitude(model, targets, updates=2)
    gradual.step()
    masks = gradual.finalize()
    assert (~masks["conv1.weight"].reshape(16, -1).any(1)).sum() == 8
    stem, block = masks["conv1.weight"], masks["layers.0.2.conv2.weight"]
    assert torch.equal(stem.reshape(16, -1).any(1), block.reshape(16, -1).any(1))


def test_code_that_reads_one_parameter_per_target_gets_a_clear_error():
    target = stream_target(Residual())
    with pytest.raises(TypeError, match=r"spans \d+ parameters .* Use ADMM, GradualMagnitude or hard_prune"):
        _ = target.param_name
