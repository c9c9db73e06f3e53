"""The reference pipeline: exact resume after a crash, compress() API, ADMM update cadence."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from admmcompress import Filter, Plan, Unstructured, compress
from admmcompress.data import load_dataset
from admmcompress.finalize import MaskSet
from admmcompress.models import LeNet300100
from admmcompress.plan import PlanError
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig
from admmcompress.train.loop import evaluate
from admmcompress.train.run_folder import outputs_in
from admmcompress.train.runner import STATE_FILE, Runner

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

PLAN1 = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]}
PLAN2 = {
    "rules": [
        {"match": "fc1", "structure": "unstructured", "sparsity": 0.9},
        {"match": "fc2", "structure": "filter", "sparsity": 0.5},
    ]
}


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist", "train", limit=512), load_dataset("mnist", "test", limit=200)


@pytest.fixture(scope="module")
def dense(data):
    """A LeNet-300-100 trained one epoch on the subset (the 'pretrained' model of the API tests)."""
    torch.manual_seed(0)
    model = LeNet300100()
    config = RunConfig.from_dict({"model": {"name": "lenet300100"}, "pretrain": {"epochs": 1}, "seed": 0})
    Runner(config, model, *data, progress=False).run()
    return model


def fresh_model(seed: int = 0) -> LeNet300100:
    torch.manual_seed(seed)
    return LeNet300100()


def run_config(method: str = "admm", two_stages: bool = False, **admm) -> RunConfig:
    stage = {
        "method": method,
        "admm": {"epochs": 3, "rho": 1.0e-2, **admm},
        "retrain": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
    }
    stages = [{**copy.deepcopy(stage), "plan": PLAN1}]
    if two_stages:
        stages.append({**copy.deepcopy(stage), "plan": PLAN2})
    return RunConfig.from_dict(
        {
            "name": "resume",
            "seed": 3,
            "model": {"name": "lenet300100"},
            "data": {"batch_size": 64},
            "pretrain": {"epochs": 1},
            "stages": stages,
        }
    )


class Crash(Exception):
    """Stands for a kill: raised in the middle of an epoch's bookkeeping, before it is checkpointed."""


def crash_at_epoch(monkeypatch, n: int) -> None:
    """Make the n-th finished epoch (counting over all phases) raise before its checkpoint."""
    original = Runner._record
    calls = {"n": 0}

    def record(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"epoch {n}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", record)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs after resume"


def assert_same_masks(a, b) -> None:
    assert set(a.masks) == set(b.masks)
    for key in a.masks:
        assert torch.equal(a.masks[key], b.masks[key]), key


def interrupted_then_resumed(config, data, out, monkeypatch, crash_epoch: int) -> Runner:
    crash_at_epoch(monkeypatch, crash_epoch)
    with pytest.raises(Crash):
        Runner(config, fresh_model(), *data, out_dir=out, progress=False).run()
    monkeypatch.undo()
    assert (out / STATE_FILE).is_file()
    # a different initial model: everything must come from the checkpoint
    resumed = Runner(config, fresh_model(seed=99), *data, out_dir=out, progress=False)
    resumed.run(resume=True)
    return resumed


# Epochs over all phases: pretrain 1, then per stage prune 3 and retrain 2.
@pytest.mark.parametrize(
    ("method", "two_stages", "crash_epoch"),
    [
        ("admm", False, 3),  # during ADMM (checkpoint after prune epoch 1)
        ("admm", False, 4),  # during the last ADMM epoch: resume must still hard-prune correctly
        ("admm", False, 6),  # during retrain
        ("admm", True, 8),  # progressive: during stage 2's ADMM phase
        ("admm", True, 11),  # progressive: during stage 2's retrain
        ("gradual", False, 3),
        ("gradual", True, 9),
        ("magnitude", False, 3),
        ("magnitude", True, 8),
    ],
)
def test_resume_after_a_crash_is_bit_identical(tmp_path, data, monkeypatch, method, two_stages, crash_epoch):
    config = run_config(method, two_stages)
    full = Runner(config, fresh_model(), *data, out_dir=tmp_path / "full", progress=False)
    full_metrics = full.run()
    resumed = interrupted_then_resumed(config, data, tmp_path / "crashed", monkeypatch, crash_epoch)
    assert_same_state(full.model, resumed.model)
    assert_same_masks(full.masks, resumed.masks)
    assert resumed.metrics["accuracy_after"] == full_metrics["accuracy_after"]
    assert resumed.metrics["stats"] == full_metrics["stats"]
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == strip
    for a, b in zip(full_metrics["stages"], resumed.metrics["stages"], strict=True):
        assert a == b


@pytest.mark.parametrize("method", ["admm", "gradual", "magnitude"])
def test_resume_after_a_crash_between_the_last_epoch_and_the_hard_prune(tmp_path, data, monkeypatch, method):
    """The prune phase's last epoch is checkpointed, then the run dies before hard pruning."""
    config = run_config(method)
    full = Runner(config, fresh_model(), *data, progress=False)
    full.run()

    original = Runner._finish

    def finish(self, phase):
        if phase.kind == "prune":
            raise Crash("before hard prune")
        return original(self, phase)

    monkeypatch.setattr(Runner, "_finish", finish)
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        Runner(config, fresh_model(), *data, out_dir=out, progress=False).run()
    monkeypatch.undo()
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert (state["phase_index"], state["epoch"]) == (1, 3)
    resumed = Runner(config, fresh_model(seed=7), *data, out_dir=out, progress=False)
    resumed.run(resume=True)
    assert_same_state(full.model, resumed.model)
    assert_same_masks(full.masks, resumed.masks)
    assert resumed.metrics["stages"] == full.metrics["stages"]


def test_resuming_with_another_thread_count_says_it_is_not_bit_identical(tmp_path, data):
    from admmcompress.train import checkpoint as ckpt

    config = run_config("admm")
    Runner(config, fresh_model(), *data, out_dir=tmp_path, progress=False).run()
    state = ckpt.load_state(tmp_path / "checkpoint.pt")
    assert state["threads"] == torch.get_num_threads()
    state["threads"] = torch.get_num_threads() + 1  # as if the run so far had another thread count
    ckpt.save_state(tmp_path / "checkpoint.pt", state)
    with pytest.warns(RuntimeWarning, match=r"resuming with \d+ threads; the run so far used \d+"):
        Runner(config, fresh_model(), *data, out_dir=tmp_path, progress=False).run(resume=True)


def test_resume_with_step_cadence_and_sparse_checkpoints(tmp_path, data, monkeypatch):
    config = run_config("admm", update_every_steps=5)
    config.checkpoint_every_epochs = 2
    full = Runner(config, fresh_model(), *data, progress=False)
    full.run()
    resumed = interrupted_then_resumed(config, data, tmp_path / "crashed", monkeypatch, crash_epoch=4)
    assert_same_state(full.model, resumed.model)
    assert_same_masks(full.masks, resumed.masks)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, data):
    config = run_config("admm")
    full = Runner(config, fresh_model(), *data, out_dir=tmp_path, progress=False)
    metrics = full.run()
    again = Runner(config, fresh_model(seed=5), *data, out_dir=tmp_path, progress=False)
    assert again.run(resume=True)["stats"] == metrics["stats"]
    assert_same_state(full.model, again.model)
    assert_same_masks(full.masks, again.masks)


def test_resume_without_a_checkpoint_says_so_in_the_callers_terms(tmp_path, data):
    """A Runner built in Python is told about resume=True and out_dir=; the command line's about its flags."""
    runner = Runner(run_config(), fresh_model(), *data, out_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError) as err:
        runner.run(resume=True)
    message = str(err.value)
    assert message.startswith(f"resume=True: no checkpoint at {tmp_path / STATE_FILE}; run without resume=True "
                              "to start, or pass out_dir= the folder")
    assert "--" not in message and "\n" not in message
    without = Runner(run_config(), fresh_model(), *data, progress=False)
    with pytest.raises(FileNotFoundError, match=r"^resume=True needs out_dir=, the folder the interrupted run "
                                                r"checkpointed to; run without resume=True to start$"):
        without.run(resume=True)
    runner.from_cli = True  # as admmcompress run builds it
    with pytest.raises(FileNotFoundError, match=r"^--resume: no checkpoint at .*; run without --resume to start, "
                                                r"or pass the run's --out folder$"):
        runner.run(resume=True)


def test_checkpoint_records_phase_and_epoch(tmp_path, data):
    config = run_config("admm")
    Runner(config, fresh_model(), *data, out_dir=tmp_path, progress=False).run()
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["phase_index"] == 3 and state["epoch"] == 0
    assert set(state["masks"]) == {"fc1.weight"}
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


def test_a_plan_that_does_not_fit_fails_before_training(data):
    config = run_config("admm")
    config.stages[0].plan = Plan.from_dict(
        {"rules": [{"match": "conv*", "structure": "filter", "sparsity": 0.5}]}
    )
    with pytest.raises(PlanError, match="rule #0"):
        Runner(config, fresh_model(), *data, progress=False)


# --- compress() ------------------------------------------------------------------------------
def nonzeros(model, name: str) -> int:
    return int(torch.count_nonzero(dict(model.named_parameters())[name]).item())


API_PLAN = Plan({"fc1": Unstructured(sparsity=0.9), "fc2": Filter(sparsity=0.5)})
FC1_KEPT = round(300 * 784 * 0.1)  # 23,520
FC2_KEPT = 50 * 300  # 50 of 100 rows


@pytest.mark.parametrize("method", ["admm", "gradual", "magnitude"])
def test_compress_reaches_the_plan_with_every_method(data, dense, method):
    model = copy.deepcopy(dense)
    result = compress(
        model,
        API_PLAN,
        *data,
        method=method,
        admm={"epochs": 2, "rho": 1.0e-2},
        retrain={"epochs": 1},
        batch_size=64,
    )
    assert result.model is model
    assert nonzeros(model, "fc1.weight") == FC1_KEPT
    assert nonzeros(model, "fc2.weight") == FC2_KEPT
    assert nonzeros(model, "fc3.weight") == model.fc3.weight.numel()  # untouched layer stays dense
    rows = model.fc2.weight.detach().abs().sum(1)
    assert int((rows > 0).sum()) == 50
    metrics = result.metrics
    layers = {row["name"]: row for row in metrics["stats"]["layers"]}
    assert list(layers) == ["fc1", "fc2"]
    assert layers["fc1"]["kept"] == FC1_KEPT and layers["fc2"]["kept"] == FC2_KEPT
    assert metrics["stats"]["overall_compression"] == pytest.approx((235200 + 30000) / (FC1_KEPT + FC2_KEPT))
    assert 0 <= metrics["accuracy_before"] <= 100 and 0 <= metrics["accuracy_after"] <= 100
    assert metrics["accuracy_after"] > 50  # a 1-epoch dense model is ~80%; pruning + retrain keeps it useful
    (stage,) = metrics["stages"]
    for key in (
        "accuracy_before_hard_prune",
        "accuracy_after_hard_prune",
        "accuracy_after_retrain",
        "overall_compression",
        "layers",
    ):
        assert key in stage
    assert ("admm_history" in stage) == (method == "admm")
    assert {k: v.sum().item() for k, v in result.masks.items()} == {
        "fc1.weight": FC1_KEPT,
        "fc2.weight": FC2_KEPT,
    }
    assert len(result.history) == 3
    assert "| fc1 | Linear | 300x784 | 235,200 | 23,520 | 90.00% | 10.0x |" in result.report


def test_compress_leaves_no_hooks_on_the_model(data, dense):
    """After compress() the model is a plain module: training it further must not be masked."""
    for method in ("admm", "gradual", "magnitude"):
        model = copy.deepcopy(dense)
        compress(
            model,
            API_PLAN,
            *data,
            method=method,
            admm={"epochs": 2, "update_every_steps": 3},
            retrain={"epochs": 1},
        )
        for name, param in model.named_parameters():
            assert not param._backward_hooks, f"{method}: {name} still has gradient hooks"
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(data[0].x[:32]), data[0].y[:32]).backward()
        assert int(torch.count_nonzero(model.fc1.weight.grad)) > FC1_KEPT, method


def test_compress_progressive_keeps_earlier_pruning(data, dense, monkeypatch):
    captured = {}
    original = Runner._finish

    def finish(self, phase):
        original(self, phase)
        if phase.kind == "retrain":
            captured[phase.stage] = {k: v.clone() for k, v in self.model.state_dict().items()}

    monkeypatch.setattr(Runner, "_finish", finish)
    model = copy.deepcopy(dense)
    first = Plan({"fc1": Unstructured(sparsity=0.5)})
    result = compress(
        model, [first, API_PLAN], *data, admm={"epochs": 2, "rho": 1.0e-2}, retrain={"epochs": 1}
    )
    assert nonzeros(model, "fc1.weight") == FC1_KEPT
    assert nonzeros(model, "fc2.weight") == FC2_KEPT
    stage1 = captured[0]["fc1.weight"]
    assert int(torch.count_nonzero(stage1)) == 300 * 784 // 2
    # every weight stage 1 pruned is still zero at the end
    assert torch.all(model.fc1.weight[stage1 == 0] == 0)
    s1, s2 = result.metrics["stages"]
    # every stage is measured over the layers any stage prunes (fc2 is still dense after stage 1)
    assert s1["overall_compression"] == pytest.approx((235200 + 30000) / (235200 // 2 + 30000))
    assert s1["layers"] == {"fc1": pytest.approx(2.0), "fc2": pytest.approx(1.0)}
    assert s2["overall_compression"] == pytest.approx((235200 + 30000) / (FC1_KEPT + FC2_KEPT))
    assert len(result.history) == 6


def test_compress_with_out_dir_checkpoints_and_saves_a_report(tmp_path, data, dense):
    result = compress(
        copy.deepcopy(dense),
        API_PLAN,
        *data,
        method="magnitude",
        admm={"epochs": 1},
        retrain={"epochs": 1},
        out_dir=tmp_path / "run",
    )
    assert (tmp_path / "run" / STATE_FILE).is_file()
    text = result.save(tmp_path / "report", title="api run")
    assert text.startswith("# api run")
    for name in ("report.md", "metrics.json", "sparsity.png", "training.png"):
        assert (tmp_path / "report" / name).is_file(), name


# --- ADMM update cadence ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("admm", "updates"),
    [
        ({"epochs": 2}, 2),  # default: every epoch
        ({"epochs": 3, "update_every_epochs": 2}, 1),
        ({"epochs": 2, "update_every_steps": 3}, 5),  # 8 steps/epoch -> 16 steps -> updates at 3, 6, ..., 15
        ({"epochs": 2, "update_every_steps": 8}, 2),
        ({"epochs": 1, "update_every_steps": 100}, 0),
    ],
)
def test_admm_update_cadence(data, dense, admm, updates):
    result = compress(copy.deepcopy(dense), API_PLAN, *data, admm=admm, retrain={"epochs": 0})
    history = result.metrics["stages"][0]["admm_history"]
    assert len(history) == updates
    assert [h["iteration"] for h in history] == list(range(1, updates + 1))
    # rho grows by 1.3 per update (default schedule)
    if updates >= 2:
        rho = [h["rho"]["fc1.weight:unstructured"] for h in history]
        assert rho[1] == pytest.approx(rho[0] * 1.3)


def test_gradual_reaches_the_target_with_step_cadence(data, dense):
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compress(
            model,
            API_PLAN,
            *data,
            method="gradual",
            admm={"epochs": 2, "update_every_steps": 5},
            retrain={"epochs": 1},
        )
    assert nonzeros(model, "fc1.weight") == FC1_KEPT
    assert nonzeros(model, "fc2.weight") == FC2_KEPT


def test_resume_of_a_gradual_stage_keeps_values_quantized_by_an_earlier_stage(tmp_path, data, monkeypatch):
    from admmcompress.finalize import QuantizedMaskSet

    quantize = {
        "rules": [
            {"match": "fc1", "structure": "unstructured", "sparsity": 0.5},
            {"match": "fc1", "structure": "fixed_point", "bits": 2},
        ]
    }
    config = run_config("magnitude", two_stages=True)
    stages = config.to_dict()["stages"]
    stages[0]["plan"] = quantize
    stages[1].update(method="gradual", plan={"rules": [{"match": "fc2", "structure": "filter", "sparsity": 0.5}]})
    config = RunConfig.from_dict({**config.to_dict(), "stages": stages})
    full = Runner(config, fresh_model(), *data, out_dir=tmp_path / "full", progress=False)
    full.run()
    resumed = interrupted_then_resumed(config, data, tmp_path / "crashed", monkeypatch, crash_epoch=8)
    for runner in (full, resumed):
        assert isinstance(runner.masks, QuantizedMaskSet) and "fc1.weight" in runner.masks.held
        assert torch.unique(runner.model.fc1.weight.detach()[runner.masks["fc1.weight"]]).numel() <= 4
    assert_same_state(full.model, resumed.model)
    assert_same_masks(full.masks, resumed.masks)


def test_resume_with_augmented_batches_is_bit_identical(tmp_path, data, monkeypatch):
    """The augmentation draws from the loader's checkpointed generator, so a resumed run matches."""
    from admmcompress.data.augment import Augment

    config = run_config("admm")
    config.data.augment = Augment(shift=2)
    full = Runner(config, fresh_model(), *data, progress=False)
    full.run()
    plain = Runner(run_config("admm"), fresh_model(), *data, progress=False)
    plain.run()
    assert not torch.equal(full.model.fc1.weight, plain.model.fc1.weight)  # the augmentation took effect
    resumed = interrupted_then_resumed(config, data, tmp_path / "crashed", monkeypatch, crash_epoch=5)
    assert_same_state(full.model, resumed.model)
    assert_same_masks(full.masks, resumed.masks)


def ste_config() -> RunConfig:
    """Magnitude prune + 2-bit quantize fc1, then retrain with straight-through quantized weights."""
    config = run_config("magnitude")
    stages = config.to_dict()["stages"]
    stages[0]["plan"] = {
        "rules": [
            {"match": "fc1", "structure": "unstructured", "sparsity": 0.5},
            {"match": "fc1", "structure": "fixed_point", "bits": 2},
        ]
    }
    stages[0]["retrain"].update(epochs=3, quantized_weights="ste")
    return RunConfig.from_dict({**config.to_dict(), "stages": stages})


def test_ste_retraining_moves_quantized_weights_between_levels_and_resumes_bit_identically(
    tmp_path, data, monkeypatch
):
    from admmcompress.finalize import QuantizedMaskSet

    config = ste_config()
    held = RunConfig.from_dict({**config.to_dict()})
    held.stages[0].retrain.quantized_weights = "hold"
    frozen = Runner(held, fresh_model(), *data, progress=False)
    frozen.run()
    full = Runner(config, fresh_model(), *data, out_dir=tmp_path / "full", progress=False)
    full.run()
    for runner in (frozen, full):
        assert isinstance(runner.masks, QuantizedMaskSet)
        fc1 = runner.masks.held["fc1.weight"]
        assert fc1.update == "hold" and fc1.shadow is None  # the run's final masks carry no shadow
        assert torch.equal(runner.model.fc1.weight.detach(), fc1.decode())
    assert torch.equal(frozen.masks.held["fc1.weight"].levels, full.masks.held["fc1.weight"].levels)
    assert not torch.equal(frozen.masks.held["fc1.weight"].codes, full.masks.held["fc1.weight"].codes)
    # crash during retrain epoch 2 (pretrain 1, prune 3 epochs of magnitude: the 6th record)
    resumed = interrupted_then_resumed(config, data, tmp_path / "crashed", monkeypatch, crash_epoch=6)
    assert_same_state(full.model, resumed.model)
    assert torch.equal(full.masks.held["fc1.weight"].codes, resumed.masks.held["fc1.weight"].codes)


def test_unknown_quantized_weights_mode_is_refused():
    stage = {"plan": PLAN1, "retrain": {"quantized_weights": "float"}}
    with pytest.raises(ValueError, match=r"quantized_weights='float'; choose one of \('hold', 'ste'\)"):
        RunConfig.from_dict({"model": {"name": "lenet300100"}, "pretrain": {"epochs": 1}, "stages": [stage]})


def test_save_stages_keeps_each_stage_result(tmp_path, data):
    """``save_stages``: stage N's weights and masks are written when it ends; stage 1's file is stage 1's model."""
    spec = run_config(two_stages=True).to_dict()
    spec["save_stages"] = True
    config = RunConfig.from_dict(spec)
    runner = Runner(config, fresh_model(), *data, out_dir=tmp_path, progress=False)
    metrics = runner.run()
    stage1 = fresh_model(seed=99)
    ckpt.load_weights(stage1, tmp_path / "stages" / "stage1.safetensors")
    masks1 = MaskSet.from_state_dict(ckpt.load_tensors(tmp_path / "stages" / "stage1_masks.safetensors"))
    assert set(masks1.masks) == {"fc1.weight"} and float((stage1.fc1.weight == 0).float().mean()) >= 0.5
    assert evaluate(stage1, data[1]) == pytest.approx(metrics["stages"][0]["accuracy_after_retrain"])
    stage2 = fresh_model(seed=98)
    ckpt.load_weights(stage2, tmp_path / "stages" / "stage2.safetensors")
    assert_same_state(stage2, runner.model)
    with pytest.raises(ValueError, match="save_stages='yes' must be true or false"):
        RunConfig.from_dict({**spec, "save_stages": "yes"})


def test_stage_files_survive_a_crash_and_resume_and_overwrite_removes_them(tmp_path, data, monkeypatch):
    """Killed in stage 2 (after stage 1's file was written), resumed: stage 1's file unchanged, stage 2's written."""
    spec = run_config(two_stages=True).to_dict()
    spec["save_stages"] = True
    config = RunConfig.from_dict(spec)
    resumed = interrupted_then_resumed(config, data, tmp_path, monkeypatch, crash_epoch=8)  # stage 2's ADMM
    stages = tmp_path / "stages"
    assert sorted(p.name for p in stages.iterdir()) == [
        "stage1.safetensors", "stage1_masks.safetensors", "stage2.safetensors", "stage2_masks.safetensors"]
    straight = Runner(config, fresh_model(), *data, out_dir=tmp_path / "straight", progress=False)
    straight.run()
    for name in ("stage1.safetensors", "stage2.safetensors"):
        a, b = ckpt.load_tensors(stages / name), ckpt.load_tensors(tmp_path / "straight" / "stages" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_state(resumed.model, straight.model)
    assert "stages" in outputs_in(tmp_path)  # what --overwrite removes


def test_the_layer_table_of_a_coupled_run_lists_its_convs_and_linears_not_the_batchnorms_they_mask():
    # a coupled target masks its BatchNorm's weight and bias too; those are no layer of the table or its compression
    from torch import nn

    from admmcompress.data.datasets import Split

    g = torch.Generator().manual_seed(0)
    split = Split(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 2, (16,), generator=g))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    stage = {"plan": {"rules": [{"match": "0", "structure": "filter", "sparsity": 0.5}]}, "method": "magnitude",
             "coupling": "strict", "admm": {"epochs": 0}, "retrain": {"epochs": 1}}
    config = RunConfig.from_dict({"model": {"name": "lenet5"}, "seed": 0, "pretrain": {"epochs": 0},
                                  "data": {"batch_size": 8}, "stages": [stage]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pruning at initialisation
        runner = Runner(config, model, split, split, progress=False)
        metrics = runner.run()
    assert any(key.startswith("1.") for key, _ in runner.masks.items())  # the BatchNorm is masked ...
    assert [row["name"] for row in metrics["stats"]["layers"]] == ["0", "3"]  # ... but not a row
