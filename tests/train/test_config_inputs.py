"""Wrong config values found by the bad-input audit: each is one line naming the key and the fix, before any
folder is written (missing keys, wrong sections, out-of-range optimizer numbers, names that would be paths,
duplicate YAML keys, a model that cannot read the data, a driver cadence that never comes)."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from admmcompress.data.datasets import Split
from admmcompress.models import create_model
from admmcompress.plan import Plan, PlanError
from admmcompress.train.config import ConfigError, RunConfig
from admmcompress.train.runner import Runner

PLAN = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]}


def spec(**overrides) -> dict:
    base = {
        "name": "tiny",
        "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 8},
        "pretrain": {"epochs": 1},
        "stages": [{"plan": copy.deepcopy(PLAN), "admm": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}}}],
    }
    base.update(overrides)
    return base


def with_admm(**admm) -> dict:
    s = spec()
    s["stages"][0]["admm"].update(admm)
    return s


def refused(content: dict, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        RunConfig.from_dict(content)
    message = str(info.value)
    assert "\n" not in message and "positional argument" not in message
    return message


@pytest.mark.parametrize("stage", [{"method": "admm"}, None])
def test_a_stage_without_a_plan_names_the_missing_key_and_an_example(stage):
    message = refused(spec(stages=[stage]), r"stages\[0\]: missing 'plan:'")
    assert "plan: {rules:" in message


def test_a_config_without_a_model_names_it():
    content = spec()
    del content["model"]
    refused(content, "missing 'model:'; add model: {name: lenet5}")


def test_an_optimizer_given_as_a_name_asks_for_a_mapping():
    refused(with_admm(optimizer="sgd"), r"optimizer: expected a mapping such as \{name: sgd, lr: 0.01\}, got str 'sgd'")


@pytest.mark.parametrize("momentum", [-0.5, 1.5, 5])
def test_momentum_outside_zero_one_is_refused_while_reading(momentum):
    refused(with_admm(optimizer={"name": "sgd", "momentum": momentum}), rf"momentum={momentum!r} must be in \[0, 1\]")


def test_nesterov_must_be_a_boolean_and_have_momentum():
    refused(with_admm(optimizer={"name": "sgd", "nesterov": "yes"}), "nesterov='yes' must be true or false")
    refused(with_admm(optimizer={"name": "sgd", "momentum": 0.0, "nesterov": True}), "needs momentum > 0")
    with pytest.warns(UserWarning, match="optimizer adam: nesterov applies to sgd only and is ignored"):
        RunConfig.from_dict(with_admm(optimizer={"name": "adam", "nesterov": True}))  # older run folders still read
    RunConfig.from_dict(with_admm(optimizer={"name": "sgd", "momentum": 0.9, "nesterov": True}))


@pytest.mark.parametrize("seed", [2**64, 2**63, -1])
def test_a_seed_outside_what_torch_takes_is_refused(seed):
    refused(spec(seed=seed), r"seed=.* must be an integer in \[0, 2\*\*63\)")


@pytest.mark.parametrize("name", ["../../escaped", "a/../../b", "/abs", "", "a\nb", ["a"], 5.5])
def test_a_name_that_would_leave_runs_is_refused(name):
    refused(spec(name=name), "must be a name inside runs/")


@pytest.mark.parametrize(("name", "kept"), [("block 4x seed 2", "block 4x seed 2"),
                                            ("ablations/seed0", "ablations/seed0"), (2024, "2024")])
def test_names_with_spaces_subfolders_or_digits_only_are_kept(name, kept):
    assert RunConfig.from_dict(spec(name=name)).name == kept


def test_pretrained_must_be_a_path_and_not_beside_pretrain(tmp_path):
    content = spec(pretrained=5)
    del content["pretrain"]
    refused(content, "pretrained=5 must be a checkpoint file's path")
    with pytest.warns(UserWarning, match="the pretrain phase does not run; drop one of them"):
        RunConfig.from_dict(spec(pretrained=str(tmp_path / "dense.safetensors")))  # older run folders hold both


def test_a_key_given_twice_in_a_config_file_is_refused_with_both_lines(tmp_path):
    text = yaml.safe_dump(spec(), sort_keys=False) + "seed: 3\nname: other\n"
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"duplicate key 'name' \(first at line 1\); keep one of them at") as info:
        RunConfig.from_yaml(path)
    assert "\n" not in str(info.value)


def test_yaml_anchors_and_merge_keys_still_read(tmp_path):
    text = yaml.safe_dump({k: v for k, v in spec().items() if k != "stages"}, sort_keys=False) + (
        "stages:\n"
        "  - plan: &plan {rules: [{match: fc1, structure: unstructured, sparsity: 0.5}]}\n"
        "    admm: &admm {epochs: 1, optimizer: {name: adam, lr: 1.0e-3}}\n"
        "  - plan: {rules: [{match: fc1, structure: unstructured, sparsity: 0.9}]}\n"
        "    admm: {<<: *admm, epochs: 2}\n"
    )
    (tmp_path / "run.yaml").write_text(text)
    config = RunConfig.from_yaml(tmp_path / "run.yaml")
    assert [s.admm.epochs for s in config.stages] == [1, 2]


def test_a_plan_yaml_with_a_duplicate_key_is_one_line():
    with pytest.raises(PlanError, match="duplicate key 'match'") as info:
        Plan.from_yaml("rules:\n  - {match: fc1, match: fc2, structure: unstructured, sparsity: 0.5}\n")
    assert "\n" not in str(info.value)


def runner(model_name: str, x: torch.Tensor, y: torch.Tensor, **stage_admm) -> Runner:
    content = spec(model={"name": model_name}, pretrained="unused.safetensors")
    del content["pretrain"]
    content["stages"][0]["admm"].update(stage_admm)
    split = Split(x, y)
    return Runner(RunConfig.from_dict(content), create_model(model_name), split, split, progress=False)


def test_a_model_that_cannot_read_the_dataset_is_refused_before_training():
    x, y = torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)  # CIFAR-shaped inputs for an MNIST model
    with pytest.raises(ValueError, match=r"model .lenet5. cannot read the training inputs "
                       r"\(tensor \(2, 3, 32, 32\) float32\).*choose a model for this data") as info:
        content = spec(model={"name": "lenet5"}, pretrained="unused.safetensors")
        del content["pretrain"]
        content["stages"][0]["plan"] = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]}
        Runner(RunConfig.from_dict(content), create_model("lenet5"), Split(x, y), Split(x, y), progress=False)
    assert "\n" not in str(info.value)


def test_a_model_with_fewer_outputs_than_the_dataset_has_classes_is_refused():
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 11, 19])
    with pytest.raises(ValueError, match="has 10 outputs but the training labels have 20 classes; give the model"):
        runner("lenet300100", x, y)


@pytest.mark.parametrize(("y", "says"), [
    (torch.tensor([0.0, 3.0, 1.0, 2.0]), "are torch.float32 shaped (4,): give integer class indices (y.long()), or "
                                         "class probabilities shaped like the model's outputs (N, 10)"),
    (torch.nn.functional.one_hot(torch.tensor([0, 3, 1, 2]), 10), "are shaped (4, 10) for outputs shaped (N, 10): "
                                                                   "they look one-hot: give y.argmax(1)"),
    (torch.tensor([0, -3, 1, 2]), "hold the negative class -3: class indices run from 0"),
    (torch.tensor([True, False, True, True]), "are torch.bool: give integer class indices (y.long())"),
])
def test_labels_cross_entropy_cannot_take_are_refused_in_one_line_before_training(y, says):
    """They failed in the first training step with torch's error (a user review's finding), through compress() and
    through a dataset imported by path, whose --dry-run passed."""
    with pytest.raises(ValueError, match="^the training labels ") as info:
        runner("lenet300100", torch.randn(4, 1, 28, 28), y)
    assert says in str(info.value) and str(info.value).endswith("; the loss is cross-entropy")
    assert "\n" not in str(info.value)


def test_class_probabilities_and_ignored_targets_are_labels_cross_entropy_takes():
    probabilities = torch.softmax(torch.randn(4, 10), dim=1)
    runner("lenet300100", torch.randn(4, 1, 28, 28), probabilities)
    runner("lenet300100", torch.randn(4, 1, 28, 28), torch.tensor([0, -100, 9, 2]))


def test_a_torch_datasets_labels_are_checked_from_its_first_samples():
    from torch.utils.data import TensorDataset

    x = torch.randn(4, 1, 28, 28)
    content = spec(model={"name": "lenet300100"}, pretrained="unused.safetensors")
    del content["pretrain"]
    content["stages"][0]["plan"] = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]}
    for y, says in ((torch.tensor([0, 3, 11, 19]), "has 10 outputs but the training labels have 20 classes"),
                    (torch.tensor([0.0, 3.0, 1.0, 2.0]), "the training labels are torch.float32 shaped (4,)")):
        data = TensorDataset(x, y)
        with pytest.raises(ValueError, match=re.escape(says)):
            Runner(RunConfig.from_dict(content), create_model("lenet300100"), data, data, progress=False)


def test_a_filter_rule_on_the_classifier_warns_that_it_cuts_off_classes():
    """`{type: Linear, structure: filter}` also took the classifier's rows: half the classes, silently (a user
    review's finding); compaction keeps them, as outputs, so only accuracy showed it."""
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 1, 2])
    content = spec(model={"name": "lenet300100"}, pretrained="unused.safetensors")
    del content["pretrain"]
    content["stages"][0]["plan"] = {"rules": [{"type": "Linear", "structure": "filter", "sparsity": 0.5}]}
    with pytest.warns(UserWarning, match=re.escape(
            "stages[0] prunes rows (filters) of 'fc3', whose outputs are the model's: up to 50% of its classes "
            "would be cut off; leave it out of the rule (exclude: ['fc3'])")) as seen:
        Runner(RunConfig.from_dict(content), create_model("lenet300100"), Split(x, y), Split(x, y), progress=False)
    assert sum("prunes rows" in str(w.message) for w in seen) == 1  # fc1, fc2 feed other layers: no warning
    content["stages"][0]["plan"]["rules"][0]["exclude"] = ["fc3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Runner(RunConfig.from_dict(content), create_model("lenet300100"), Split(x, y), Split(x, y), progress=False)


def test_the_classifier_warning_does_not_fire_where_no_layer_output_is_returned():
    """Output layers were matched by id() of freed tensors, which CPython reuses: a DenseNet-style model whose output
    is a mean of its last conv's output warned about 'c2' (a review's finding)."""
    from admmcompress.train.trial_forward import check_model_reads

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.c1 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(5, 4, 3, padding=1)
            self.c2, self.c3 = nn.Conv2d(9, 4, 3, padding=1), nn.Conv2d(13, 10, 1)

        def forward(self, x):
            x1 = torch.relu(self.c0(x))
            x2 = torch.relu(self.c1(torch.cat([x, x1], 1)))
            x3 = torch.relu(self.c2(torch.cat([x, x1, x2], 1)))
            return self.c3(torch.cat([x, x1, x2, x3], 1)).mean((2, 3))

    config = RunConfig.from_dict({**spec(model={"name": "lenet300100"}, pretrained="unused.safetensors")})
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 1, 2])
    for seed in range(5):
        torch.manual_seed(seed)
        assert check_model_reads(Dense(), x, Split(x, y), config) == []
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert check_model_reads(head, x, Split(x, y), config) == ["1"]


def test_the_forward_check_leaves_the_model_in_training_mode_and_its_statistics_alone():
    model = create_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    content = spec(model={"name": "resnet20"}, pretrained="unused.safetensors")
    del content["pretrain"]
    content["stages"][0]["plan"] = {"rules": [{"match": "linear", "structure": "unstructured", "sparsity": 0.5}]}
    split = Split(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    Runner(RunConfig.from_dict(content), model, split, split, progress=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_driver_cadence_that_never_comes_is_warned_about_in_one_line():
    x, y = torch.randn(16, 1, 28, 28), torch.zeros(16, dtype=torch.long)  # 2 steps per epoch at batch 8
    with pytest.warns(UserWarning, match=r"stages\[0\]: admm: one update every 100 steps never comes in the "
                      r"phase's 2 steps .* 'admm' will not update; give update_every_steps <= 2"):
        runner("lenet300100", x, y, update_every_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cadence that comes: no warning
        runner("lenet300100", x, y, update_every_steps=2)


def test_one_shot_magnitude_needs_no_updates():
    x, y = torch.randn(16, 1, 28, 28), torch.zeros(16, dtype=torch.long)
    content = spec(pretrained="unused.safetensors")
    del content["pretrain"]
    content["stages"][0].update(method="magnitude")
    content["stages"][0]["admm"].update(update_every_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runner(RunConfig.from_dict(content), create_model("lenet300100"), Split(x, y), Split(x, y), progress=False)


def test_the_ready_configs_have_no_duplicate_keys():
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "configs").glob("*.yaml")):
        RunConfig.from_yaml(path)


def test_a_loss_of_its_own_or_float_labels_skip_the_class_check():
    """Regression, embeddings: the output width has nothing to do with the label values."""
    x = torch.randn(4, 1, 28, 28)
    content = spec(pretrained="unused.safetensors")
    del content["pretrain"]
    config = RunConfig.from_dict(content)
    labels = Split(x, torch.tensor([0, 30, 40, 49]))
    Runner(config, create_model("lenet300100"), labels, labels, progress=False,
           loss_fn=lambda out, y, model: out.sum())
    floats = Split(x, torch.tensor([0.5, float("inf"), 2.0, float("nan")]))
    Runner(config, create_model("lenet300100"), floats, floats, progress=False,
           loss_fn=lambda out, y, model: out.sum())


def test_an_index_error_in_the_forward_is_one_line():
    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.fc1 = torch.nn.Linear(4, 10)

        def forward(self, x):
            return self.fc1(self.emb(x).mean(1))

    from admmcompress.train.trial_forward import check_model_reads

    config = RunConfig.from_dict({**spec(pretrained="unused.safetensors"), "pretrain": None})
    tokens = torch.full((2, 5), 99)  # beyond the vocabulary
    with pytest.raises(ValueError, match=r"cannot read the training inputs \(tensor \(2, 5\) int64\): index out of "
                                         "range"):
        check_model_reads(Embedder(), tokens, Split(tokens, torch.zeros(2, dtype=torch.long)), config)


def test_an_example_of_several_inputs_is_described_as_the_plan_describes_it():
    from admmcompress.plan.graph import describe_input
    from admmcompress.train.trial_forward import check_model_reads

    config = RunConfig.from_dict({**spec(pretrained="unused.safetensors"), "pretrain": None})
    example = {"x": torch.zeros(2, 5), "mask": torch.ones(2, 5, dtype=torch.bool)}
    assert describe_input(example) == "dict x: tensor (2, 5) float32, mask: tensor (2, 5) bool"
    with pytest.raises(ValueError) as err:  # nn.Linear is called with the dict itself
        check_model_reads(torch.nn.Linear(5, 3), example, None, config)
    assert str(err.value).startswith("model 'lenet300100' cannot read the training inputs (dict x: tensor (2, 5) "
                                     "float32, mask: tensor (2, 5) bool): ")


def test_chained_merges_are_not_taken_for_duplicates():
    """PyYAML applies a merge by editing the merged node in place; the check reads the document as written."""
    from admmcompress.strict_yaml import safe_load_unique

    text = ("common: &common {epochs: 1, dropout: 0.1}\n"
            "stages:\n"
            "  - admm: &phase {<<: *common, epochs: 4}\n"
            "pretrain: {<<: *phase, epochs: 10}\n")
    assert safe_load_unique(text) == yaml.safe_load(text)


def test_a_value_of_a_wrong_kind_that_slips_past_the_checks_is_one_line_naming_the_file(tmp_path, monkeypatch):
    # from_yaml is the one place that turns a stray TypeError/AttributeError into a line (run, report, export)
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: lenet5}\npretrained: x.safetensors\n")

    def broken(cls, spec, base_dir=None):
        raise TypeError("'int' object is not iterable")

    monkeypatch.setattr(RunConfig, "from_dict", classmethod(broken))
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(path)
    assert str(err.value).startswith(f"config '{path}': a value has the wrong type or shape")
    assert "\n" not in str(err.value)


def test_the_trial_forward_runs_under_the_configs_autocast_and_leaves_buffers_as_they_were():
    from admmcompress.train.trial_forward import check_model_reads

    class Observed(torch.nn.Module):
        """Counts its forwards in a buffer (as quantization observers do) and needs bf16 inputs."""

        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 10)
            self.register_buffer("seen", torch.zeros(()))
            self.register_buffer("history", torch.zeros(0))

        def forward(self, x):
            self.seen += 1
            self.history = torch.cat([self.history, torch.ones(1)])  # replaced, not updated in place
            out = self.fc1(x)
            if out.dtype != torch.bfloat16:
                raise RuntimeError("expected bf16 activations")
            return out

    config = RunConfig.from_dict({**spec(pretrained="unused.safetensors"), "pretrain": None, "autocast": "bf16"})
    model, x = Observed(), torch.randn(3, 4)
    check_model_reads(model, x, Split(x, torch.zeros(3, dtype=torch.long)), config)
    assert float(model.seen) == 0.0 and model.history.numel() == 0
    plain = RunConfig.from_dict({**spec(pretrained="unused.safetensors"), "pretrain": None})
    with pytest.raises(ValueError, match="expected bf16 activations"):
        check_model_reads(model, x, Split(x, torch.zeros(3, dtype=torch.long)), plain)


def test_the_trial_forward_keeps_buffers_shared_and_the_same_tensors():
    """A buffer two modules share, which the forward replaces in one of them and resizes in place in another,
    comes back as the one tensor both hold, with its values; a plain buffer is the same tensor as before."""
    from admmcompress.train.trial_forward import check_model_reads

    shared = torch.arange(3.0)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", shared)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = Holder(), Holder(), torch.nn.Linear(4, 10)
            self.register_buffer("grown", torch.zeros(2))

        def forward(self, x):
            self.a.table = self.a.table * 10  # a new tensor in a only: the two would part
            self.grown.resize_(5).fill_(7.0)  # the same tensor, another shape
            return self.fc(x)

    config = RunConfig.from_dict({**spec(pretrained="unused.safetensors"), "pretrain": None})
    model, x = Model(), torch.randn(3, 4)
    grown = model.grown
    check_model_reads(model, x, Split(x, torch.zeros(3, dtype=torch.long)), config)
    assert model.a.table is shared and model.b.table is shared
    assert torch.equal(shared, torch.arange(3.0))
    assert torch.equal(model.grown, torch.zeros(2)) and model.grown is not grown  # its copy, at the old shape


def test_the_read_check_puts_back_each_layers_own_mode():
    """A frozen BatchNorm (eval) inside a model in training mode stays in eval after the trial forward."""
    from admmcompress.train.trial_forward import check_model_reads

    config = RunConfig.from_dict({**spec(pretrained="unused.safetensors"), "pretrain": None})
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)).train()
    model[1].eval()
    x = torch.randn(3, 5)
    check_model_reads(model, x, Split(x, torch.zeros(3, dtype=torch.long)), config)
    assert [m.training for m in model] == [True, False, True] and model.training


def test_settings_the_chosen_method_or_optimizer_ignores_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"optimizer adam: momentum=0.1 applies to sgd only and is ignored"):
        RunConfig.from_dict(with_admm(optimizer={"name": "adam", "momentum": 0.1}))
    gradual = with_admm(rho=0.5)
    gradual["stages"][0]["method"] = "gradual"
    with pytest.warns(UserWarning, match=r"method gradual: \['rho'\] inside admm: apply to method admm only"):
        RunConfig.from_dict(gradual)
    block = spec()
    block["stages"][0]["reweighted"] = {"penalty": 5}
    with pytest.warns(UserWarning, match="method admm: the reweighted: block applies to method reweighted only"):
        RunConfig.from_dict(block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults, and the settings the method reads, say nothing
        RunConfig.from_dict(with_admm(optimizer={"name": "adam"}, rho=0.5))


def test_configs_the_library_wrote_before_the_registry_read_without_ignored_setting_warnings(tmp_path):
    """Older versions wrote rho* inside admm: and a reweighted: block for every method into run folders."""
    from admmcompress.run_export import read_run_config
    from admmcompress.train.run_folder import normalized_config

    old = with_admm(rho=1e-3, rho_growth=1.3, rho_max=1.0)
    old["stages"][0]["method"] = "gradual"
    old["stages"][0]["reweighted"] = {"penalty": 1e-4}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalized_config(old)
        read_run_config(tmp_path)
    with pytest.warns(UserWarning, match="inside admm: apply to method admm only"):
        RunConfig.from_dict(old)  # the user's own config still says so
