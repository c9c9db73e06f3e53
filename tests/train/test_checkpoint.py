"""Checkpoint files: atomic replacement, weights-only loading, safetensors round trips."""

from __future__ import annotations

import os
import pickle
import stat
import warnings
from pathlib import Path

import pytest
import torch

from admmcompress.models import LeNet5, LeNet300100
from admmcompress.train import checkpoint as ckpt


class Gadget:
    """A custom Python object: a weights-only checkpoint must refuse to unpickle it."""

    def __init__(self, value: int = 3):
        self.value = value


def _leftovers(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != name]


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    ckpt.atomic_write(target, lambda tmp: tmp.write_text("first"))
    ckpt.atomic_write(target, lambda tmp: tmp.write_text("second"))
    assert target.read_text() == "second"
    assert _leftovers(target.parent, "file.txt") == []


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    target = tmp_path / "state.bin"
    ckpt.atomic_write(target, lambda tmp: tmp.write_bytes(b"old contents"))

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half a new fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(target, broken)
    assert target.read_bytes() == b"old contents"
    assert _leftovers(tmp_path, "state.bin") == []


def test_atomic_write_of_a_new_file_leaves_nothing_when_the_writer_raises(tmp_path):
    target = tmp_path / "new.bin"

    def broken(tmp: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.atomic_write(target, broken)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_gives_the_permissions_of_a_plain_open_without_touching_the_umask(tmp_path, monkeypatch):
    """The file gets 0666 less the umask, as open() would; the umask is never set (a race with other threads)."""
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("atomic_write set the umask"))
        target = ckpt.atomic_write(tmp_path / "report.md", lambda tmp: tmp.write_text("x"))
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o022, 0o644)])
def test_safetensors_files_get_the_permissions_of_every_other_output(tmp_path, monkeypatch, umask, mode):
    """safetensors' save_file writes a new 0600 file over the temporary name; atomic_write gives back the mode a
    plain open() gives (model.safetensors, masks.safetensors, stages/ were 0600 while the rest were 0644)."""
    old = os.umask(umask)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("save_tensors set the umask"))
        target = ckpt.save_tensors(tmp_path / "model.safetensors", {"w": torch.ones(2)}, {"k": 1})
        empty = ckpt.save_tensors(tmp_path / "masks.safetensors", {})
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert stat.S_IMODE(empty.stat().st_mode) == mode
    assert torch.equal(ckpt.load_tensors(target)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.safetensors", "model.safetensors"]


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    """A rename is durable only once the folder's entry is on disk: the folder is fsynced after os.replace."""
    calls: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    monkeypatch.setattr(
        os, "fsync", lambda fd: (calls.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file"),
                                 real_fsync(fd))[1]
    )
    ckpt.atomic_write(tmp_path / "state.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert calls == ["fsync file", "replace", "fsync folder"]


def test_save_state_load_state_round_trip(tmp_path):
    state = {
        "phase_index": 2,
        "epoch": 1,
        "model": {"w": torch.randn(3, 4), "mask": torch.rand(3, 4) > 0.5},
        "rng": torch.get_rng_state(),
        "history": [{"phase": "stage1/prune", "loss": 0.25, "residual": {"fc1.weight:unstructured": 0.1}}],
        "metrics": {"stages": [{}], "overall": float("inf")},
        "optimizer": None,
    }
    path = ckpt.save_state(tmp_path / "checkpoint.pt", state)
    loaded = ckpt.load_state(path)
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["model"]["mask"].dtype == torch.bool
    assert torch.equal(loaded["model"]["mask"], state["model"]["mask"])
    assert torch.equal(loaded["rng"], state["rng"])
    assert loaded["history"] == state["history"]
    assert loaded["metrics"] == state["metrics"]
    assert _leftovers(tmp_path, "checkpoint.pt") == []


def test_load_state_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    # Written with plain torch.save (full pickle), as a tampered or foreign file would be.
    torch.save({"epoch": 1, "payload": Gadget()}, path)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        ckpt.load_state(path)


def test_save_state_of_a_custom_object_cannot_be_loaded_back(tmp_path):
    path = tmp_path / "checkpoint.pt"
    try:
        ckpt.save_state(path, {"payload": Gadget()})
    except Exception:  # refusing to save is fine too
        assert not path.exists()
        return
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_state(path)


def test_save_tensors_and_load_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    source = LeNet300100()
    with torch.no_grad():
        source.fc1.weight[:, ::2] = 0.0
    path = ckpt.save_tensors(
        tmp_path / "model.safetensors", source.state_dict(), {"config": {"name": "x", "n": 2}}
    )
    target = LeNet300100()
    ckpt.load_weights(target, path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    # metadata is stored as JSON strings
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"config": '{"name": "x", "n": 2}'}
    assert _leftovers(tmp_path, "model.safetensors") == []


def test_save_tensors_accepts_bool_masks_and_non_contiguous_tensors(tmp_path):
    masks = {"fc1.weight": torch.rand(5, 4) > 0.5, "t": torch.randn(4, 5).t()}
    path = ckpt.save_tensors(tmp_path / "masks.safetensors", masks)
    loaded = ckpt.load_tensors(path)
    assert loaded["fc1.weight"].dtype == torch.bool
    assert torch.equal(loaded["fc1.weight"], masks["fc1.weight"])
    assert torch.equal(loaded["t"], masks["t"])


def test_load_tensors_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        ckpt.load_tensors(tmp_path / "nowhere.safetensors")


def test_load_weights_into_the_wrong_model_names_the_keys(tmp_path):
    path = ckpt.save_tensors(tmp_path / "lenet5.safetensors", LeNet5().state_dict())
    model = LeNet300100()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        ckpt.load_weights(model, path)
    message = str(info.value)
    assert "LeNet300100" in message
    assert "missing ['fc3.bias', 'fc3.weight']" in message
    assert "unexpected ['conv1.bias', 'conv1.weight', 'conv2.bias', 'conv2.weight']" in message
    assert "wrong shapes ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight']" in message
    # nothing was loaded
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_load_weights_names_a_shape_mismatch(tmp_path):
    path = ckpt.save_tensors(tmp_path / "m.safetensors", LeNet300100(num_classes=5).state_dict())
    with pytest.raises(
        ValueError, match=r"missing \[\], unexpected \[\], wrong shapes \['fc3.bias', 'fc3.weight'\]"
    ):
        ckpt.load_weights(LeNet300100(), path)


def test_load_weights_says_when_it_loads_with_less_precision(tmp_path):
    """float32 weights into a bfloat16 model lose bits: a warning names them; bf16 into float32 is exact."""
    path = ckpt.save_tensors(tmp_path / "m.safetensors", LeNet300100().state_dict())
    with pytest.warns(RuntimeWarning, match=r"less precision than saved \(torch.float32 -> torch.bfloat16\)"):
        ckpt.load_weights(LeNet300100().to(torch.bfloat16), path)
    low = ckpt.save_tensors(tmp_path / "low.safetensors", LeNet300100().to(torch.bfloat16).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load_weights(LeNet300100(), low)


def test_load_weights_refuses_fractions_for_an_integer_buffer(tmp_path):
    model = torch.nn.BatchNorm1d(4)
    state = dict(model.state_dict())
    state["num_batches_tracked"] = torch.tensor(2.7)
    path = ckpt.save_tensors(tmp_path / "bn.safetensors", state)
    with pytest.raises(ValueError, match=r"fractional values for integer tensors \['num_batches_tracked'\]"):
        ckpt.load_weights(torch.nn.BatchNorm1d(4), path)


def test_a_checkpoint_cast_wholesale_to_fp16_loads(tmp_path):
    """Every tensor cast to fp16 (num_batches_tracked too, a whole number): loads, with the precision said."""
    source = torch.nn.BatchNorm1d(4)
    source.num_batches_tracked.fill_(7)
    path = ckpt.save_tensors(tmp_path / "half.safetensors", {k: v.half() for k, v in source.state_dict().items()})
    target = torch.nn.BatchNorm1d(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load_weights(target, path)  # fp16 into float32 is exact: no warning, no refusal
    assert int(target.num_batches_tracked) == 7


def test_bf16_into_fp16_is_said_as_it_can_overflow(tmp_path):
    path = ckpt.save_tensors(tmp_path / "bf.safetensors", {"weight": torch.full((2, 2), 1e5, dtype=torch.bfloat16),
                                                          "bias": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.warns(RuntimeWarning, match=r"torch.bfloat16 -> torch.float16"):
        ckpt.load_weights(torch.nn.Linear(2, 2).half(), path)
