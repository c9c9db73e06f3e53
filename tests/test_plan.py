"""Plans: building from Python/dict/YAML, round trips, and validation against a model."""

import re

import pytest
import torch
from torch import nn

from admmcompress.models import LeNet5
from admmcompress.plan import Plan, PlanError, Rule, Target, prunable_layers
from admmcompress.structures import Channel, Column, Filter, Unstructured

YAML_PLAN = """\
rules:
  - {match: "conv*", structure: filter, sparsity: 0.5}
  - match: fc1
    structure: unstructured
    compression: 10
  - {type: Linear, match: "fc2", structure: column, sparsity: 0.2}
"""


def lenet_targets(targets):
    return [(t.layer, t.param, t.structure.kind, t.structure.target_sparsity, t.rule) for t in targets]


EXPECTED = [
    ("conv1", "weight", "filter", 0.5, 0),
    ("conv2", "weight", "filter", 0.5, 0),
    ("fc1", "weight", "unstructured", pytest.approx(0.9, abs=1e-15), 1),
    ("fc2", "weight", "column", 0.2, 2),
]


def test_prunable_layers_of_lenet5():
    assert prunable_layers(LeNet5()) == ["conv1", "conv2", "fc1", "fc2"]


def test_plan_from_python_mapping():
    plan = Plan({"conv*": Filter(sparsity=0.5), "fc1": Unstructured(compression=10)})
    targets = plan.resolve(LeNet5())
    assert lenet_targets(targets) == EXPECTED[:3]
    assert [t.key for t in targets] == [
        "conv1.weight:filter",
        "conv2.weight:filter",
        "fc1.weight:unstructured",
    ]
    assert [t.param_name for t in targets] == ["conv1.weight", "conv2.weight", "fc1.weight"]
    assert all(isinstance(t, Target) for t in targets)


def test_plan_from_rules_list():
    plan = Plan(
        [Rule(Filter(sparsity=0.5), type="Conv2d"), Rule(Channel(sparsity=0.5), match="fc*", type="Linear")]
    )
    assert [(t.layer, t.structure.kind) for t in plan.resolve(LeNet5())] == [
        ("conv1", "filter"),
        ("conv2", "filter"),
        ("fc1", "channel"),
        ("fc2", "channel"),
    ]


def test_plan_from_dict_and_bare_list():
    rules = [
        {"match": "conv*", "structure": "filter", "sparsity": 0.5},
        {"match": "fc1", "structure": "unstructured", "compression": 10},
        {"type": "Linear", "match": "fc2", "structure": "column", "sparsity": 0.2},
    ]
    assert lenet_targets(Plan.from_dict({"rules": rules}).resolve(LeNet5())) == EXPECTED
    assert lenet_targets(Plan.from_dict(rules).resolve(LeNet5())) == EXPECTED


def test_plan_from_yaml_string():
    assert lenet_targets(Plan.from_yaml(YAML_PLAN).resolve(LeNet5())) == EXPECTED


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_plan_from_yaml_file(tmp_path, suffix):
    path = tmp_path / f"plan{suffix}"
    path.write_text(YAML_PLAN)
    assert lenet_targets(Plan.from_yaml(path).resolve(LeNet5())) == EXPECTED
    assert lenet_targets(Plan.from_yaml(str(path)).resolve(LeNet5())) == EXPECTED


def test_round_trip_to_dict_from_dict_and_yaml():
    import yaml

    plan = Plan.from_yaml(YAML_PLAN)
    d = plan.to_dict()
    assert d == {
        "rules": [
            {"match": "conv*", "structure": "filter", "sparsity": 0.5},
            {"match": "fc1", "structure": "unstructured", "compression": 10},
            {"match": "fc2", "type": "Linear", "structure": "column", "sparsity": 0.2},
        ]
    }
    again = Plan.from_dict(d)
    assert again.to_dict() == d
    assert again.rules == plan.rules
    assert Plan.from_yaml(yaml.safe_dump(d)).rules == plan.rules
    model = LeNet5()
    assert again.resolve(model) == plan.resolve(model)


def test_two_structures_on_one_layer_give_two_targets():
    plan = Plan.from_dict(
        [
            {"match": "conv2", "structure": "filter", "sparsity": 0.5},
            {"match": "conv2", "structure": "column", "sparsity": 0.3},
        ]
    )
    targets = plan.resolve(LeNet5())
    assert [t.key for t in targets] == ["conv2.weight:filter", "conv2.weight:column"]
    assert {t.param_name for t in targets} == {"conv2.weight"}


def test_root_module_and_nested_names():
    assert [t.param_name for t in Plan({"": Unstructured(sparsity=0.5)}).resolve(nn.Linear(3, 3))] == [
        "weight"
    ]
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Linear(4, 2))
    assert [t.param_name for t in Plan({"0.*": Filter(sparsity=0.5)}).resolve(model)] == ["0.0.weight"]


def test_match_is_case_sensitive_glob():
    with pytest.raises(PlanError, match="matches no layer"):
        Plan({"FC1": Unstructured(sparsity=0.5)}).resolve(LeNet5())


# --- validation errors -------------------------------------------------------------------


def resolve_error(rules, model=None) -> str:
    with pytest.raises(PlanError) as info:
        Plan.from_dict(rules).resolve(model if model is not None else LeNet5())
    return str(info.value)


def test_plan_error_is_a_value_error():
    assert issubclass(PlanError, ValueError)


def test_unknown_layer_pattern_lists_prunable_layers():
    msg = resolve_error([{"match": "conv9", "structure": "filter", "sparsity": 0.5}])
    assert "rule #0 rule(match='conv9', filter): matches no layer of the model" in msg
    assert "prunable layers are: conv1, conv2, fc1, fc2" in msg


def test_pattern_naming_a_module_without_weight():
    msg = resolve_error([{"match": "pool", "structure": "unstructured", "sparsity": 0.5}])
    assert "layer 'pool' is MaxPool2d and has no weight to prune; prunable: conv1, conv2, fc1, fc2" in msg


def test_type_not_in_the_model():
    msg = resolve_error([{"type": "Conv3d", "structure": "filter", "sparsity": 0.5}])
    assert "the model has no module of type 'Conv3d'; its prunable types: ['Conv2d', 'Linear']" in msg


def test_type_present_but_without_weight_matches_nothing():
    msg = resolve_error([{"type": "MaxPool2d", "structure": "unstructured", "sparsity": 0.5}])
    assert "matches no layer of the model" in msg


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5])
def test_ratio_outside_unit_interval(bad):
    with pytest.raises(
        PlanError, match=re.escape(f"plan rule #0: Filter: sparsity={bad!r} is outside (0, 1)")
    ):
        Plan.from_dict([{"match": "conv1", "structure": "filter", "sparsity": bad}])


def test_compression_not_above_one():
    with pytest.raises(PlanError, match=re.escape("plan rule #0: Column: compression=0.5 must be > 1")):
        Plan.from_dict([{"match": "conv1", "structure": "column", "compression": 0.5}])


def test_unknown_structure_name():
    with pytest.raises(PlanError, match="plan rule #0: unknown structure 'kernel'"):
        Plan.from_dict([{"match": "conv1", "structure": "kernel", "sparsity": 0.5}])


@pytest.mark.parametrize("structure", ["filter", "column", "channel"])
@pytest.mark.parametrize(
    ("module", "type_name"), [(nn.BatchNorm2d(3), "BatchNorm2d"), (nn.Embedding(10, 3), "Embedding")]
)
def test_structure_not_valid_for_module_type(structure, module, type_name):
    model = nn.Sequential(nn.Conv2d(3, 3, 3), module)
    msg = resolve_error([{"match": "*", "structure": structure, "sparsity": 0.5}], model)
    assert f"layer '1' is {type_name}; structure '{structure}' supports Linear, Conv1d, Conv2d, Conv3d" in msg
    assert "layer '0'" not in msg  # the conv itself is fine


def test_unstructured_accepts_any_weight():
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Embedding(10, 3))
    targets = Plan({"*": Unstructured(sparsity=0.5)}).resolve(model)
    assert [t.layer for t in targets] == ["0", "1", "2"]


def test_duplicate_rules_same_structure_same_layer():
    msg = resolve_error(
        [
            {"match": "conv*", "structure": "filter", "sparsity": 0.5},
            {"match": "conv2", "structure": "filter", "sparsity": 0.7},
        ]
    )
    assert (
        "rule #1 rule(match='conv2', filter) and rule #0 rule(match='conv*', filter) both give layer 'conv2'"
        in msg
    )
    assert "conv1" not in msg.split("both give")[1]


def test_unknown_keys_in_a_rule():
    with pytest.raises(
        PlanError, match=re.escape("plan rule #0: unknown key(s) ['epochs', 'ratio']; allowed keys")
    ):
        Plan.from_dict(
            [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5, "ratio": 3, "epochs": 1}]
        )


def test_unknown_keys_at_top_level():
    with pytest.raises(PlanError, match=re.escape("plan: unknown key(s) ['rho']; a plan has only 'rules'")):
        Plan.from_dict(
            {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}], "rho": 0.01}
        )


def test_missing_plan_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PlanError, match=r"plan file '.*missing\.yaml' does not exist"):
        Plan.from_yaml(missing)
    with pytest.raises(PlanError, match=r"plan file '.*missing\.yaml' does not exist"):
        Plan.from_yaml(str(missing))


def test_malformed_plans():
    with pytest.raises(PlanError, match="the plan has no rules"):
        Plan.from_dict({"rules": []})
    with pytest.raises(PlanError, match="'rules' must be a list"):
        Plan.from_dict({"rules": {"match": "fc1"}})
    with pytest.raises(PlanError, match="'rules' must be a list"):
        Plan.from_dict({})
    with pytest.raises(PlanError, match="plan rule #0: expected a mapping"):
        Plan.from_dict(["fc1"])
    with pytest.raises(PlanError, match="a rule needs 'match'"):
        Plan.from_dict([{"structure": "filter", "sparsity": 0.5}])
    with pytest.raises(PlanError, match="rule structure must be a SparsityStructure"):
        Rule(structure="filter", match="fc1")


def test_unquoted_numeric_match_in_yaml_is_a_plan_error():
    # YAML reads `match: 0` as an int; nn.Sequential names are digits.
    with pytest.raises(
        PlanError, match=re.escape("rule match=0 must be a string (got int); quote it in YAML")
    ):
        Plan.from_yaml("rules:\n  - {match: 0, structure: unstructured, sparsity: 0.5}\n")


def test_several_errors_reported_together_when_parsing():
    with pytest.raises(PlanError) as info:
        Plan.from_dict(
            [
                {"match": "fc1", "structure": "unstructured", "sparsity": 1.5},
                {"match": "fc2", "structure": "unknown", "sparsity": 0.5},
                {"match": "conv1", "structure": "filter", "sparsity": 0.5, "bogus": 1},
            ]
        )
    msg = str(info.value)
    assert msg.startswith("invalid plan:")
    assert "plan rule #0: Unstructured: sparsity=1.5 is outside" in msg
    assert "plan rule #1: unknown structure 'unknown'" in msg
    assert "plan rule #2: unknown key(s) ['bogus']" in msg


def test_several_errors_reported_together_when_resolving():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    msg = resolve_error(
        [
            {"match": "nope", "structure": "filter", "sparsity": 0.5},
            {"match": "2", "structure": "unstructured", "sparsity": 0.5},
            {"type": "GRU", "structure": "unstructured", "sparsity": 0.5},
            {"type": "BatchNorm2d", "structure": "channel", "sparsity": 0.5},
            {"match": "4", "structure": "filter", "sparsity": 0.5},
            {"match": "[04]", "structure": "filter", "sparsity": 0.5},
        ],
        model,
    )
    assert msg.startswith("the plan does not fit this model:")
    problems = msg.split("\n  - ")[1:]
    assert len(problems) == 5
    assert problems[0].startswith("rule #0") and "matches no layer" in problems[0]
    assert problems[1].startswith("rule #1") and "layer '2' is ReLU and has no weight" in problems[1]
    assert problems[2].startswith("rule #2") and "no module of type 'GRU'" in problems[2]
    assert problems[3].startswith("rule #3") and "layer '1' is BatchNorm2d" in problems[3]
    assert problems[4].startswith("rule #5") and "both give layer '4'" in problems[4]


def test_plan_repr_names_rules():
    text = repr(Plan({"fc*": Column(sparsity=0.5)}))
    assert text == "Plan([\"rule(match='fc*', column)\"])"


def test_resolve_does_not_touch_the_model():
    model = LeNet5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Plan.from_yaml(YAML_PLAN).resolve(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_resolve_coupled_traces_a_model_once_and_again_when_its_layers_change(monkeypatch):
    from admmcompress.plan import graph

    calls = []
    real = graph.build_dependency_graph
    monkeypatch.setattr(graph, "build_dependency_graph", lambda m, x: calls.append(1) or real(m, x))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    plan = Plan({"0": Filter(sparsity=0.5)})
    first = plan.resolve_coupled(model, torch.zeros(1, 3, 8, 8))
    again = plan.resolve_coupled(model, torch.ones(1, 3, 8, 8))  # same shape: served from the cache
    assert len(calls) == 1 and [t.key for t in again] == [t.key for t in first] == ["0:coupled-filter"]
    assert again[0].members == first[0].members == ("0", "1", "3")
    plan.resolve_coupled(model, torch.zeros(2, 3, 8, 8))  # another example shape traces again
    assert len(calls) == 2
    model[3] = nn.Conv2d(8, 6, 3)  # a replaced layer invalidates the cached groups
    plan.resolve_coupled(model, torch.zeros(1, 3, 8, 8))
    assert len(calls) == 3
