"""Review 48 of the automatic per-layer rates (budget, SS-Auto, allocation baselines): tied weights, rule options,
structures and layers the budget cannot count, and wrong inputs refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.drivers.allocation import (
    cost_at_rates,
    plan_from_rates,
    rates_plan,
    sensitivity_plan,
    torch_pruning_plan,
    uniform_plan,
)
from admmcompress.drivers.budget import BudgetError, gemm_shapes, structured_cost
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Filter, Unstructured
from admmcompress.structures.registry import structure_class

pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --- 1. tied weights: one Parameter in two layers is one weight, counted once --------------------------------------


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_tied_weight_is_counted_once_by_its_parameter_name():
    from admmcompress.drivers.budget import layer_weights  # new with the fix

    model, x = Tied(), torch.randn(2, 16)
    assert layer_weights(model) == {"a": "a.weight", "b": "a.weight", "head": "head.weight"}
    for example in (None, x):
        shapes = gemm_shapes(model, example)
        assert list(shapes) == ["a.weight", "head.weight"]
        assert structured_cost(shapes, {}, "params") == 16 * 16 + 4 * 16  # before: 576, the shared matrix twice
    assert structured_cost(gemm_shapes(model, x), {}, "macs") == 2 * 16 * 16 + 4 * 16  # its MACs: both layers


def test_soft_and_the_allocation_baselines_prune_a_tied_weight_at_its_true_cost():
    model = Tied()
    # before: KeyError 'b.weight' (the budget keyed the alias layer, named_parameters() does not list it)
    SoftThreshold(model, Plan([Rule(Filter(sparsity=0.5), match="head")]), SoftConfig(budget={"kind": "params",
                                                                                              "reduction": 1.1}))
    soft = SoftThreshold(model, Plan([Rule(Filter(sparsity=0.9), match="a")]),
                         SoftConfig(budget={"kind": "params", "reduction": 1.2}))
    assert soft.dense_cost == 320
    soft.step()
    soft.finalize()
    assert soft.final_cost <= soft.target_cost
    # 0.8 x 320 = 256 weights: a keeps 12 of 16 rows (12 x 16 + 64); before, 0.5 against 0.8 x 576
    found = uniform_plan(Tied(), Plan([Rule(Filter(sparsity=0.95), match="a")]), {"kind": "params", "fraction": 0.8})
    assert found.to_dict()["rules"][0]["sparsity"] == 0.25
    targets = Plan([Rule(Filter(sparsity=0.5), match="a")]).resolve(model)
    shapes = gemm_shapes(model, None)
    assert cost_at_rates(model, targets, {targets[0].key: 0.5}, shapes, "params") == 8 * 16 + 64


def test_soft_runs_on_a_language_model_whose_head_is_tied_to_its_embedding():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokens = torch.randint(0, 64, (2, 8))
    plan = Plan([Rule(Filter(sparsity=0.8), match="*up_proj")])
    for kind in ("params", "macs"):  # before: KeyError 'lm_head.weight'
        soft = SoftThreshold(model, plan, SoftConfig(budget={"kind": kind, "reduction": 1.1}), example=tokens)
        assert soft.shapes["model.embed_tokens.weight"].name == "lm_head"
    assert plan_from_rates(plan.resolve(model), {"model.layers.0.mlp.up_proj.weight:filter": 0.5}).rules


# --- 2. a rate plan keeps each rule's options ------------------------------------------------------------------------


def test_a_rates_plan_keeps_the_rules_options():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    block = structure_class("block")(sparsity=0.5, block=(4, 4), per_block=True)
    targets = Plan([Rule(block, match="0")]).resolve(model)
    hard_prune(model, targets)
    (rule,) = rates_plan(model, targets).rules
    assert rule.structure.block == (4, 4) and rule.structure.per_block  # before: the default 16 x 16, not per block
    assert rule.structure.target_sparsity == 0.5


def test_a_heads_rate_keeps_its_head_dim():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim = 2, 4
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))

    model = nn.Sequential(Attention())
    targets = Plan([Rule(structure_class("heads")(sparsity=0.5), match="0.q_proj")]).resolve(model)
    (rule,) = plan_from_rates(targets, {targets[0].key: 0.5}).rules
    assert rule.structure.kind == "heads" and rule.structure.head_dim == 4  # before: None


# --- 3. the allocation baselines refuse structures the budget cannot count -------------------------------------------


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.fc = nn.GRU(16, 32, batch_first=True), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.gru(x)[0])


def test_the_allocation_baselines_refuse_structures_the_budget_cannot_count():
    with pytest.raises(BudgetError, match=r"targets \['0.weight:unstructured'\] have other structures") as err:
        uniform_plan(mlp(), Plan([Rule(Unstructured(sparsity=0.5), match="0")]), {"kind": "params", "reduction": 2})
    one_line(err)
    block = structure_class("block")(sparsity=0.5, block=(4, 4))
    plan = Plan([Rule(block, match="gru"), Rule(Filter(sparsity=0.5), match="fc")])
    with pytest.raises(BudgetError, match=r"'gru.weight_ih_l0:block', 'gru.weight_hh_l0:block'\] have other") as err:
        uniform_plan(Tagger(), plan, {"kind": "macs", "reduction": 1.05}, example=torch.randn(2, 5, 16))
    one_line(err)


# --- 4. an empty example batch ----------------------------------------------------------------------------------------


def test_an_empty_example_batch_is_refused_in_one_line():
    plan = Plan([Rule(Filter(sparsity=0.9), match="0")])
    empty = torch.zeros(0, 16)
    for build in (lambda: gemm_shapes(mlp(), empty),  # before: ZeroDivisionError
                  lambda: SoftThreshold(mlp(), plan, SoftConfig(budget={"kind": "macs", "reduction": 1.5}),
                                        example=empty),
                  lambda: uniform_plan(mlp(), plan, {"kind": "macs", "reduction": 1.5}, example=empty)):
        with pytest.raises(BudgetError, match=r"the example batch holds no sample \(batch size 0\)") as err:
            build()
        one_line(err)


# --- 5. a pin keyed by a number (YAML) --------------------------------------------------------------------------------


def test_a_pin_keyed_by_a_number_pins_that_layer():
    config = SoftConfig(budget={"kind": "params", "reduction": 1.2}, pin={0: 0.5})  # YAML: pin: {0: 0.5}
    assert config.pin == {"0": 0.5}
    soft = SoftThreshold(mlp(), Plan([Rule(Filter(sparsity=0.9), match="0")]), config)  # before: TypeError
    assert list(soft.pins.values()) == [0.5]


# --- 6. sensitivity curves that miss a target -------------------------------------------------------------------------


@pytest.mark.parametrize("curves", [{}, {"x": {0.5: 1.0}}, {"0.weight:filter": {}}],
                         ids=["empty", "other", "no-points"])
def test_sensitivity_curves_that_miss_a_target_are_refused_naming_it(curves):
    plan = Plan([Rule(Filter(sparsity=0.5), match="0")])
    with pytest.raises(BudgetError, match=r"no points for targets \['0.weight:filter'\]") as err:
        sensitivity_plan(mlp(), plan, {"kind": "params", "reduction": 1.2}, curves)
    one_line(err)


# --- 7. Torch-Pruning leaves every layer outside the plan alone ------------------------------------------------------


def test_torch_pruning_prunes_only_the_plans_layers():
    pytest.importorskip("torch_pruning")
    model = nn.Sequential(nn.Conv1d(4, 32, 3), nn.ReLU(), nn.Conv1d(32, 32, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 12, 10))
    x = torch.randn(2, 4, 16)
    found = torch_pruning_plan(model, Plan([Rule(Filter(sparsity=0.9), match="2")]), {"kind": "macs",
                                                                                      "reduction": 1.5}, x)
    shapes = gemm_shapes(model, x)
    targets = found.resolve_coupled(model, x)
    rates = {t.key: t.structure.target_sparsity for t in targets}
    # before: TP also pruned Conv1d '0' (outside the plan), so the plan's rates met a third of the budget
    assert cost_at_rates(model, targets, rates, shapes, "macs") <= structured_cost(shapes, {}, "macs") / 1.5


# --- 8. nn.MultiheadAttention under a MACs budget ---------------------------------------------------------------------


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.ff = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 8)

    def forward(self, x):
        return self.ff(self.attn(x, x, x)[0])


def test_a_target_inside_multihead_attention_is_refused_by_a_macs_budget_and_counted_by_a_params_budget():
    model, x = WithAttention(), torch.randn(2, 10, 32)
    plan = Plan([Rule(structure_class("column")(sparsity=0.5), match="attn.out_proj")])
    with pytest.raises(BudgetError, match=r"\['attn.out_proj'\] are inside an nn.MultiheadAttention.*a macs budget "
                                          r"cannot see them; use a params budget") as err:
        SoftThreshold(model, plan, SoftConfig(budget={"kind": "macs", "reduction": 1.2}), example=x)
    one_line(err)  # before: "did not run on the example input", false
    with pytest.raises(BudgetError, match="inside an nn.MultiheadAttention") as err:
        uniform_plan(model, plan, {"kind": "macs", "reduction": 1.1}, example=x)
    one_line(err)
    # a params budget counts every Linear/Conv weight, whichever layers the example reaches
    soft = SoftThreshold(model, plan, SoftConfig(budget={"kind": "params", "reduction": 1.1}), example=x)
    assert soft.dense_cost == 32 * 32 + 8 * 32
    assert uniform_plan(model, plan, {"kind": "params", "reduction": 1.1}, example=x).rules
