"""Runs on any torch Dataset named by import path in the config (data.dataset: {import: ...})."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from admmcompress.cli import main
from admmcompress.data.datasets import load_dataset
from admmcompress.data.imported import DatasetLoader, DatasetSpec, load_data
from admmcompress.models import LeNet300100
from admmcompress.train.config import DataConfig
from admmcompress.train.loop import evaluate

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


@pytest.fixture
def importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_loader_order_is_seeded_per_epoch_and_resumes():
    data = TensorDataset(torch.arange(10.0), torch.arange(10))
    first = DatasetLoader(data, 4, seed=3)
    epochs = [[y.tolist() for _, y in first] for _ in range(2)]
    assert sorted(sum(epochs[0], [])) == list(range(10)) and epochs[0] != epochs[1]
    again = DatasetLoader(data, 4, seed=3)
    again.load_state_dict({"epoch": 1})  # a checkpoint after the first epoch
    assert [y.tolist() for _, y in again] == epochs[1]


def test_two_ranks_split_each_epoch_between_them():
    data = TensorDataset(torch.arange(12.0), torch.arange(12))
    ranks = [DatasetLoader(data, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [y.tolist() for loader in ranks for _, y in loader]
    assert all(len(batch) == 2 for batch in seen)  # global batch 4 = 2 per rank
    assert sorted(sum(seen, [])) == list(range(12))
    with pytest.raises(ValueError, match="batch_size=5 is not a multiple of the 2 processes"):
        DatasetLoader(data, 5, world_size=2)


def test_a_dataset_that_does_not_split_evenly_over_the_ranks_says_which_samples_repeat():
    import warnings

    odd = TensorDataset(torch.arange(11.0), torch.arange(11))
    with pytest.warns(RuntimeWarning, match="11 samples do not split evenly over 2 processes: 1 sample"):
        DatasetLoader(odd, 4, rank=0, world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DatasetLoader(odd, 4, rank=1, world_size=2)  # said once, by rank 0
        DatasetLoader(TensorDataset(torch.arange(12.0), torch.arange(12)), 4, rank=0, world_size=2)


def test_config_checks_the_import_spec():
    with pytest.raises(ValueError, match="must be 'package.module:ClassOrFactory'"):
        DataConfig(dataset={"import": "toy_datasets.MnistItems"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kwargs'\]"):
        DataConfig(dataset={"import": "a:b", "kwargs": {}})
    with pytest.raises(ValueError, match="put the transforms of an imported dataset into the dataset"):
        DataConfig(dataset={"import": "a:b"}, augment={"shift": 2})
    assert DatasetSpec.from_config({"import": "a:b", "train_args": {"train": True}}).split_args("train") == {
        "train": True}


def test_wrong_imports_are_one_line(importable):
    with pytest.raises(ValueError, match="cannot be imported"):
        load_data({"import": "toy_datasets:Missing"}, "train")
    with pytest.raises(ValueError, match="returned a list, not a torch.utils.data.Dataset"):
        load_data({"import": "toy_datasets:not_a_dataset"}, "train")
    with pytest.raises(ValueError, match="has no __len__"):
        load_data({"import": "toy_datasets:Endless"}, "train")


def test_a_run_on_an_imported_dataset_trains_prunes_and_evaluates_all_of_it(importable, tmp_path):
    spec = {
        "name": "imported", "seed": 1, "threads": 1,
        "model": {"name": "lenet300100"},
        "data": {"dataset": {"import": "toy_datasets:MnistItems", "args": {"limit": 256}},
                 "batch_size": 32, "test_limit": 100},
        "pretrain": {"epochs": 1},
        "stages": [{"plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]},
                    "admm": {"epochs": 1}, "retrain": {"epochs": 1}}],
    }
    config = tmp_path / "imported.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics["data_file"] == "toy_datasets:MnistItems"
    assert metrics["stats"]["layers"][0]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    model = LeNet300100()  # the saved model, evaluated on the same 100 test samples held in memory
    model.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert metrics["accuracy_after"] == evaluate(model, load_dataset("mnist", "test", limit=100))
