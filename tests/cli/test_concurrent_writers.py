"""Two commands writing the same files at once: the second never cleans away the first's temporary files.

`report` and `hardware` hold the run folder's lock while they clean and write it; `export` and `report --compare`
hold a lock beside the file they write. A second command is refused with one line naming the first's pid (a run
holds its folder for hours: nothing waits). "At once" is simulated in one process: the second command runs
inside the first, while the first's temporary file exists (just before its rename into place); flock locks
belong to open files, so the second one sees the first's lock as another process's would.
Also: `hardware` and `report --compare` remove what a killed earlier invocation left of their own files (and
nothing else), and every command says so in the same words.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from admmcompress import run_hardware
from admmcompress.atomic import TMP_PATTERN
from admmcompress.cli import main
from admmcompress.report.compare import default_plot_targets
from admmcompress.train.lock import RunLock

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

HARDWARE = ["--samples", "16", "--pim-bits", "2"]  # the quickest analysis: the files it writes are what matters


@pytest.fixture
def run(tiny_finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_finished_run, copy)
    return copy


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_PATTERN.match(p.name))


def during_rename_onto(monkeypatch, name: str, second: Callable[[], None]) -> list[list[str]]:
    """Call ``second()`` once, just before the first ``os.replace`` onto a file called ``name``; return the
    temporary files (in that folder) seen before and after it, to show the first command's survived."""
    real, seen = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if not seen and Path(dst).name == name:
            folder = Path(dst).parent
            seen.append(temporary_files(folder))
            second()
            seen.append(temporary_files(folder))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return seen


def refused(capsys, argv: list[str]) -> str:
    """The one stderr line of a command refused (exit status 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("admmcompress: error: "), err
    return err[0].removeprefix("admmcompress: error: ")


# --- report: holds the run folder's lock while it cleans and writes ----------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--rehash"]])
def test_a_second_report_while_one_writes_is_refused_and_cleans_nothing(run, monkeypatch, capsys, flags):
    messages = []
    seen = during_rename_onto(monkeypatch, "metrics.json",
                              lambda: messages.append(refused(capsys, ["report", str(run), *flags])))
    assert main(["report", str(run), *flags]) == 0  # the first report: its temporary file was not removed
    assert seen[0] == seen[1] and [n for n in seen[0] if n.startswith(".metrics.json.")]
    assert messages == [f"'{run}' is being written by another admmcompress command (pid {os.getpid()}); report "
                        "rewrites its metrics.json and report.md, so run it once it has ended"]
    assert temporary_files(run) == [] and not (run / ".admmcompress.lock").exists()


def test_a_report_while_another_command_holds_the_folder_leaves_its_files_alone(run, capsys):
    writing = run / ".report.md.abcd1234.tmp"  # the holder's write in progress
    with RunLock(run):
        writing.write_text("half")
        message = refused(capsys, ["report", str(run)])
        assert writing.read_text() == "half"
    assert f"is being written by another admmcompress command (pid {os.getpid()})" in message
    assert main(["report", str(run)]) == 0  # released: the report runs, and removes what no one writes now
    assert f"removed 1 unfinished temporary file(s) of a killed write to '{run}'" in capsys.readouterr().err
    assert not writing.exists()


def test_a_report_of_a_read_only_folder_is_printed_without_the_lock(run, monkeypatch, capsys):
    from admmcompress import command_locks

    real_access = os.access
    monkeypatch.setattr(command_locks.os, "access", lambda p, mode: Path(p) != run and real_access(p, mode))
    monkeypatch.setattr(command_locks, "RunLock", lambda *a, **k: pytest.fail("locked a folder it cannot write"))
    assert main(["report", str(run)]) == 0
    assert "# admmcompress: tiny" in capsys.readouterr().out


# --- export: holds a lock beside --out ----------------------------------------------------------------------------


def test_a_second_export_to_the_same_out_is_refused_and_the_first_one_finishes(tiny_finished_run, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "exp" / "m.bin"
    argv = ["export", "--packed", str(tiny_finished_run), "--out", str(out)]
    codes = []
    seen = during_rename_onto(monkeypatch, "m.bin", lambda: codes.append(main(argv)))
    assert main(argv) == 0
    assert codes == [2] and seen[0] == seen[1] and len(seen[0]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert f"admmcompress: error: '{out}' is being written by another admmcompress command (pid {os.getpid()}); " \
           "wait for it to end, or choose another --out" in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.bin"]  # no temporary or lock file left


def test_exports_to_other_names_in_one_folder_run_at_once(tiny_finished_run, tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    other = ["export", "--packed", str(tiny_finished_run), "--out", str(exp / "n.bin")]
    codes = []
    seen = during_rename_onto(monkeypatch, "m.bin", lambda: codes.append(main(other)))
    assert main(["export", "--packed", str(tiny_finished_run), "--out", str(exp / "m.bin")]) == 0
    assert codes == [0] and seen[0] == seen[1]
    assert sorted(p.name for p in exp.iterdir()) == ["m.bin", "n.bin"]


def test_a_lock_file_a_killed_export_left_blocks_nothing(tiny_finished_run, tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / ".m.bin.admmcompress.lock").write_text("999999\n")  # its holder is gone: the OS dropped its flock
    assert main(["export", "--packed", str(tiny_finished_run), "--out", str(exp / "m.bin")]) == 0
    assert sorted(p.name for p in exp.iterdir()) == ["m.bin"]


def test_a_failed_export_leaves_no_folder_it_made_for_its_lock(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "m.bin"
    assert main(["export", "--packed", str(tmp_path), "--out", str(out)]) == 2  # not a run folder
    assert "has no model.safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- hardware: cleans its own leftovers, holding the run folder's lock ----------------------------------------------


def test_hardware_removes_what_a_killed_hardware_left_and_nothing_else(run, capsys):
    own = [run / ".hardware.md.abcd1234.tmp", run / ".hardware.png.abcd1234.tmp"]
    others = [run / ".metrics.json.abcd1234.tmp", run / ".hardware.md.tmp", run / "hardware.md.abcd1234.tmp"]
    for path in (*own, *others):
        path.write_bytes(b"x")
    assert main(["hardware", str(run), *HARDWARE]) == 0
    err = capsys.readouterr().err
    assert f"admmcompress: removed 2 unfinished temporary file(s) of a killed write to '{run}'\n" in err
    assert not any(p.exists() for p in own) and all(p.exists() for p in others)
    assert (run / "hardware.md").is_file() and (run / "hardware.png").is_file()
    assert not (run / ".admmcompress.lock").exists()


def test_hardware_no_save_writes_and_cleans_nothing(run):
    left = run / ".hardware.md.abcd1234.tmp"
    left.write_bytes(b"x")
    assert main(["hardware", str(run), *HARDWARE, "--no-save"]) == 0
    assert left.exists() and not (run / "hardware.md").exists()


def test_hardware_on_a_folder_another_command_holds_is_refused_before_the_analysis(run, monkeypatch, capsys):
    monkeypatch.setattr(run_hardware, "analyze", lambda *a, **k: pytest.fail("analysed a folder it cannot save to"))
    with RunLock(run):
        message = refused(capsys, ["hardware", str(run), *HARDWARE])
    assert message == (f"'{run}' is being written by another admmcompress command (pid {os.getpid()}); hardware writes "
                       "hardware.md/.png there, so run it once it has ended, or pass --no-save")


def test_hardware_whose_folder_is_taken_during_the_analysis_prints_it_and_writes_nothing(run, monkeypatch, capsys):
    real, held = run_hardware.analyze, []

    def analyze_while_a_report_takes_the_folder(*args, **kwargs):
        held.append(RunLock(run).acquire())
        (run / ".hardware.md.abcd1234.tmp").write_bytes(b"x")  # what the taker writes: not to be cleaned
        return real(*args, **kwargs)

    monkeypatch.setattr(run_hardware, "analyze", analyze_while_a_report_takes_the_folder)
    try:
        assert main(["hardware", str(run), *HARDWARE]) == 0
    finally:
        held[0].release()
    out, err = capsys.readouterr()
    assert "| fc1 |" in out and "written:" not in out
    assert f"note: another admmcompress command (pid {os.getpid()}) took '{run}' during the analysis, so " \
           "hardware.md/.png were not saved; printed only" in err
    assert not (run / "hardware.md").exists() and (run / ".hardware.md.abcd1234.tmp").exists()


# --- report --compare: cleans its own leftovers, holding a lock beside its files ------------------------------------


def test_compare_without_out_removes_what_a_killed_one_left_of_its_plot(run, tiny_finished_run, tmp_path,
                                                                        monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    own = [".compare.png.abcd1234.tmp", ".compare-2.png.abcd1234.tmp"]
    others = [".compare-x.png.abcd1234.tmp", ".compare.md.abcd1234.tmp", ".other.png.abcd1234.tmp", "compare.tmp"]
    for name in (*own, *others):
        (here / name).write_bytes(b"x")
    assert default_plot_targets(here) == ["compare-2.png", "compare.png"]
    assert main(["report", "--compare", str(tiny_finished_run), str(run)]) == 0
    err = capsys.readouterr().err
    assert "admmcompress: removed 2 unfinished temporary file(s) of a killed write to 'compare.png'\n" in err
    assert sorted(p.name for p in here.iterdir()) == sorted(["compare.png", *others])


def test_compare_with_out_says_what_it_removed(run, tiny_finished_run, tmp_path, capsys):
    table = tmp_path / "t.md"
    for name in (".t.md.abcd1234.tmp", ".t.png.abcd1234.tmp"):
        (tmp_path / name).write_bytes(b"x")
    assert main(["report", "--compare", str(tiny_finished_run), str(run), "--out", str(table)]) == 0
    assert f"removed 2 unfinished temporary file(s) of a killed write to '{table}'" in capsys.readouterr().err
    assert temporary_files(tmp_path) == [] and not list(tmp_path.glob("*.lock"))


def test_a_second_compare_while_one_writes_is_refused(run, tiny_finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["report", "--compare", str(tiny_finished_run), str(run)]
    messages = []
    seen = during_rename_onto(monkeypatch, "compare.png", lambda: messages.append(refused(capsys, argv)))
    assert main(argv) == 0
    assert seen[0] == seen[1] and len(seen[0]) == 1
    assert messages == [f"'compare.png' is being written by another admmcompress command (pid {os.getpid()}); wait "
                        "for it to end, or give --out NEW.md"]
    assert (tmp_path / "compare.png").is_file() and not (tmp_path / "compare-2.png").exists()

