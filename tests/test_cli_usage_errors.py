"""Usage mistakes on the command line, and one-problem plan errors, are one line each (the bad-input audit)."""

from __future__ import annotations

import pytest

from admmcompress.cli import main
from admmcompress.models import create_model
from admmcompress.plan import Plan, PlanError


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "x.yaml", "--threads", "abc"], "admmcompress run: error: argument --threads: invalid int value"),
        (["hardware", "somewhere", "--tile", "0"], "admmcompress hardware: error: argument --tile"),
        (["frob"], "admmcompress: error: argument command: invalid choice: 'frob'"),
    ],
)
def test_a_usage_mistake_is_one_line_pointing_at_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as code:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(expected) and err[0].endswith("--help)")


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as code:
        main(["run", "--help"])
    assert code.value.code == 0 and "usage: admmcompress run" in capsys.readouterr().out


def test_a_plan_with_one_problem_is_one_line_and_several_are_listed():
    model = create_model("lenet5")
    with pytest.raises(PlanError) as one:
        Plan.from_dict({"rules": [{"match": "conv9", "structure": "unstructured", "sparsity": 0.5}]}).resolve(model)
    assert "\n" not in str(one.value) and str(one.value).startswith("the plan does not fit this model: ")
    with pytest.raises(PlanError) as two:
        Plan.from_dict({"rules": [{"match": "conv9", "structure": "unstructured", "sparsity": 0.5},
                                  {"match": "fc9", "structure": "unstructured", "sparsity": 0.5}]}).resolve(model)
    assert str(two.value).count("\n  - ") == 2


def test_a_rule_matching_a_list_says_to_write_one_rule_per_pattern():
    with pytest.raises(PlanError, match=r"match takes one glob, e\.g\. match: \"conv\*\"; for several layers"):
        Plan.from_dict({"rules": [{"match": ["conv1", "conv2"], "structure": "unstructured", "sparsity": 0.5}]})


def test_a_structure_that_is_not_a_name_is_not_called_missing():
    with pytest.raises(PlanError, match="structure=5 must be a name"):
        Plan.from_dict({"rules": [{"match": "fc1", "structure": 5, "sparsity": 0.5}]})


def test_a_model_argument_the_layers_refuse_names_the_model_and_its_arguments():
    with pytest.raises(ValueError, match=r"model 'lenet5' \{'dropout': 2.0\}: dropout probability .* fix the model's"):
        create_model("lenet5", dropout=2.0)


def test_an_empty_out_for_a_run_is_refused(capsys):
    assert main(["run", "any.yaml", "--out", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["admmcompress: error: --out is empty; give a folder name, or leave --out out for runs/<name>-<time>"]


@pytest.mark.parametrize("command", [["report", "{long}"], ["run", "{long}.yaml"], ["export", "--packed", "{long}",
                                                                                     "--out", "o.bin"]])
def test_an_os_error_on_a_path_is_one_line_naming_it(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long = "a" * 300  # longer than any file system allows one name
    assert main([part.format(long=long) for part in command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("admmcompress: error: cannot use '") and long in err[0] and "too long" in err[0]
