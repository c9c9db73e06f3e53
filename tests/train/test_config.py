"""RunConfig: YAML parsing, validation messages that name the key, and dict round trips."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from admmcompress.plan import Plan
from admmcompress.train.config import ADMMPhaseConfig, ConfigError, PhaseConfig, RunConfig, StageConfig

PLAN = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]}


def base_spec() -> dict:
    return {
        "name": "tiny",
        "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 32, "train_limit": 100},
        "pretrain": {"epochs": 1, "optimizer": {"name": "adam", "lr": 1.0e-3}},
        "stages": [
            {
                "plan": copy.deepcopy(PLAN),
                "method": "admm",
                "admm": {"epochs": 2, "rho": 1.0e-3, "optimizer": {"name": "sgd", "lr": 0.01}},
                "retrain": {"epochs": 1, "lr_schedule": "constant"},
            }
        ],
    }


def write(tmp_path: Path, spec, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


def load(tmp_path: Path, spec) -> RunConfig:
    return RunConfig.from_yaml(write(tmp_path, spec))


def test_valid_config_builds_typed_objects(tmp_path):
    config = load(tmp_path, base_spec())
    assert config.name == "tiny"
    assert config.data.batch_size == 32 and config.data.train_limit == 100
    assert isinstance(config.pretrain, PhaseConfig) and config.pretrain.epochs == 1
    (stage,) = config.stages
    assert isinstance(stage, StageConfig) and isinstance(stage.plan, Plan)
    assert isinstance(stage.admm, ADMMPhaseConfig)
    assert stage.admm.optimizer.name == "sgd" and stage.admm.optimizer.lr == 0.01
    assert stage.admm.update_every_epochs == 1 and stage.admm.update_every_steps is None
    assert stage.admm.lr_schedule == "admm_reset"
    assert stage.retrain.lr_schedule == "constant"


def test_to_dict_from_dict_round_trip(tmp_path):
    spec = base_spec()
    spec["stages"].append(
        {
            "plan": {"rules": [{"match": "fc2", "structure": "filter", "compression": 4}]},
            "method": "gradual",
            "admm": {"epochs": 3, "update_every_steps": 5},
        }
    )
    config = load(tmp_path, spec)
    as_dict = config.to_dict()
    # the dict is plain data (it is written to config.yaml and safetensors metadata)
    again = RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(as_dict)))
    assert again.to_dict() == as_dict
    assert again.stages[1].admm.update_every_steps == 5
    assert again.stages[1].admm.update_every_epochs is None
    assert again.stages[1].plan.rules[0].structure.target_sparsity == pytest.approx(0.75)


def test_relative_pretrained_path_is_resolved_against_the_config_folder(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "dense.safetensors").write_bytes(b"")
    spec = base_spec()
    del spec["pretrain"]
    spec["pretrained"] = "ckpt/dense.safetensors"
    config = load(tmp_path, spec)
    assert Path(config.pretrained) == (tmp_path / "ckpt" / "dense.safetensors").resolve()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.update(modle={"name": "lenet5"}), r"config: unknown key\(s\) \['modle'\]"),
        (lambda s: s["data"].update(batchsize=3), r"data: unknown key\(s\) \['batchsize'\]"),
        (
            lambda s: s["stages"][0].update(retrian={"epochs": 1}),
            r"stages\[0\]: unknown key\(s\) \['retrian'\]",
        ),
        (
            lambda s: s["stages"][0]["admm"].update(rho_grwoth=2),
            r"stages\[0\]: admm: unknown key\(s\) \['rho_grwoth'\]",
        ),
        (
            lambda s: s["stages"][0]["admm"]["optimizer"].update(momentun=0.9),
            r"stages\[0\]: admm: optimizer: unknown key\(s\) \['momentun'\]",
        ),
        (lambda s: s["pretrain"].update(epoch=3), r"pretrain: unknown key\(s\) \['epoch'\]"),
        (
            lambda s: s["pretrain"]["optimizer"].update(name="rmsprop"),
            r"optimizer name='rmsprop'; choose one of",
        ),
        (lambda s: s["pretrain"].update(epochs=-1), r"epochs=-1 must be an integer >= 0"),
        (lambda s: s["pretrain"].update(epochs=1.5), r"epochs=1.5 must be an integer >= 0"),
        (lambda s: s["stages"][0]["retrain"].update(epochs=-2), r"stages\[0\]: retrain: epochs=-2"),
        (lambda s: s["pretrain"]["optimizer"].update(lr=0), r"lr=0 must be a positive number"),
        (lambda s: s["stages"][0]["admm"]["optimizer"].update(lr=-0.1), r"lr=-0.1 must be a positive number"),
        (lambda s: s["stages"][0]["admm"].update(rho=0), r"rho=0 must be a positive number"),
        (lambda s: s["stages"][0]["admm"].update(rho=-1.0), r"rho=-1.0 must be a positive number"),
        (
            lambda s: s["stages"][0]["admm"].update(update_every_epochs=1, update_every_steps=10),
            r"update_every_epochs or update_every_steps, not both",
        ),
        (
            lambda s: s["stages"][0]["admm"].update(update_every_steps=0),
            r"update_every_steps=0 must be a positive",
        ),
        (lambda s: s["stages"][0]["admm"].update(lr_schedule="step"), r"lr_schedule='step'; choose one of"),
        (lambda s: s.pop("pretrain"), r"give 'pretrained' .* or 'pretrain'"),
        (
            lambda s: s["stages"][0].update(method="prune"),
            r"method='prune'; choose one of \['admm', 'gradual'",
        ),
        (lambda s: s.update(model="lenet5"), r"model: give a mapping with 'name'"),
        (lambda s: s.update(stages={"plan": PLAN}), r"stages must be a list"),
        (lambda s: s["data"].update(batch_size=0), r"batch_size=0 must be a positive integer"),
        (lambda s: s.update(checkpoint_every_epochs=0), r"checkpoint_every_epochs=0"),
        (lambda s: s["stages"][0].pop("plan"), r"stages\[0\]: .*plan"),
        (lambda s: s["stages"][0]["admm"].update(rho_growth=0.5), r"rho_growth=0.5 must be >= 1"),
        (lambda s: s["stages"][0]["admm"].update(rho_max=1e-4), r"rho_max=0.0001 must be >= rho=0.001"),
        (lambda s: s["stages"][0]["admm"].update(rho_max="big"), r"rho_max='big' must be a finite number"),
        (
            lambda s: s["pretrain"]["optimizer"].update(weight_decay="1e-4"),
            r"weight_decay='1e-4'.*write it with a dot",
        ),
        (lambda s: s["data"].update(train_limit=-5), r"data: train_limit=-5 must be a positive integer"),
        (lambda s: s["data"].update(test_limit=0), r"data: test_limit=0 must be a positive integer"),
        (lambda s: s.update(threads=-1), r"threads=-1 must be a positive integer"),
        (lambda s: s.update(seed="zero"), r"seed='zero' must be an integer"),
        (lambda s: s["pretrain"].update(label_smoothing=1.0), r"label_smoothing=1.0 must be in \[0, 1\)"),
        (lambda s: s.update(autocast="fp16"), r"autocast='fp16'; choose one of"),
        (lambda s: s.update(channels_last="yes"), r"channels_last='yes' must be true or false"),
    ],
)
def test_validation_errors_name_the_key(tmp_path, mutate, match):
    spec = base_spec()
    mutate(spec)
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, spec)


def test_plan_error_inside_a_stage_names_the_rule(tmp_path):
    spec = base_spec()
    spec["stages"][0]["plan"] = {
        "rules": [
            {"match": "fc1", "structure": "unstructured", "sparsity": 0.9},
            {"match": "fc2", "structure": "diagonal", "sparsity": 0.5},
        ]
    }
    with pytest.raises(ConfigError, match=r"(?s)stages\[0\]: .*rule #1.*unknown structure 'diagonal'"):
        load(tmp_path, spec)


def test_plan_with_an_out_of_range_target_is_rejected(tmp_path):
    spec = base_spec()
    spec["stages"][0]["plan"]["rules"][0]["sparsity"] = 1.5
    with pytest.raises(ConfigError, match=r"(?s)stages\[0\]: .*rule #0.*sparsity=1.5"):
        load(tmp_path, spec)


def test_yaml_exponent_without_a_dot_gets_a_hint(tmp_path):
    # YAML 1.1 reads 1e-3 as the string "1e-3"; the error says how to write it.
    spec = base_spec()
    text = yaml.safe_dump(spec).replace("lr: 0.001", "lr: 1e-3")
    assert "lr: 1e-3" in text
    with pytest.raises(ConfigError, match=r"lr='1e-3' must be a positive number \(YAML read '1e-3' as text"):
        load(tmp_path, text)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "model: {name: lenet5\nstages: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config: expected a mapping, got list"):
        load(tmp_path, "- a\n- b\n")


def test_empty_yaml_asks_for_the_model(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        load(tmp_path, "")


def test_config_errors_are_value_errors():
    # the CLI turns ValueError into a one-line user error
    assert issubclass(ConfigError, ValueError)
