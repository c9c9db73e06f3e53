"""Config values that gave tracebacks or misleading one-liners: each is one short line naming the key and the
fix (data_dir of a wrong type, non-text model argument names, models the layers refuse, learning rates past
float32, unhashable autocast, quoted integers, a dataset factory without split=, alias bombs)."""

from __future__ import annotations

import copy
import time

import pytest
import yaml
from torch.utils.data import TensorDataset

from admmcompress.cli import main
from admmcompress.data.imported import DatasetSpec
from admmcompress.models import create_model
from admmcompress.train.config import ConfigError, RunConfig

SPEC = {
    "name": "tiny",
    "model": {"name": "lenet5"},
    "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 256, "test_limit": 200},
    "pretrain": {"epochs": 1},
    "stages": [
        {
            "plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]},
            "admm": {"epochs": 1, "update_every_steps": 2},
            "retrain": {"epochs": 1},
        }
    ],
}


def spec(**overrides) -> dict:
    out = copy.deepcopy(SPEC)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def refused(content: dict, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        RunConfig.from_dict(content)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("admmcompress: error: ")]
    assert len(errors) == 1, err
    return errors[0].removeprefix("admmcompress: error: ")


@pytest.mark.parametrize("data_dir", [5, ["a"], {"a": 1}, True, ""])
def test_data_dir_must_be_a_path(data_dir):
    refused(spec(data={"data_dir": data_dir}), r"data: data_dir=.* must be a folder's path \(text\)")


def test_model_argument_names_must_be_text():
    refused(spec(model={"name": "lenet5", 5: 1}), r"model: argument name 5 must be text")


@pytest.mark.parametrize("autocast", [["bf16"], {"a": 1}, 1])
def test_an_autocast_that_is_not_a_name_is_refused_by_name(autocast):
    message = refused(spec(autocast=autocast), r"autocast=.*; choose one of \['bf16'\]")
    assert "unhashable" not in message


@pytest.mark.parametrize("lr", [1.0e300, 1e39])
def test_a_learning_rate_past_float32_is_refused_before_training(lr):
    content = spec()
    content["stages"][0]["admm"]["optimizer"] = {"name": "sgd", "lr": lr}
    refused(content, r"lr=.* is beyond float32's range")


def test_a_temperature_past_float32_is_refused():
    content = spec()
    content["stages"][0]["retrain"]["distill"] = {"temperature": 1e300}
    refused(content, r"temperature=.* is beyond float32's range")


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size"])
def test_a_quoted_integer_is_told_to_drop_the_quotes(key):
    message = refused(spec(data={key: "1000"}), rf"{key}='1000' must be a positive integer")
    assert "drop the quotes" in message and "with a dot" not in message


def test_quoted_threads_and_an_exponent_integer_get_integer_fixes():
    assert "drop the quotes" in refused(spec(threads="2"), r"threads='2'")
    assert "write a whole number, e.g. 1000" in refused(spec(data={"batch_size": "1e3"}), r"batch_size='1e3'")


def test_float_fields_keep_the_dot_hint_and_quoted_floats_drop_the_quotes():
    content = spec()
    content["stages"][0]["retrain"]["optimizer"] = {"lr": "1e-3"}
    assert "write it with a dot" in refused(content, r"lr='1e-3'")
    content["stages"][0]["retrain"]["optimizer"] = {"lr": "0.001"}
    assert "drop the quotes" in refused(content, r"lr='0.001'")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": -1}, r"model 'lenet5' \{'num_classes': -1\}: .*; fix the model's arguments"),
        ({"num_classes": 1_000_000_000_000}, r"model 'lenet5' .*; fix the model's arguments"),
    ],
)
def test_models_the_layers_refuse_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        create_model("lenet5", **kwargs)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_a_huge_width_is_one_line():
    with pytest.raises(ValueError, match=r"model 'resnet20' \{'width_mult': 1000000\}: ") as err:
        create_model("resnet20", width_mult=1_000_000)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_an_alias_bomb_in_the_model_arguments_is_refused_where_it_grows_past_a_million(tmp_path, capsys):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(["model:", "  name: lenet5", *(f"  {line}" for line in levels)])
    body = yaml.safe_dump({k: v for k, v in SPEC.items() if k != "model"}, sort_keys=False)
    config = tmp_path / "bomb.yaml"
    config.write_text(text + "\n" + body)
    started = time.perf_counter()
    message = error_line(capsys, ["run", str(config), "--dry-run", "--out", str(tmp_path / "out")])
    assert message.startswith(f"{config}: not valid YAML: aliases (*name) expand this document to more than "
                              "1,000,000 values; write the values out instead of nesting aliases at line 9"), message
    assert len(message) < 400
    assert time.perf_counter() - started < 30


def test_a_dataset_factory_without_split_names_the_import_and_the_fix():
    spec_ = DatasetSpec.from_config({"import": "torch.utils.data:TensorDataset"})
    with pytest.raises(ValueError) as err:
        spec_.build("train")
    message = str(err.value)
    assert message.startswith("data.dataset.import='torch.utils.data:TensorDataset' cannot be called with split= "
                              "for the train split (")
    assert "train_args/test_args" in message and "split=" in message and "\n" not in message
    built = DatasetSpec.from_config({"import": "torch.utils.data:TensorDataset", "train_args": {}}).build("train")
    assert isinstance(built, TensorDataset)  # train_args replace split=


def test_a_dataset_factory_without_split_is_one_line_from_the_cli(tmp_path, capsys):
    config = tmp_path / "imported.yaml"
    config.write_text(yaml.safe_dump(spec(data={"dataset": {"import": "torch.utils.data:TensorDataset"},
                                                "train_limit": None, "test_limit": None}), sort_keys=False))
    message = error_line(capsys, ["run", str(config), "--dry-run", "--out", str(tmp_path / "out")])
    assert "cannot be called with split=" in message and "train_args/test_args" in message


def test_a_data_dir_of_a_wrong_type_is_one_line_from_the_cli(tmp_path, capsys):
    config = tmp_path / "dir.yaml"
    config.write_text(yaml.safe_dump(spec(data={"data_dir": 5}), sort_keys=False))
    message = error_line(capsys, ["run", str(config), "--dry-run", "--out", str(tmp_path / "out")])
    assert "data_dir=5 must be a folder's path" in message


def test_the_data_loaders_refuse_a_data_dir_that_is_not_a_path():
    from admmcompress.data.files import find_dataset

    with pytest.raises(ValueError, match="data_dir must be a folder's path, not int"):
        find_dataset("mnist", 5)  # type: ignore[arg-type]


def test_configerror_is_still_the_kind_raised():
    with pytest.raises(ConfigError):
        RunConfig.from_dict(spec(autocast=["bf16"]))
