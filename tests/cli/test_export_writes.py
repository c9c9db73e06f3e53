"""`admmcompress export` writes: example inputs as the run read them, --out checked first, files written atomically.

A run on a dataset of your own (`data.dataset: {import: ...}`) exports like one on a bundled dataset; an --out
under a file or in a read-only folder is one line before the run is read; a failing write (full disk, read-only
file system) is one line and leaves nothing at --out, so the retry is not refused; missing folders are created.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from admmcompress import run_export
from admmcompress.atomic import TMP_PATTERN, WriteError
from admmcompress.cli import main
from admmcompress.executors import get_executor
from admmcompress.train.config import RunConfig

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

DATASET_MODULE = "export_writes_dataset"  # a name no other test imports (sys.modules keeps it)
DATASET_SOURCE = """
import torch
from torch.utils.data import TensorDataset


def make(split):
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    return TensorDataset(torch.rand(256, 1, 28, 28, generator=generator),
                         torch.randint(0, 10, (256,), generator=generator))
"""


def error_line(capsys, argv: list[str]) -> str:
    """The command's one stderr line (exit status 2, no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("admmcompress: error: "), err
    return err[0].removeprefix("admmcompress: error: ")


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    """A tiny run on `{import: "export_writes_dataset:make"}` (its module importable while the tests run)."""
    tmp = tmp_path_factory.mktemp("imported_run")
    (tmp / f"{DATASET_MODULE}.py").write_text(textwrap.dedent(DATASET_SOURCE))
    spec = {
        "name": "imported", "seed": 1, "threads": 1, "model": {"name": "lenet300100"},
        "data": {"dataset": {"import": f"{DATASET_MODULE}:make"}, "batch_size": 64, "train_limit": 256,
                 "test_limit": 200},
        "pretrain": {"epochs": 1},
        "stages": [{"plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]},
                    "admm": {"epochs": 1, "rho": 1.0e-2}, "retrain": {"epochs": 1}}],
    }
    config = tmp / "imported.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp))
        assert main(["run", str(config), "--out", str(tmp / "run"), "--no-progress"]) == 0
        yield tmp / "run"


# --- bug: every export of a run on an imported dataset crashed (load_dataset given the import mapping) -------


def test_example_input_reads_an_imported_dataset_as_the_run_did(imported_run):
    config = run_export.read_run_config(imported_run)
    x = run_export.example_input(config, 8)
    expected = sys.modules[DATASET_MODULE].make("test").tensors[0][:8]
    assert torch.equal(x, expected)


@pytest.mark.parametrize(("flag", "name", "said"), [
    ("--packed", "m.admmpk", "outputs identical (eval mode)"),
    ("--onnx", "m.onnx", "max |onnxruntime - torch| on 8 test inputs"),
    ("--compact", "c", "compacted: "),
])
def test_a_run_on_an_imported_dataset_exports(imported_run, tmp_path, capsys, flag, name, said):
    if flag == "--onnx":
        pytest.importorskip("onnxruntime")
    assert main(["export", flag, str(imported_run), "--out", str(tmp_path / name)]) == 0
    assert said in capsys.readouterr().out


def test_hardware_analyses_a_run_on_an_imported_dataset(imported_run, capsys):
    """The hardware command reads the run's own test split by import path too (it refused such runs before)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(imported_run.parent))
        assert main(["hardware", str(imported_run), "--no-save", "--samples", "40", "--variation", "0.05",
                     "--draws", "1", "--pim-bits", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| fc1 |" in printed and "| - | 0.05 | 0 | 0 |" in printed


# --- --out checked before the run is read ------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "name"), [("--packed", "x.admmpk"), ("--onnx", "x.onnx"), ("--compact", "c")])
def test_an_out_under_a_file_is_one_line_before_any_work(tiny_finished_run, tmp_path, capsys, no_run_read, flag,
                                                          name):
    blocker = tmp_path / "afile"
    blocker.write_bytes(b"the user's file")
    out = blocker / "sub" / name
    err = error_line(capsys, ["export", flag, str(tiny_finished_run), "--out", str(out)])
    assert err == f"--out '{out}' cannot be written: '{blocker}' is a file, not a folder; choose another --out"
    assert blocker.read_bytes() == b"the user's file"


@pytest.mark.parametrize(("flag", "name"), [("--packed", "x.admmpk"), ("--onnx", "x.onnx"), ("--compact", "c")])
def test_an_out_in_a_read_only_folder_is_one_line_before_any_work(tiny_finished_run, tmp_path, capsys, no_run_read,
                                                                   monkeypatch, flag, name):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(run_export.os, "access", lambda p, mode: Path(p) != readonly and real_access(p, mode))
    out = readonly / "new" / name
    err = error_line(capsys, ["export", flag, str(tiny_finished_run), "--out", str(out)])
    assert err == (f"--out '{out}' cannot be written: '{readonly}' is read-only for this user; make it writable or "
                   "choose another --out")


def test_missing_folders_of_an_onnx_out_are_created(tiny_finished_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "newdir" / "sub" / "x.onnx"
    assert main(["export", "--onnx", str(tiny_finished_run), "--out", str(out)]) == 0
    assert out.is_file() and "max |onnxruntime - torch|" in capsys.readouterr().out


# --- ONNX written atomically -------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "fix"), [
    (errno.ENOSPC, "free some space (or write elsewhere) and retry"),
    (errno.EROFS, "make the folder writable (or write elsewhere) and retry"),
])
def test_a_failing_onnx_write_is_one_line_leaves_nothing_and_the_retry_works(tiny_finished_run, tmp_path, capsys,
                                                                             monkeypatch, code, fix):
    pytest.importorskip("onnxruntime")
    real_write_bytes = Path.write_bytes

    def failing(self: Path, data: bytes) -> int:
        if not TMP_PATTERN.match(self.name):
            return real_write_bytes(self, data)
        real_write_bytes(self, data[: len(data) // 2])  # a full disk: half of it, then the error
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", failing)
    out = tmp_path / "x.onnx"
    argv = ["export", "--onnx", str(tiny_finished_run), "--out", str(out)]
    err = error_line(capsys, argv)
    assert err == f"cannot write '{out}': {os.strerror(code)}; {fix}"
    assert list(tmp_path.iterdir()) == []  # neither a truncated x.onnx nor a temporary file
    monkeypatch.undo()
    assert main(argv) == 0 and out.is_file()


def test_export_onnx_under_a_file_fails_before_the_export(tmp_path, monkeypatch):
    from admmcompress.executors import onnx_export

    def refuse(*_args, **_kwargs):
        raise AssertionError("exported before the path was checked")

    monkeypatch.setattr(onnx_export.torch.onnx, "export", refuse)
    blocker = tmp_path / "afile"
    blocker.write_bytes(b"x")
    path = blocker / "x.onnx"
    message = f"cannot write '{path}': '{blocker}' is a file, not a folder; choose another path"
    with pytest.raises(WriteError, match=re.escape(message)):
        onnx_export.export_onnx(nn.Linear(3, 2), (torch.zeros(2, 3),), path)
    assert blocker.read_bytes() == b"x"


# --- the compacted folder -----------------------------------------------------------------------------------


def test_the_compact_save_under_a_file_is_one_write_error(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_bytes(b"x")
    folder = blocker / "c"
    with pytest.raises(WriteError, match=re.escape(
            f"cannot create folder '{folder}': '{blocker}' is a file, not a folder; choose another path")):
        get_executor("compact").save(nn.Sequential(nn.Linear(3, 2)), folder)
    assert blocker.read_bytes() == b"x"


def test_a_read_only_file_system_at_export_compact_is_one_line(tiny_finished_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "c"
    real_mkdir = Path.mkdir

    def read_only(self: Path, *args, **kwargs) -> None:
        if self == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)  # as root, os.access cannot show a read-only folder
    err = error_line(capsys, ["export", "--compact", str(tiny_finished_run), "--out", str(out)])
    assert err == (f"cannot create folder '{out}': {os.strerror(errno.EROFS)}; make the folder writable (or write "
                   "elsewhere) and retry")
    assert not out.exists()


# --- a run's binary config.yaml -----------------------------------------------------------------------------


def test_a_binary_run_config_is_reported_when_the_run_is_opened(tiny_finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_finished_run, run)
    (run / "config.yaml").write_bytes(b"\xff\xfe\x00\x81garbage\x9c")
    assert run_export.config_plugins(run) is None
    out = tmp_path / "m.admmpk"
    err = error_line(capsys, ["export", "--packed", str(run), "--out", str(out)])
    assert f"'{run / 'config.yaml'}'" in err
    assert not out.exists()


def test_example_input_of_a_bundled_dataset_is_unchanged():
    from admmcompress.data.datasets import load_dataset

    config = RunConfig.from_dict({"model": {"name": "lenet300100"}, "data": {"dataset": "mnist"}, "pretrain": {}})
    assert torch.equal(run_export.example_input(config, 4), load_dataset("mnist", "test", limit=4).x[:4])
