"""Files a run reads or writes that are damaged, misplaced or unwritable: one `admmcompress: error:` line, exit 2.

Configs (empty, binary, a YAML list or scalar), checkpoints and pretrained files (random bytes, truncated,
another model's), dataset files and folders, an unwritable --out, a full disk while writing a checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

from admmcompress.atomic import WriteError
from admmcompress.cli import main
from admmcompress.data.files import find_dataset
from admmcompress.models import LeNet5, LeNet300100
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.checkpoint import CheckpointError, OutputFolderError

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


def spec(**overrides) -> dict:
    """A run that trains in about a second: 128 images, one epoch per phase."""
    out = {
        "name": "files",
        "seed": 0,
        "threads": 1,
        "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 128, "test_limit": 64},
        "pretrain": {"epochs": 1},
        "stages": [{"plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]},
                    "admm": {"epochs": 1}, "retrain": {"epochs": 1}}],
    }
    out.update(overrides)
    return out


def write(path: Path, content: dict | bytes | str) -> Path:
    if isinstance(content, dict):
        content = yaml.safe_dump(content, sort_keys=False)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def user_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit 2 and exactly one `admmcompress: error:` line, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("admmcompress: error: "), err
    return err[0].removeprefix("admmcompress: error: ")




# --- config files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, expected",
    [
        pytest.param(b"", "is empty; a run config needs at least 'model:'", id="empty"),
        pytest.param(b"   \n# only a comment\n", "is empty", id="comment-only"),
        pytest.param(bytes(range(256)) * 8, "is not text", id="binary"),
        pytest.param(b"\x01\x02\x03 abc", "not valid YAML: unacceptable character", id="control-chars"),
        pytest.param(b"- model\n- stages\n", "expected a mapping, got list", id="list"),
        pytest.param(b"42\n", "holds the single value 42", id="scalar"),
        pytest.param(b"lenet5\n", "holds the single value 'lenet5'", id="string"),
        pytest.param(b"model: {name: lenet5\n", "not valid YAML: ", id="broken-flow"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, content, expected):
    path = write(tmp_path / "run.yaml", content)
    message = user_error(capsys, ["run", str(path), "--out", str(tmp_path / "out")])
    assert str(path) in message and expected in message
    assert not (tmp_path / "out").exists()


def test_a_folder_given_as_the_config_says_so(tmp_path, capsys):
    message = user_error(capsys, ["run", str(tmp_path), "--out", str(tmp_path / "out")])
    assert message == f"config file '{tmp_path}' is a folder; give a YAML run configuration (see configs/)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_config_says_so(tmp_path, capsys):
    path = write(tmp_path / "run.yaml", spec())
    path.chmod(0)
    assert "cannot be read" in user_error(capsys, ["run", str(path)])


# --- pretrained files and checkpoints ----------------------------------------------------------------


def _safetensors_of(model: torch.nn.Module, path: Path) -> Path:
    return ckpt.save_tensors(path, model.state_dict())


@pytest.mark.parametrize(
    "make, expected",
    [
        pytest.param(lambda p: p.write_bytes(os.urandom(4096)), "not a readable safetensors file", id="random"),
        pytest.param(lambda p: p.write_bytes(_safetensors_of(LeNet300100(), p).read_bytes()[:3000]),
                     "not a readable safetensors file", id="truncated"),
        pytest.param(lambda p: p.write_bytes(b""), "not a readable safetensors file", id="empty"),
        pytest.param(lambda p: torch.save(LeNet300100().state_dict(), p), "safetensors.torch.save_file",
                     id="torch-save-file"),
        pytest.param(lambda p: _safetensors_of(LeNet5(), p), "does not fit LeNet300100", id="another-model"),
        pytest.param(lambda p: _safetensors_of(LeNet300100(num_classes=5), p), "wrong shapes ['fc3.bias'",
                     id="wrong-shape"),
    ],
)
def test_a_bad_pretrained_file_is_one_line_naming_it(tmp_path, capsys, make, expected):
    pretrained = tmp_path / "dense.safetensors"
    make(pretrained)
    config = write(tmp_path / "run.yaml", spec(pretrained=str(pretrained), pretrain=None))
    message = user_error(capsys, ["run", str(config), "--out", str(tmp_path / "out")])
    assert f"checkpoint '{pretrained}'" in message and expected in message


def test_another_models_checkpoint_lists_a_few_keys_not_all(tmp_path):
    from admmcompress.models import create_model

    path = _safetensors_of(create_model("resnet20"), tmp_path / "resnet.safetensors")
    with pytest.raises(CheckpointError) as err:
        ckpt.load_weights(LeNet300100(), path)
    message = str(err.value)
    assert "and 6" in message or " more" in message  # dozens of keys differ: the first 8 and a count
    assert len(message) < 1500 and "\n" not in message


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: os.urandom(len(b)), id="random"),
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:200]) + b[200:], id="flipped"),
    ],
)
def test_a_damaged_training_state_is_a_checkpoint_error_naming_it(tmp_path, damage):
    path = ckpt.save_state(tmp_path / "checkpoint.pt", {"model": LeNet300100().state_dict(), "epoch": 3})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as err:
        ckpt.load_state(path)
    message = str(err.value)
    assert f"checkpoint '{path}'" in message and "--overwrite" in message and "\n" not in message


def test_a_training_state_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a training state"):
        ckpt.load_state(path)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        ckpt.load_state(tmp_path / "nowhere.pt")


def test_damaged_safetensors_are_checkpoint_errors(tmp_path):
    path = _safetensors_of(LeNet300100(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    for damaged in (data[:8], data[:-100], os.urandom(len(data)), b"{" + data[1:]):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            ckpt.load_tensors(path)
    assert issubclass(CheckpointError, ValueError)  # the CLI's user errors


# --- dataset files and data_dir ----------------------------------------------------------------------


def test_a_data_dir_without_the_dataset_stops_the_run(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", spec(data={**spec()["data"], "data_dir": str(tmp_path / "data")}))
    (tmp_path / "data").mkdir()
    message = user_error(capsys, ["run", str(config), "--out", str(tmp_path / "out")])
    assert f"data_dir '{tmp_path / 'data'}' has no mnist.npz" in message


def test_a_truncated_dataset_stops_the_run_naming_it(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "mnist.npz").write_bytes(find_dataset("mnist").read_bytes()[:100_000])
    config = write(tmp_path / "run.yaml", spec(data={**spec()["data"], "data_dir": str(data)}))
    message = user_error(capsys, ["run", str(config), "--out", str(tmp_path / "out")])
    assert f"dataset file '{data / 'mnist.npz'}'" in message and "mnist.npz" in message


def test_the_report_names_the_data_file_used(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(find_dataset("mnist"), data / "mnist.npz")
    config = write(tmp_path / "run.yaml", spec(data={**spec()["data"], "data_dir": str(data)}))
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["data_file"] == str(data / "mnist.npz")
    assert f"- Data file: {data / 'mnist.npz'}" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0  # the recomputed report keeps it
    assert f"Data file: {data / 'mnist.npz'}" in capsys.readouterr().out


# --- output folders ----------------------------------------------------------------------------------


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", spec())
    taken = write(tmp_path / "taken", b"data")
    message = user_error(capsys, ["run", str(config), "--out", str(taken)])
    assert message == f"output folder '{taken}' is a file, not a folder; choose another --out"
    message = user_error(capsys, ["run", str(config), "--out", str(taken / "run")])
    assert f"cannot be created: '{taken}' is a file" in message
    assert taken.read_bytes() == b"data"


def test_a_read_only_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    config = write(tmp_path / "run.yaml", spec())
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    # Root writes anywhere, so the permission check itself is what is exercised here (and for real below).
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    message = user_error(capsys, ["run", str(config), "--out", str(folder)])
    assert message == (f"output folder '{folder}' is not writable (read-only for this user); "
                       "make it writable or choose another --out")
    message = user_error(capsys, ["run", str(config), "--out", str(folder / "a" / "b")])
    assert f"cannot be created: '{folder}' is not writable" in message
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_for_real(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputFolderError, match="is not writable"):
            ckpt.check_output_folder(folder)
    finally:
        folder.chmod(0o755)


def test_a_writable_or_new_out_passes_the_check(tmp_path):
    ckpt.check_output_folder(tmp_path)
    ckpt.check_output_folder(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # the check creates nothing


# --- a full disk while writing -----------------------------------------------------------------------


class _FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, path, room: int = 100):
        self.handle, self.room = open(path, "wb"), room  # noqa: SIM115 - closed in __exit__

    def write(self, data) -> int:
        if self.room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_a_full_disk_during_a_checkpoint_names_it_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = ckpt.save_state(tmp_path / "checkpoint.pt", {"epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()
    # torch.save itself reports the failing write as a bare RuntimeError; the OSError is behind it.
    monkeypatch.setattr(ckpt, "open", lambda p, mode: _FullDisk(p), raising=False)
    with pytest.raises(WriteError) as err:
        ckpt.save_state(path, {"epoch": 2, "w": torch.zeros(10_000)})
    assert err.value.errno == errno.ENOSPC
    assert str(err.value).startswith(f"cannot write '{path}': No space left on device")
    assert "previous 'checkpoint.pt' is intact" in str(err.value)
    assert path.read_bytes() == before and ckpt.load_state(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left


def test_a_full_disk_while_writing_safetensors_names_the_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(WriteError) as err:
        ckpt.save_tensors(tmp_path / "model.safetensors", {"w": torch.zeros(2)})
    assert err.value.errno == errno.ENOSPC and f"'{tmp_path / 'model.safetensors'}'" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_other_failures_inside_a_write_are_not_disguised_as_disk_errors(tmp_path):
    def broken(tmp):
        raise RuntimeError("a bug, not the disk")

    with pytest.raises(RuntimeError, match="a bug, not the disk"):
        ckpt.atomic_write(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_training_state_of_another_model_is_named_before_loading(tmp_path):
    path = ckpt.save_state(tmp_path / "checkpoint.pt", {"model": LeNet5().state_dict(), "epoch": 1})
    model = LeNet300100()
    with pytest.raises(CheckpointError) as err:
        ckpt.check_state_fits(model, ckpt.load_state(path), path)
    message = str(err.value)
    assert f"checkpoint '{path}' does not fit LeNet300100" in message and "--overwrite" in message
    with pytest.raises(CheckpointError) as advised:  # the caller's advice (compress's) in place of the CLI's flags
        ckpt.check_state_fits(model, ckpt.load_state(path), path, advice="call again")
    assert str(advised.value) == message.replace(ckpt.RESTART_CLI, "call again")
    assert advised.value.problem == message.split("; a run cannot resume")[0]
    with pytest.raises(CheckpointError, match="it has no model weights"):
        ckpt.check_state_fits(model, {"epoch": 1}, path)
    ckpt.check_state_fits(model, {"model": LeNet300100().state_dict()}, path)  # fits: no error
