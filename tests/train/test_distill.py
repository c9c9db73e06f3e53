"""Knowledge distillation from the run's starting model: loss, config validation, runner and resume."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from admmcompress.data import load_dataset
from admmcompress.models import LeNet300100
from admmcompress.train.config import ConfigError, DistillConfig, RunConfig
from admmcompress.train.loop import distillation_loss
from admmcompress.train.runner import STATE_FILE, Runner

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

DISTILL = {"alpha": 0.7, "temperature": 3.0}
PLAN = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.8}]}


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist", "train", limit=384), load_dataset("mnist", "test", limit=200)


def config(distill: dict | None = DISTILL) -> RunConfig:
    retrain = {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}
    if distill is not None:
        retrain["distill"] = dict(distill)
    return RunConfig.from_dict(
        {
            "seed": 1,
            "model": {"name": "lenet300100"},
            "data": {"batch_size": 64},
            "pretrain": {"epochs": 1},
            "stages": [{"plan": PLAN, "method": "admm", "admm": {"epochs": 2, "rho": 1.0e-2}, "retrain": retrain}],
        }
    )


def model(seed: int = 0) -> LeNet300100:
    torch.manual_seed(seed)
    return LeNet300100()


def test_loss_is_cross_entropy_when_alpha_is_zero_weight_and_kl_when_one():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    t = 2.0
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(student / t, 1), torch.softmax(teacher / t, 1), reduction="batchmean"
    )
    ce = torch.nn.functional.cross_entropy(student, labels)
    got = distillation_loss(student, teacher, labels, DistillConfig(alpha=1.0, temperature=t))
    torch.testing.assert_close(got, t * t * kl)
    half = distillation_loss(student, teacher, labels, DistillConfig(alpha=0.5, temperature=t))
    torch.testing.assert_close(half, 0.5 * ce + 0.5 * t * t * kl)
    # a student that already matches the teacher gets no soft-target loss
    same = distillation_loss(teacher, teacher, labels, DistillConfig(alpha=1.0, temperature=t))
    assert abs(same.item()) < 1e-6


@pytest.mark.parametrize(
    ("distill", "message"),
    [
        ({"alpha": 0.0}, "alpha=0.0 must be in"),
        ({"alpha": 1.5}, "alpha=1.5 must be in"),
        ({"temperature": -1.0}, "temperature=-1.0 must be a positive number"),
        ({"tau": 2.0}, "unknown key"),
    ],
)
def test_bad_distill_settings_are_named(distill, message):
    with pytest.raises(ConfigError, match=message):
        config(distill)


def test_pretrain_cannot_distill():
    spec = config().to_dict()
    spec["pretrain"]["distill"] = {"alpha": 0.5, "temperature": 4.0}
    with pytest.raises(ConfigError, match="pretrain: 'distill' needs a teacher"):
        RunConfig.from_dict(spec)


def test_the_teacher_is_the_model_the_stage_started_from_and_changes_training(data):
    plain = Runner(config(None), model(), *data, progress=False)
    plain.run()
    distilled = Runner(config(), model(), *data, progress=False)
    distilled.run()
    assert plain.teacher is None
    # same pretrain (same seed), so the teacher equals the plain run's model before its stage
    reference = Runner(config(None), model(), *data, progress=False)
    reference.phases = reference.phases[:1]
    reference.run()
    for name, value in reference.model.state_dict().items():
        assert torch.equal(distilled.teacher.state_dict()[name], value), name
    assert all(not p.requires_grad for p in distilled.teacher.parameters())
    assert not distilled.teacher.training
    # retraining differs (the soft targets are used), the pruned support does not
    assert not torch.equal(plain.model.fc1.weight, distilled.model.fc1.weight)
    assert torch.equal(plain.model.fc1.weight == 0, distilled.model.fc1.weight == 0)


class Crash(Exception):
    pass


def test_resume_restores_the_teacher_bit_identically(tmp_path, data, monkeypatch):
    full = Runner(config(), model(), *data, out_dir=tmp_path / "full", progress=False)
    full.run()
    original = Runner._record
    calls = {"n": 0}

    def record(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # pretrain 1 + prune 2 + retrain epoch 2 dies before its checkpoint
            raise Crash()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", record)
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        Runner(config(), model(), *data, out_dir=out, progress=False).run()
    monkeypatch.undo()
    assert "teacher" in torch.load(out / STATE_FILE, weights_only=True)
    resumed = Runner(config(), model(seed=42), *data, out_dir=out, progress=False)
    resumed.run(resume=True)
    for name, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    for name, value in full.teacher.state_dict().items():
        assert torch.equal(resumed.teacher.state_dict()[name], value), name


def test_config_round_trips_with_distill():
    spec = config().to_dict()
    again = RunConfig.from_dict(copy.deepcopy(spec))
    assert again.stages[0].retrain.distill == DistillConfig(alpha=0.7, temperature=3.0)


def test_teacher_from_a_checkpoint_file(tmp_path, data):
    from admmcompress.train import checkpoint as ckpt

    other = model(seed=5)
    path = tmp_path / "teacher.safetensors"
    ckpt.save_tensors(path, other.state_dict())
    spec = config().to_dict()
    spec["teacher"] = "teacher.safetensors"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
    runner = Runner(RunConfig.from_yaml(tmp_path / "run.yaml"), model(), *data, progress=False)
    runner.run()
    for name, value in other.state_dict().items():
        assert torch.equal(runner.teacher.state_dict()[name], value), name


def test_teacher_errors_are_named(tmp_path, data):
    spec = config().to_dict()
    spec["teacher"] = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="teacher: checkpoint .* does not exist"):
        Runner(RunConfig.from_dict(spec), model(), *data, progress=False).run()
    spec = config(None).to_dict()
    spec["teacher"] = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="teacher is set but no phase distills"):
        RunConfig.from_dict(spec)


def test_a_teacher_for_another_model_fails_before_any_training(tmp_path, data, monkeypatch):
    from admmcompress.models import LeNet5
    from admmcompress.train import checkpoint as ckpt

    path = tmp_path / "lenet5.safetensors"
    ckpt.save_tensors(path, LeNet5().state_dict())
    spec = config().to_dict()
    spec["teacher"] = str(path)
    trained = []
    monkeypatch.setattr(Runner, "_train_one_epoch", lambda *a, **k: trained.append(1))
    with pytest.raises(ConfigError, match="teacher: checkpoint .* does not fit"):
        Runner(RunConfig.from_dict(spec), model(), *data, progress=False).run()
    assert not trained


def test_distilling_from_a_pruned_start_without_teacher_warns(tmp_path):
    spec = config().to_dict()
    spec.pop("pretrain")
    spec["pretrained"] = str(tmp_path / "pruned.safetensors")
    spec["freeze_pretrained_zeros"] = True
    with pytest.warns(UserWarning, match="the teacher is that pruned model"):
        RunConfig.from_dict(spec)


def test_old_import_paths_still_work():
    import admmcompress
    from admmcompress.data.datasets import ENV_VAR, REPO_ROOT, Split, find_dataset  # noqa: F401
    from admmcompress.plan import PlanError, Target  # noqa: F401
    from admmcompress.train.checkpoint import atomic_write  # noqa: F401

    with pytest.warns(DeprecationWarning, match="hard_prune moved"):
        from admmcompress.masks import hard_prune
    assert hard_prune is admmcompress.hard_prune


def test_an_ensemble_teacher_predicts_the_mean_of_its_members_logits(tmp_path, data):
    from admmcompress.train import checkpoint as ckpt
    from admmcompress.train.teacher import LogitEnsemble

    members = [model(seed=s) for s in (5, 6, 7)]
    files = []
    for i, m in enumerate(members):
        files.append(f"t{i}.safetensors")
        ckpt.save_tensors(tmp_path / files[-1], m.state_dict())
    spec = config().to_dict()
    spec["teacher"] = files
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
    runner = Runner(RunConfig.from_yaml(tmp_path / "run.yaml"), model(), *data, progress=False)
    runner.run()
    assert isinstance(runner.teacher, LogitEnsemble) and len(runner.teacher.members) == 3
    assert all(not p.requires_grad for p in runner.teacher.parameters()) and not runner.teacher.training
    x = data[1].x[:16]
    with torch.no_grad():
        expected = torch.stack([m.eval()(x) for m in members]).mean(0)
        torch.testing.assert_close(runner.teacher(x), expected)


def test_resume_restores_an_ensemble_teacher(tmp_path, data, monkeypatch):
    from admmcompress.train import checkpoint as ckpt

    files = []
    for s in (5, 6):
        files.append(str(tmp_path / f"t{s}.safetensors"))
        ckpt.save_tensors(files[-1], model(seed=s).state_dict())
    spec = config().to_dict()
    spec["teacher"] = files
    full = Runner(RunConfig.from_dict(spec), model(), *data, out_dir=tmp_path / "full", progress=False)
    full.run()
    original = Runner._record
    calls = {"n": 0}

    def record(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", record)
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        Runner(RunConfig.from_dict(spec), model(), *data, out_dir=out, progress=False).run()
    monkeypatch.undo()
    resumed = Runner(RunConfig.from_dict(spec), model(seed=42), *data, out_dir=out, progress=False)
    resumed.run(resume=True)
    for name, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    for name, value in full.teacher.state_dict().items():
        assert torch.equal(resumed.teacher.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("teacher", "message"),
    [([], "non-empty list"), ([3], "non-empty list"), (7, "must be a checkpoint file or a list")],
)
def test_bad_teacher_values_are_named(teacher, message):
    spec = config().to_dict()
    spec["teacher"] = teacher
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(spec)


def test_a_missing_ensemble_member_is_named_before_training(tmp_path, data, monkeypatch):
    from admmcompress.train import checkpoint as ckpt

    ckpt.save_tensors(tmp_path / "a.safetensors", model(seed=5).state_dict())
    spec = config().to_dict()
    spec["teacher"] = [str(tmp_path / "a.safetensors"), str(tmp_path / "gone.safetensors")]
    trained = []
    monkeypatch.setattr(Runner, "_train_one_epoch", lambda *a, **k: trained.append(1))
    with pytest.raises(ConfigError, match="teacher: checkpoint .*gone.safetensors' does not exist"):
        Runner(RunConfig.from_dict(spec), model(), *data, progress=False).run()
    assert not trained
