"""Wrong inputs to the plan API are one PlanError line naming the problem: file paths of any suffix, binary
files, folders, Plan(...) items that are no rules, and resolve_coupled examples the model cannot read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.models import LeNet5
from admmcompress.plan import Plan, PlanError
from admmcompress.structures import Filter, Unstructured

YAML_PLAN = "rules:\n  - {match: fc1, structure: unstructured, sparsity: 0.5}\n"


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("name", ["plan.YAML", "plan.Yml", "plan.txt", "plan"])
def test_an_existing_plan_file_is_read_whatever_its_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text(YAML_PLAN)
    for source in (path, str(path)):  # the old code took "plan.YAML" or "plan.txt" for YAML text
        assert [t.key for t in Plan.from_yaml(source).resolve(LeNet5())] == ["fc1.weight:unstructured"]


@pytest.mark.parametrize("name", ["missing.txt", "missing.YAML", "missing"])
def test_a_missing_file_of_any_suffix_is_named_as_missing(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlanError) as err:  # not "plan: 'rules' must be a list of rule mappings"
        Plan.from_yaml(name)
    assert one_line(err).startswith(f"plan file '{name}' does not exist")


@pytest.mark.parametrize("name", ["plan.yaml", "weights.bin"])
def test_a_binary_file_is_a_plan_error_not_a_unicode_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(PlanError) as err:
        Plan.from_yaml(str(path))
    assert "is not a text (YAML) file: byte 0x89 at offset 0 is not UTF-8" in one_line(err)


def test_a_folder_is_named_as_a_folder(tmp_path):
    folder = tmp_path / "plans.yaml"
    folder.mkdir()
    for source in (folder, str(folder), str(tmp_path)):
        with pytest.raises(PlanError) as err:  # not "does not exist"
            Plan.from_yaml(source)
        assert "is a folder; give the plan's YAML file in it" in one_line(err)


@pytest.mark.parametrize(("text", "said"), [("", "it is empty"), ("fc1\n", "a YAML str"), ("5", "a YAML int")])
def test_a_file_without_a_plan_says_which_file(tmp_path, text, said):
    path = tmp_path / "plan.txt"
    path.write_text(text)
    with pytest.raises(PlanError) as err:
        Plan.from_yaml(path)
    assert one_line(err).startswith(f"plan file '{path}' holds no plan ({said})")


def test_a_long_one_line_yaml_string_is_still_yaml():
    text = "{rules: [{match: fc1, structure: unstructured, sparsity: 0.5}]}" + " " * 300  # too long for a file name
    assert len(Plan.from_yaml(text).rules) == 1


def test_from_yaml_of_something_else_says_what_it_takes():
    with pytest.raises(PlanError) as err:
        Plan.from_yaml({"rules": []})  # type: ignore[arg-type]
    assert "takes a YAML file path or a YAML string, got dict; for a mapping or a list use Plan.from_dict" in one_line(
        err
    )


@pytest.mark.parametrize(
    ("rules", "said"),
    [
        ("fc1", "Plan('fc1'): a plan takes a mapping"),
        (b"fc1", "Plan(b'fc1'): a plan takes a mapping"),
        (None, "Plan(None): a plan takes a mapping"),
        (5, "Plan(5): a plan takes a mapping"),
        (["fc1"], "Plan rule #0 is str 'fc1', not a Rule: a plan takes a mapping"),
        ([{"match": "fc1"}], "not a Rule (a rule mapping goes through Plan.from_dict)"),
        ([torch.zeros(100)], "Plan rule #0 is Tensor tensor([0., 0., 0."),
    ],
)
def test_plan_items_that_are_no_rules_are_refused_when_built(rules, said):
    with pytest.raises(PlanError) as err:  # the old code built these and failed later (AttributeError, TypeError)
        Plan(rules)
    text = one_line(err)
    assert said in text and len(text) < 300, text


def test_a_valid_plan_still_builds_from_a_generator_of_rules():
    from admmcompress.plan import Rule

    plan = Plan(Rule(Unstructured(sparsity=0.5), match=name) for name in ("fc1", "fc2"))
    assert [r.match for r in plan.rules] == ["fc1", "fc2"]


def forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize(
    ("example", "said"),
    [
        (torch.zeros(1, 3, 5, 5), "the example input (tensor (1, 3, 5, 5) float32) does not fit LeNet5: RuntimeError"),
        ((torch.zeros(1, 1, 28, 28), torch.zeros(2)), "does not fit LeNet5: TypeError: "),
        ({"images": torch.zeros(1, 1, 28, 28)}, "(dict images: tensor (1, 1, 28, 28) float32) does not fit LeNet5"),
        (None, "coupled targets need an example input to trace the model's tied channels, got None"),
    ],
)
def test_an_example_the_model_cannot_read_is_a_plan_error(example, said):
    model = LeNet5()
    plan = Plan({"conv1": Filter(sparsity=0.5)})
    with pytest.raises(PlanError) as err:  # the old code raised torch's RuntimeError / TypeError
        plan.resolve_coupled(model, example)
    assert said in one_line(err)
    assert forward_hooks(model) == 0  # Torch-Pruning's tracing hooks are not left on the model
    assert [t.key for t in plan.resolve_coupled(model, torch.zeros(1, 1, 28, 28))] == ["conv1:coupled-filter"]


def _sequential() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def test_drivers_and_hard_prune_take_a_plan_or_its_rules_as_well_as_targets():
    """A Plan, its mapping or a list of Rules is resolved on the model where targets are expected, so the README's
    ADMM(model, plan) and hard_prune(model, targets) forms can be mixed up without an AttributeError."""
    from admmcompress import ADMM, Reweighted, Rule, hard_prune

    rule = Rule(Unstructured(sparsity=0.5), match="0")
    for plan in (Plan([rule]), [rule], {"0": Unstructured(sparsity=0.5)}):
        model = _sequential()
        assert [t.key for t in ADMM(model, plan).targets] == ["0.weight:unstructured"]
        assert [t.key for t in Reweighted(model, plan).targets] == ["0.weight:unstructured"]
        masks = hard_prune(model, plan)
        assert int((model[0].weight == 0).sum()) == 96 and "0.weight" in masks.masks


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        ("rules: [{match: '0', structure: unstructured, sparsity: 0.5}]",
         "ADMM got str \"rules: [{match: '...d, sparsity: 0.5}]\": it takes a Plan or resolved targets; read a "
         "YAML plan with Plan.from_yaml(path or text)"),
        (0.5, "ADMM got float 0.5: it takes a Plan"),
        ([Unstructured(sparsity=0.5)], "ADMM: Unstructured"),
    ],
)
def test_what_is_no_plan_and_no_targets_is_one_line(plan, expected):
    from admmcompress import ADMM

    with pytest.raises(PlanError) as err:
        ADMM(_sequential(), plan)
    assert one_line(err).startswith(expected)


def test_the_yaml_shape_given_to_plan_names_from_dict():
    with pytest.raises(PlanError) as err:
        Plan({"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]})
    assert one_line(err).startswith("Plan({'rules': [...]}) is a plan's YAML shape: build it with Plan.from_dict")
