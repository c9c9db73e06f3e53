"""Plan rule selection: ``exclude`` globs, ``type`` matching subclasses, tied weights refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.structures import Unstructured


class MyLinear(nn.Linear):
    """A subclass, as libraries ship (transformers' NonDynamicallyQuantizableLinear, LoRA layers...)."""


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), MyLinear(8, 8), nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)),
    )


def layers(plan: Plan, model: nn.Module) -> list[str]:
    return [t.layer for t in plan.resolve(model)]


def test_type_matches_subclasses():
    assert layers(Plan([Rule(Unstructured(sparsity=0.5), type="Linear")]), mlp()) == ["0", "2", "4.0", "4.1"]
    assert layers(Plan([Rule(Unstructured(sparsity=0.5), type="MyLinear")]), mlp()) == ["2"]


def test_exclude_one_glob_or_several():
    one = Plan([Rule(Unstructured(sparsity=0.5), type="Linear", exclude="4.1")])
    assert layers(one, mlp()) == ["0", "2", "4.0"]
    several = Plan([Rule(Unstructured(sparsity=0.5), type="Linear", exclude=("4.*", "0"))])
    assert layers(several, mlp()) == ["2"]


def test_exclude_round_trips_through_yaml():
    plan = Plan.from_yaml("rules:\n  - {type: Linear, exclude: ['4.*'], structure: unstructured, sparsity: 0.5}\n")
    assert layers(plan, mlp()) == ["0", "2"]
    assert Plan.from_dict(plan.to_dict()).rules == plan.rules
    assert plan.to_dict()["rules"][0]["exclude"] == ["4.*"]


def test_bad_exclude_and_everything_excluded_are_one_clear_line():
    with pytest.raises(PlanError, match="must be a glob or a list of globs"):
        Rule(Unstructured(sparsity=0.5), type="Linear", exclude=3)
    with pytest.raises(PlanError, match=r"matches no layer once exclude=\['\*'\] is applied"):
        Plan([Rule(Unstructured(sparsity=0.5), type="Linear", exclude="*")]).resolve(mlp())


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most language models

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


def test_tied_weights_with_two_targets_are_refused_naming_both():
    plan = Plan([Rule(Unstructured(sparsity=0.5), match="*")])
    with pytest.raises(PlanError, match=r"layers 'embed' and 'head' share one 'weight' tensor.*exclude: \['head'\]"):
        plan.resolve(TiedLM())


def test_tied_weight_targeted_once_is_accepted():
    plan = Plan([Rule(Unstructured(sparsity=0.5), match="*", exclude="head")])
    assert layers(plan, TiedLM()) == ["embed", "body"]
