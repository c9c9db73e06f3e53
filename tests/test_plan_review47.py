"""Plan rules a review found accepted wrongly: a misspelt exclude, rates dropped by low-rank rules, a heads rate given
as compression, and a misspelt structure name reported as its options' keys."""

from __future__ import annotations

import pytest
from torch import nn

from admmcompress.plan import Plan, PlanError


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.classifier = nn.Linear(8, 8), nn.Linear(8, 2)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = 2, 4
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))


def test_an_exclude_that_matches_no_layer_is_said_not_ignored():
    plan = Plan.from_yaml("rules: [{type: Linear, exclude: [clasifier], structure: unstructured, sparsity: 0.5}]")
    with pytest.warns(UserWarning, match=r"exclude \['clasifier'\] matches no layer of this model, so it keeps"):
        plan.resolve(Classifier())
    one_of = Plan.from_yaml("rules: [{type: Linear, exclude: [classifier, '*.head'], structure: unstructured, "
                            "sparsity: 0.5}]")
    assert [t.layer for t in one_of.resolve(Classifier())] == ["fc1"]  # one alternative matching is enough


@pytest.mark.parametrize("rule", ["{match: c, structure: tucker2, ranks: [2, 2], sparsity: 0.9}",
                                  "{match: c, structure: shared_kernels, bases: 5, compression: 2}"])
def test_low_rank_rules_refuse_a_rate_instead_of_dropping_it(rule):
    with pytest.raises(PlanError, match="takes no (sparsity|compression).*separate rule"):
        Plan.from_yaml(f"rules: [{rule}]")


def test_a_heads_rate_given_as_compression_is_checked_as_the_same_sparsity():
    for rate in ("sparsity: 0.2", "compression: 1.25"):
        with pytest.raises(PlanError, match="removes none"):
            Plan.from_yaml(f"rules: [{{match: '*q_proj', structure: heads, {rate}}}]").resolve(
                nn.Sequential(Attention()))


def test_a_misspelt_structure_is_named_before_its_options():
    with pytest.raises(PlanError, match="unknown structure 'fixedpoint'; choose one of"):
        Plan.from_yaml("rules: [{match: fc1, structure: fixedpoint, bits: 4}]")


def test_a_gates_count_the_layer_does_not_have_is_refused():
    with pytest.raises(PlanError, match=r"gates=3 but the layer stacks 1 gate matrices"):
        Plan.from_yaml("rules: [{match: fc1, structure: block, block: [2, 2], gates: 3, sparsity: 0.5}]").resolve(
            Classifier())
    gru = nn.Sequential(nn.GRU(8, 8))
    targets = Plan.from_yaml("rules: [{match: '0', structure: block, block: [2, 2], gates: 3, sparsity: 0.5}]")
    assert {t.structure.gates for t in targets.resolve(gru)} == {3}  # what the layer has: accepted


def test_an_exponent_yaml_reads_as_text_gets_the_dot_fix():
    with pytest.raises(PlanError, match="write it with a dot, e.g. 1.0e"):
        Plan.from_yaml("rules: [{match: fc1, structure: unstructured, compression: 1e2}]")
