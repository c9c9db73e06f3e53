"""The command locks under the conditions a review found them wanting: a full disk while a lock file is written, a
lock file that cannot be opened, a killed run's lock file (``run --resume``'s marker), an export writing into the
run folder during a report, and a killed export's lock file in a folder ``--compact`` wants empty."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from admmcompress.atomic import WriteError
from admmcompress.cli import main
from admmcompress.command_locks import hold_target
from admmcompress.train.lock import LOCK_FILE, RunLock

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


@pytest.fixture
def run(tiny_finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_finished_run, copy)
    return copy


def disk_full_for_lock_files(monkeypatch) -> None:
    """``os.write`` fails with ENOSPC on this library's lock files only (everything else writes as usual)."""
    real = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".admmcompress.lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def lock_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".admmcompress.lock"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell lock files by name")
def test_a_full_disk_while_locking_is_one_line_and_leaves_no_lock_file(run, tiny_finished_run, tmp_path,
                                                                       monkeypatch, capsys):
    disk_full_for_lock_files(monkeypatch)
    with pytest.raises(WriteError, match=r"cannot write the lock file '.*' \(No space left on device\); free some "
                                         r"space there, or choose another --out"):
        RunLock(tmp_path / "new").acquire()
    assert lock_files(tmp_path / "new") == []
    assert main(["report", str(run)]) == 0  # the report goes on unlocked, as in a folder it cannot lock
    assert lock_files(run) == []
    out = tmp_path / "exp" / "m.bin"
    assert main(["export", "--packed", str(tiny_finished_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.bin"]
    assert "Traceback" not in capsys.readouterr().err


def test_a_report_keeps_a_killed_runs_lock_file_which_resume_reads(run, capsys):
    (run / LOCK_FILE).write_text("999999\n")  # a killed run's: the OS dropped its flock
    assert main(["report", str(run)]) == 0
    assert (run / LOCK_FILE).exists()
    RunLock(run).acquire().release()  # it blocks nothing


def test_a_lock_file_that_cannot_be_opened_does_not_stop_a_report(run, capsys):
    (run / LOCK_FILE).mkdir()  # e.g. another user's stale file; a folder stands in for it here (root opens any file)
    assert main(["report", str(run)]) == 0
    assert "# admmcompress" in capsys.readouterr().out
    assert (run / "report.md").is_file()


def test_a_report_leaves_the_temporary_file_of_an_export_into_the_run_folder(run, capsys):
    exporting = run / ".model.onnx.abcd1234.tmp"
    killed_report = run / ".report.md.abcd1234.tmp"
    with hold_target(run / "model.onnx", "wait"):  # a live export writing into the run folder
        exporting.write_bytes(b"half")
        killed_report.write_text("half")
        assert main(["report", str(run)]) == 0
        assert exporting.exists() and not killed_report.exists()


def test_compact_into_a_folder_a_killed_export_left_its_files_in(tiny_finished_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / ".m.onnx.abcd1234.tmp").write_bytes(b"half")
    (out / ".m.onnx.admmcompress.lock").write_text("999999\n")  # its holder is gone
    assert main(["export", "--compact", str(tiny_finished_run), "--out", str(out)]) == 0
    assert lock_files(out) == [] and not (out / ".m.onnx.abcd1234.tmp").exists()


def test_compact_into_a_folder_a_live_export_writes_in_cleans_nothing(tiny_finished_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    writing = out / ".m.onnx.abcd1234.tmp"
    with hold_target(out / "m.onnx", "wait"):
        writing.write_bytes(b"half")
        assert main(["export", "--compact", str(tiny_finished_run), "--out", str(out)]) == 2
        assert writing.exists()
    assert "is a folder with files in it" in capsys.readouterr().err
