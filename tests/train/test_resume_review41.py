"""Review 41: what a resume continues from must be this run's own state.

- ``run --resume`` refuses another run's checkpoint copied into the folder (another seed, plan, method), naming the
  keys; a checkpoint that does not fit the driver is one line naming the file.
- A checkpoint whose bytes changed on disk is refused naming the zip member that fails its CRC-32.
- ``compress()`` interrupted in-process takes its hooks (and the phase's dropout) off the caller's model; a model
  that still carries this library's hooks or rewritten layers is refused by ``resume=True``.
- A moved run folder whose ``pretrained`` file moved resumes, with ``--allow-config-change``, to the same weights.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from admmcompress import Filter, Plan, Rule, compress
from admmcompress.cli import main
from admmcompress.data.datasets import Split
from admmcompress.finalize import MaskSet
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig
from admmcompress.train.run_folder import unsafe_changes
from admmcompress.train.runner import STATE_FILE, Runner, read_progress, run_phases

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

PLAN = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]}


def spec(**overrides) -> dict:
    base = {
        "name": "r41",
        "seed": 1,
        "threads": 1,
        "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 256, "test_limit": 64},
        "pretrain": {"epochs": 1},
        "stages": [{"plan": PLAN, "admm": {"epochs": 2, "rho": 1.0e-2}, "retrain": {"epochs": 1}}],
    }
    base.update(overrides)
    return base


def write(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit 2 and one `admmcompress: error:` line; return the message."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("admmcompress: error: ")]
    assert len(errors) == 1, err
    return errors[0][len("admmcompress: error: "):]


def killed_run(config: Path, out: Path, monkeypatch, epochs: int = 3) -> None:
    """`admmcompress run` stopped by Ctrl-C at the start of its ``epochs``-th epoch (after the checkpoint before)."""
    calls = []
    train_one_epoch = Runner._train_one_epoch

    def stop(self, phase, steps):
        calls.append(phase.label)
        if len(calls) == epochs:
            raise KeyboardInterrupt
        return train_one_epoch(self, phase, steps)

    monkeypatch.setattr(Runner, "_train_one_epoch", stop)
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 130
    monkeypatch.setattr(Runner, "_train_one_epoch", train_one_epoch)


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """A run stopped in its ADMM phase (checkpoint (1, 1)): its config file and folder; tests work on copies."""
    tmp = tmp_path_factory.mktemp("cut")
    config = write(tmp / "run.yaml", spec())
    out = tmp / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        killed_run(config, out, monkeypatch)
    assert read_progress(out) == (1, 1)
    return config, out


def copy_of(folder: Path, where: Path) -> Path:
    shutil.copytree(folder, where)
    (where / ".admmcompress.lock").unlink(missing_ok=True)
    return where


def edit_state(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


# --- 1. another run's checkpoint -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, named",
    [
        ("seed", 2, "seed (2 -> 1"),
        ("sparsity", 0.5, "stages.0.plan.rules.0.sparsity (0.5 -> 0.9"),
        ("method", "gradual", "stages.0.method (\"gradual\" -> \"admm\""),
    ],
)
def test_another_runs_checkpoint_is_refused_naming_the_keys(cut, tmp_path, capsys, key, value, named):
    config, folder = cut
    out = copy_of(folder, tmp_path / "out")

    def other_run(state):
        if key == "sparsity":
            state["config"]["stages"][0]["plan"]["rules"][0]["sparsity"] = value
        elif key == "method":
            state["config"]["stages"][0]["method"] = value
        else:
            state["config"][key] = value

    edit_state(out / STATE_FILE, other_run)
    before = (out / STATE_FILE).read_bytes()
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", "--no-progress"])
    assert f"checkpoint '{out / STATE_FILE}' is not this run's" in message and named in message, message
    assert "restore this run's own checkpoint.pt" in message and "--overwrite" in message
    assert (out / STATE_FILE).read_bytes() == before  # nothing written


def test_a_real_checkpoint_of_another_method_is_refused(cut, tmp_path, capsys, monkeypatch):
    """A gradual run's checkpoint (same model, same plan) copied into this ADMM run's folder."""
    config, folder = cut
    other = spec()
    other["stages"][0]["method"] = "gradual"
    other["stages"][0]["admm"] = {"epochs": 2, "update_every_steps": 2}
    donor = tmp_path / "donor"
    killed_run(write(tmp_path / "other.yaml", other), donor, monkeypatch)
    out = copy_of(folder, tmp_path / "out")
    shutil.copy(donor / STATE_FILE, out / STATE_FILE)
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", "--no-progress"])
    assert "is not this run's" in message and "stages.0.method" in message


def test_a_checkpoint_without_its_config_still_resumes(cut, tmp_path):
    """Checkpoints written before they held their config cannot be checked, and keep loading."""
    config, folder = cut
    out = copy_of(folder, tmp_path / "out")
    edit_state(out / STATE_FILE, lambda state: state.pop("config"))
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 0


def test_changes_a_resume_accepts_are_accepted_in_the_checkpoint_too(cut, tmp_path):
    """The checkpoint's config, like config.yaml, may differ in what --allow-config-change accepts."""
    config, folder = cut
    out = copy_of(folder, tmp_path / "out")
    edit_state(out / STATE_FILE, lambda state: state["config"]["stages"][0]["retrain"].update(epochs=3))
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 0


def test_a_driver_that_cannot_be_rebuilt_on_the_checkpoint_is_one_line(cut, tmp_path, capsys, monkeypatch):
    """What a PENNI checkpoint in a prune-then-quantize run (written before checkpoints held their config) gave:
    a bare KeyError from inside the driver."""
    from admmcompress.drivers.admm import ADMM

    config, folder = cut
    out = copy_of(folder, tmp_path / "out")
    edit_state(out / STATE_FILE, lambda state: state.pop("config"))

    def missing_weight(*args, **kwargs):
        raise KeyError("conv1.weight")

    monkeypatch.setattr(ADMM, "from_config", classmethod(missing_weight))
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", "--no-progress"])
    assert f"checkpoint '{out / STATE_FILE}'" in message and "'driver' cannot be restored" in message
    assert "conv1.weight" in message and "--overwrite" in message


# --- 2. damaged bytes ---------------------------------------------------------------------------------------
def flip_a_weight(path: Path, key: str) -> str:
    """Flip the sign bit of the first non-zero entry of ``key`` inside the zip member holding it; its name."""
    weight = torch.load(path, weights_only=True)["model"][key]
    raw = weight.contiguous().numpy().tobytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if archive.read(i.filename) == raw)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        first = int((weight.flatten() != 0).nonzero()[0])
        offset = info.header_offset + 30 + name_len + extra_len + first * 4 + 3
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x80]))
    return info.filename


def test_a_flipped_weight_byte_is_refused_naming_the_member(cut, tmp_path, capsys):
    config, folder = cut
    out = copy_of(folder, tmp_path / "out")
    member = flip_a_weight(out / STATE_FILE, "fc1.weight")
    with pytest.raises(ckpt.CheckpointError, match=f"member '{member}' does not match its CRC-32"):
        ckpt.load_state(out / STATE_FILE, advice="the caller's advice")
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", "--no-progress"])
    assert f"checkpoint '{out / STATE_FILE}' is damaged" in message and member in message
    assert "--overwrite" in message


def test_a_flipped_byte_gets_compress_advice(tmp_path, monkeypatch):
    interrupted_call(monkeypatch, tmp_path, 1)
    flip_a_weight(tmp_path / STATE_FILE, "0.weight")
    with pytest.raises(Exception, match="CRC-32") as caught:
        compress(net(), PLAN_API, data(32, 0), data(16, 1), out_dir=tmp_path, resume=True, **ARGS)
    assert "overwrite=True" in str(caught.value) and "--overwrite" not in str(caught.value)


def test_legacy_non_zip_checkpoints_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"a": torch.arange(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(ckpt.load_state(path)["a"], torch.arange(3))


# --- 3. compress() interrupted in-process ------------------------------------------------------------------
def data(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(4 * 4 * 4, 3))


PLAN_API = Plan([Rule(Filter(sparsity=0.5), match="0")])
ARGS = {"admm": {"epochs": 2, "update_every_steps": 2}, "retrain": {"epochs": 2, "dropout": 0.0}, "batch_size": 8}


class Interrupted(Exception):
    pass


def interrupted_call(monkeypatch, out, after_saves: int, model: nn.Module | None = None, plan=PLAN_API,
                     **kwargs) -> nn.Module:
    """compress(...) stopped (as by Ctrl-C in a notebook) right after its ``after_saves``-th checkpoint."""
    model = net() if model is None else model
    save, count = Runner._save, [0]

    def save_then_stop(self):
        save(self)
        count[0] += 1
        if count[0] == after_saves:
            raise Interrupted

    monkeypatch.setattr(Runner, "_save", save_then_stop)
    with pytest.raises(Interrupted):
        compress(model, plan, data(32, 0), data(16, 1), out_dir=out, **(kwargs or ARGS))
    monkeypatch.setattr(Runner, "_save", save)
    return model


def test_an_interrupted_call_leaves_no_hooks_and_resumes_with_the_same_object(tmp_path, monkeypatch):
    whole = compress(net(), PLAN_API, data(32, 0), data(16, 1), out_dir=tmp_path / "whole", **ARGS)
    model = interrupted_call(monkeypatch, tmp_path / "cut", 4)  # inside retraining: masks attached, dropout 0
    assert all(not p._backward_hooks for p in model.parameters())
    assert model[5].p == 0.3  # the model's own dropout back, not the phase's
    resumed = compress(model, PLAN_API, data(32, 0), data(16, 1), out_dir=tmp_path / "cut", resume=True, **ARGS)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_a_model_with_mask_hooks_is_refused_on_resume(tmp_path, monkeypatch):
    model = interrupted_call(monkeypatch, tmp_path, 1)
    MaskSet({"0.weight": torch.ones_like(model[0].weight)}).attach(model)
    with pytest.raises(ValueError, match="mask gradient hooks on '0.weight'.*pass the model as it was before the "
                                         "interrupted call") as caught:
        compress(model, PLAN_API, data(32, 0), data(16, 1), out_dir=tmp_path, resume=True, **ARGS)
    assert "\n" not in str(caught.value)


def test_a_model_penni_rewrote_is_refused_on_resume_and_a_fresh_one_resumes(tmp_path, monkeypatch):
    from admmcompress.executors.penni import SharedKernelConv
    from admmcompress.structures import SharedKernels

    plans = [Plan({"2": SharedKernels(bases=3)})] * 2
    kwargs = {"method": "penni", "admm": {"epochs": 1, "update_every_steps": 2}, "retrain": {"epochs": 1},
              "batch_size": 8}
    whole = compress(net(), plans, data(32, 0), data(16, 1), out_dir=tmp_path / "whole", **kwargs)
    model = interrupted_call(monkeypatch, tmp_path / "cut", 3, plan=plans, **kwargs)  # in stage 2
    assert isinstance(model[2], SharedKernelConv)
    assert all(p.requires_grad for p in model.parameters())  # the driver's frozen part trainable again
    with pytest.raises(ValueError, match=r"layers '2' \(SharedKernelConv\) already rewritten by the interrupted "
                                         "call; pass the model as it was before the interrupted call"):
        compress(model, plans, data(32, 0), data(16, 1), out_dir=tmp_path / "cut", resume=True, **kwargs)
    resumed = compress(net(), plans, data(32, 0), data(16, 1), out_dir=tmp_path / "cut", resume=True, **kwargs)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


# --- 4. a moved run folder -----------------------------------------------------------------------------------
def test_a_moved_pretrained_file_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    from admmcompress.models import create_model

    torch.manual_seed(3)
    dense = tmp_path / "home" / "dense.safetensors"
    dense.parent.mkdir()
    save_file(create_model("lenet300100").state_dict(), str(dense))
    first = spec(pretrained=str(dense))
    first.pop("pretrain")
    whole = tmp_path / "whole"
    assert main(["run", str(write(tmp_path / "run.yaml", first)), "--out", str(whole), "--no-progress"]) == 0
    out = tmp_path / "home" / "out"
    killed_run(tmp_path / "run.yaml", out, monkeypatch, epochs=2)
    assert read_progress(out) == (0, 1)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "home", moved)  # the run folder and its pretrained file, to another place
    edited = dict(first, pretrained=str(moved / "dense.safetensors"))
    config = write(tmp_path / "moved.yaml", edited)
    argv = ["run", str(config), "--out", str(moved / "out"), "--resume", "--no-progress"]
    message = error_line(capsys, argv)
    assert "pretrained (" in message and "--allow-config-change" in message and "moved files' paths" in message
    assert main([*argv, "--allow-config-change"]) == 0
    assert yaml.safe_load((moved / "out" / "config.yaml").read_text())["pretrained"] == edited["pretrained"]
    expected, got = load_file(str(whole / "model.safetensors")), load_file(str(moved / "out" / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_which_location_changes_a_resume_accepts():
    phases = run_phases(RunConfig.from_dict(spec()))
    progress = (0, 1)
    accepted = {
        "pretrained": ("/old/a.safetensors", "/new/a.safetensors"),
        "teacher.1": ("/old/t2", "/new/t2"),
        "data.data_dir": (None, "/data"),
        "plugins.0": ("/old/p.py", "/new/p.py"),
    }
    assert unsafe_changes(accepted, phases, progress) == {}
    refused = unsafe_changes(
        {"pretrained": ("/old/a.safetensors", None), "teacher.2": ("(absent)", "/new/t3"),
         "teacher.0": ("/old/t1", "/new/t1")},
        phases, progress, teacher_saved=False,
    )
    assert set(refused) == {"pretrained", "teacher.2", "teacher.0"}
    # a compress() call's checkpoint names no file: resumed by `run` with one, its weights are not a moved file's
    assert "pretrained" in unsafe_changes({"pretrained": ("<in-memory model>", "/a.safetensors")}, phases, progress)
    assert "pretrains" in refused["pretrained"] and "holds no copy of the teacher" in refused["teacher.0"]


def test_a_checkpoint_saved_with_torchs_crcs_turned_off_still_loads(tmp_path):
    """torch.save with serialization.config.save.compute_crc32 = False records CRC 0 for every member: nothing
    to check against, so the file is read (not refused as damaged)."""
    import torch.utils.serialization

    from admmcompress.train.checkpoint import check_archive

    path = tmp_path / "nocrc.pt"
    save_config = torch.utils.serialization.config.save
    # set and restored by hand: torch's config object does not survive monkeypatch's restore (later saves fail)
    before = save_config.compute_crc32
    save_config.compute_crc32 = False
    try:
        torch.save({"w": torch.ones(3)}, path)
    finally:
        save_config.compute_crc32 = before
    check_archive(path)  # no CheckpointError
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
