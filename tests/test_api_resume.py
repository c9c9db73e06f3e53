"""``compress(..., out_dir=..., resume=True)``: an interrupted call continues from its last checkpoint to the
result an uninterrupted call gives; other arguments, a missing checkpoint and a held folder are one line each."""

import copy
import pickle

import pytest
import torch
from torch import nn

from admmcompress import Filter, Plan, Rule, compress
from admmcompress.api import OutputFolderError
from admmcompress.data.datasets import Split
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.checkpoint import CheckpointError
from admmcompress.train.lock import RunLock, RunLocked
from admmcompress.train.runner import STATE_FILE, Runner

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


def data(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


PLAN = Plan([Rule(Filter(sparsity=0.5), match="0")])
ARGS = {"admm": {"epochs": 2, "update_every_steps": 2}, "retrain": {"epochs": 2}, "batch_size": 8,
        "compact": {"samples": 2}}


class Interrupted(Exception):
    pass


def interrupted_call(monkeypatch, out, after_saves: int):
    """compress(...) stopped (as by Ctrl-C or a kill) right after its ``after_saves``-th checkpoint."""
    save, count = Runner._save, [0]

    def save_then_stop(self):
        save(self)
        count[0] += 1
        if count[0] == after_saves:
            raise Interrupted

    monkeypatch.setattr(Runner, "_save", save_then_stop)
    with pytest.raises(Interrupted):
        compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=out, **ARGS)
    monkeypatch.setattr(Runner, "_save", save)


@pytest.mark.parametrize("after_saves", [1, 3])  # inside the admm phase; inside retraining
def test_an_interrupted_call_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, after_saves):
    whole = compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path / "whole", **ARGS)
    interrupted_call(monkeypatch, tmp_path / "cut", after_saves)
    resumed = compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path / "cut", resume=True, **ARGS)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert resumed.compacted is not None and resumed.compacted[0].out_channels == 4
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in whole.history]


def test_a_resumed_call_removes_the_temporary_files_a_kill_left_in_every_run_subfolder(tmp_path, monkeypatch):
    out = tmp_path / "cut"
    interrupted_call(monkeypatch, out, 1)
    (out / "stages").mkdir(exist_ok=True)
    left = [out / ".checkpoint.pt.ab12cd_3.tmp", out / "stages" / ".stage1.safetensors.ab12cd_3.tmp",
            out / "compact" / ".model.safetensors.ab12cd_3.tmp"]
    (out / "compact").mkdir(exist_ok=True)
    for path in left:
        path.write_bytes(b"half a file")
    mine = out / "stages" / "notes.tmp"  # not a name our writes make: kept
    mine.write_text("mine")
    compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=out, resume=True, **ARGS)
    assert not [p for p in left if p.exists()] and mine.read_text() == "mine"


def test_resume_with_other_arguments_names_them(tmp_path, monkeypatch):
    interrupted_call(monkeypatch, tmp_path, 1)
    other = dict(ARGS, retrain={"epochs": 3}, seed=5)
    with pytest.raises(ValueError) as err:
        compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, resume=True, **other)
    message = str(err.value)
    assert message.startswith("compress: resume=True, but the arguments differ from the interrupted call's: ")
    assert "seed: 0 -> 5" in message and "stages.0.retrain.epochs: 2 -> 3" in message
    assert "\n" not in message and "overwrite=True to start over" in message


def test_a_kept_checkpoint_is_not_replaced_without_saying_how(tmp_path, monkeypatch):
    interrupted_call(monkeypatch, tmp_path, 1)
    saved = (tmp_path / STATE_FILE).read_bytes()
    with pytest.raises(OutputFolderError, match="pass resume=True to continue it, overwrite=True to replace it"):
        compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, **ARGS)
    assert (tmp_path / STATE_FILE).read_bytes() == saved


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"resume": True}, "compress: resume=True needs out_dir="),
        ({"resume": True, "overwrite": True, "out_dir": "x"}, "compress: resume=True continues the earlier call and "
                                                              "overwrite=True replaces it; pass one"),
        ({"resume": True, "out_dir": "empty"}, "holds no checkpoint.pt (the call stopped before its first "
                                               "checkpoint, or this is another folder); call without resume=True"),
    ],
)
def test_a_resume_that_cannot_be_is_one_line(tmp_path, kwargs, expected):
    if "out_dir" in kwargs:
        kwargs = dict(kwargs, out_dir=tmp_path / kwargs["out_dir"])
    with pytest.raises(ValueError) as err:
        compress(net(), PLAN, data(32, 0), data(16, 1), **kwargs, **ARGS)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_folder_another_call_holds_is_refused(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunLocked):
        compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, **copy.deepcopy(ARGS))


def test_refusals_name_compress_arguments_not_the_command_lines_flags(tmp_path, monkeypatch):
    with RunLock(tmp_path), pytest.raises(RunLocked) as held:
        compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, **ARGS)
    assert str(held.value).endswith("choose another out_dir") and "--out" not in str(held.value)
    interrupted_call(monkeypatch, tmp_path, 1)
    wider = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    with pytest.raises(ValueError) as other_model:
        compress(wider, PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, resume=True, **ARGS)
    assert "pass overwrite=True to start over" in str(other_model.value) and "--out" not in str(other_model.value)
    with pytest.raises(ValueError) as compact_off:
        compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, resume=True,
                 **{k: v for k, v in ARGS.items() if k != "compact"})
    message = str(compact_off.value)  # one change for the whole section, not one per key
    assert "differ from the interrupted call's: compact: '{\"atol\": 0.0001, " in message
    assert "\"samples\": 2}' -> 'off'; pass the same arguments" in message


def _wider() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def test_a_checkpoint_that_does_not_fit_the_model_advises_compress_arguments(tmp_path, monkeypatch):
    interrupted_call(monkeypatch, tmp_path, 1)
    with pytest.raises(CheckpointError) as err:
        compress(_wider(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, resume=True, **ARGS)
    assert str(err.value) == (
        f"checkpoint '{tmp_path / STATE_FILE}' does not fit Sequential: missing [], unexpected [], wrong shapes "
        "['0.bias', '0.weight', '2.weight']; a run cannot resume from it: pass overwrite=True to start over, or "
        "choose another out_dir"
    )
    assert "--overwrite" not in str(err.value) and "--out" not in str(err.value)


def test_checkpoint_content_that_cannot_be_restored_advises_compress_arguments(tmp_path, monkeypatch):
    interrupted_call(monkeypatch, tmp_path, 1)
    path = tmp_path / STATE_FILE
    state = ckpt.load_state(path)
    state["loader"] = {"generator": "abc"}
    ckpt.save_state(path, state)
    with pytest.raises(CheckpointError) as err:
        compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, resume=True, **ARGS)
    message = str(err.value)
    assert message.startswith(f"checkpoint '{path}': its 'loader' cannot be restored (")
    assert message.endswith("; it is damaged or not a training state of this tool: a run cannot resume from it: "
                            "pass overwrite=True to start over, or choose another out_dir")
    assert "--overwrite" not in message and "--out" not in message


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        # torch's own reason holds a '; ': the problem is named whole, not cut there
        (lambda p: p.write_bytes(pickle.dumps(5, protocol=2)),
         "cannot be read (Invalid magic number; corrupt file?): it is truncated, damaged or not a training state"),
        (lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a training state"),
        (lambda p: torch.save({"epoch": 1}, p), "is not a training state of this tool (no 'phase_index')"),
    ],
)
def test_a_checkpoint_that_is_not_a_training_state_is_refused_before_the_run(tmp_path, write, problem):
    path = tmp_path / STATE_FILE
    write(path)
    with pytest.raises(OutputFolderError) as err:
        compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, resume=True, **ARGS)
    assert str(err.value) == (f"compress: checkpoint '{path}' {problem}; pass overwrite=True to start over, or "
                              "choose another out_dir")


def test_a_damaged_value_is_named_without_the_command_lines_flags(tmp_path, monkeypatch):
    interrupted_call(monkeypatch, tmp_path, 1)
    path = tmp_path / STATE_FILE
    state = ckpt.load_state(path)
    state["epoch"] = "3"
    ckpt.save_state(path, state)
    with pytest.raises(OutputFolderError) as err:
        compress(net(), PLAN, data(32, 0), data(16, 1), out_dir=tmp_path, resume=True, **ARGS)
    assert str(err.value) == (f"compress: checkpoint '{path}': 'epoch' is str, expected int; pass overwrite=True to "
                              "start over, or choose another out_dir")
