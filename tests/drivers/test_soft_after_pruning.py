"""SS-Auto after another pruning stage: every cost counts the zeros the earlier stage left outside the soft targets,
and the table of rates found counts what the budget (and compaction) count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.drivers.budget import BudgetError
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
from admmcompress.executors.compact import compact
from admmcompress.finalize import hard_prune
from admmcompress.models import LeNet300100
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Column, Filter
from admmcompress.structures.groups import as_matrix
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import Runner

pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def params_by_hand(model: nn.Module) -> int:
    """Kept rows x kept columns of every Linear, read off the weights."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nonzero = as_matrix(m.weight.detach()) != 0
            total += int(nonzero.any(1).sum()) * int(nonzero.any(0).sum())
    return total


def after_stage_one() -> tuple[nn.Module, object]:
    """An MLP whose layer 2 lost half its filters in an earlier stage (6784 -> 4736 params), and its masks."""
    model = mlp()
    frozen = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), match="2")]).resolve(model))
    return model, frozen


def soft_on_layer_zero(model: nn.Module, frozen, fraction: float) -> SoftThreshold:
    return SoftThreshold(model, Plan([Rule(Filter(sparsity=0.9), match="0")]),
                         SoftConfig(budget={"kind": "params", "fraction": fraction}), frozen=frozen, updates=1)


def test_a_model_an_earlier_stage_brought_within_budget_is_not_pruned_further():
    model, frozen = after_stage_one()
    assert params_by_hand(model) == 4736
    soft = soft_on_layer_zero(model, frozen, 0.8)  # 5427 allowed: already met
    assert soft.start_cost == 4736 and soft.budget_at(1) == pytest.approx(soft.target_cost)
    soft.step()
    soft.finalize()
    assert int((model[0].weight != 0).any(1).sum()) == 64  # before: cut to 21 rows for nothing
    assert soft.final_cost == params_by_hand(model) == 4736  # before: 5408 reported


def test_a_budget_only_the_earlier_stage_makes_feasible_is_met_and_counted_as_the_model_is():
    model, frozen = after_stage_one()
    soft = soft_on_layer_zero(model, frozen, 0.5)  # 3392 allowed; least 2880 (before: refused as 4928)
    soft.step()
    soft.finalize()
    assert soft.final_cost == params_by_hand(model) <= soft.target_cost
    assert torch.equal(model[2].weight != 0, (model[2].weight != 0) & frozen["2.weight"])  # stage 1's zeros kept
    with pytest.raises(BudgetError, match=r"below the least this plan allows \(2880 of 6784"):
        soft_on_layer_zero(*after_stage_one(), 0.4)


def two_stage_config(fraction: float) -> RunConfig:
    """LeNet-300-100: a magnitude stage takes 80% of fc1's filters, then soft prunes fc2 to a params budget."""
    return RunConfig.from_dict({
        "model": {"name": "lenet300100"},
        "pretrained": "<in-memory>",
        "data": {"batch_size": 64},
        "stages": [
            {"plan": {"rules": [{"match": "fc1", "structure": "filter", "sparsity": 0.8}]}, "method": "magnitude",
             "admm": {"epochs": 0}, "retrain": {"epochs": 0}},
            {"plan": {"rules": [{"match": "fc2", "structure": "filter", "sparsity": 0.95},
                                {"match": "fc2", "structure": "column", "sparsity": 0.95}]},
             "method": "soft", "options": {"rho": 0.01, "budget": {"kind": "params", "fraction": fraction}},
             "admm": {"epochs": 1, "update_every_steps": 2}, "retrain": {"epochs": 0}},
        ],
    })


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", "train", limit=128), load_dataset("mnist", "test", limit=64)


def test_the_runner_accepts_a_later_budget_earlier_stages_make_feasible_and_reports_the_real_cost(mnist):
    # 266,200 params dense; fc1 at 20% of its filters leaves 78,040; 25% (66,550) is then feasible
    runner = Runner(two_stage_config(0.25), LeNet300100(), *mnist, progress=False, train_dense=False)
    metrics = runner.run()
    record = metrics["stages"][1]["soft"]
    assert record["budget"]["final"] == params_by_hand(runner.model) <= record["budget"]["target"]
    assert record["rates"]["fc1"]["rows_kept"] == 60


def test_the_runner_still_refuses_a_budget_no_earlier_pruning_can_make_feasible(mnist):
    # fc1's 60 kept filters alone hold 47,040 params: 10% (26,620) is out of reach
    with pytest.raises(ValueError, match=r"^stages\[1\]: budget .* is below the least this plan allows"):
        Runner(two_stage_config(0.1), LeNet300100(), *mnist, progress=False, train_dense=False)


def test_the_rates_table_the_masked_model_and_the_compacted_model_agree():
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(5)  # layer 0's rows cost more to shrink than layer 2's columns
    x = torch.randn(4, 32)
    plan = Plan([Rule(Filter(sparsity=0.9), match="0"), Rule(Column(sparsity=0.9), match="2")])
    soft = SoftThreshold(model, plan.resolve_coupled(model, x, "strict"),
                         SoftConfig(budget={"kind": "params", "reduction": 2}), example=x)
    soft.step()
    masks = soft.finalize()
    small = compact(model, x, masks).model
    rates = soft.summary()["soft"]["rates"]
    assert rates["2"]["cols_kept"] < 64  # the threshold removed channels: their producer rows go too
    for name in ("0", "2"):
        compacted = tuple(dict(small.named_modules())[name].weight.shape)
        assert (rates[name]["rows_kept"], rates[name]["cols_kept"]) == compacted
        assert int((model.get_submodule(name).weight != 0).any(1).sum()) == compacted[0]  # the masked model
    assert soft.final_cost == sum(r["rows_kept"] * r["cols_kept"] for r in rates.values())


def test_an_earlier_stage_s_quantized_values_stay_held_after_the_soft_stage():
    """The soft driver started its masks from a plain copy of the frozen set: an earlier quantization stage's
    levels were dropped, and retraining moved those weights off them."""
    from admmcompress.finalize import QuantizedMaskSet, hard_quantize
    from admmcompress.structures import FixedPoint

    model = mlp()
    frozen = hard_quantize(model, Plan([Rule(FixedPoint(bits=2), match="2")]).resolve(model))
    soft = soft_on_layer_zero(model, frozen, 0.9)
    masks = soft.finalize()
    assert isinstance(masks, QuantizedMaskSet) and set(masks.held) == {"2.weight"}
    w = model[2].weight.detach()
    assert torch.equal(w, masks.held["2.weight"].decode(w.dtype))
