"""Review 41: what a Ctrl-C prints continues the run as it was started; a killed export or report leaves nothing
that blocks or litters the next one; the library's warnings print as one line.

A kill is simulated by a child process that sends itself SIGKILL at the N-th ``os.replace`` onto a given name
(no ``finally`` runs, as with ``kill -9``); the command run again in this process must work and clean up.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from admmcompress import cli
from admmcompress.atomic import TMP_PATTERN, WriteError, clean_orphans
from admmcompress.cli import main
from admmcompress.executors import get_executor
from admmcompress.executors.manifest import load_compacted
from admmcompress.run_export import clean_export_leftovers
from admmcompress.train.lock import RunLock

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

# The child: SIGKILL itself just before (or after) the N-th os.replace whose target is named NAME.
KILLER = textwrap.dedent("""
    import os, signal, sys
    name, n, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) != name:
            return real(src, dst, *args, **kwargs)
        seen[0] += 1
        if seen[0] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(src, dst, *args, **kwargs)
        if seen[0] == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    os.replace = replace
    from admmcompress.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def killed(name: str, n: int, argv: list[str], when: str = "before") -> None:
    """Run ``admmcompress *argv`` in a child killed (SIGKILL) at the n-th os.replace onto ``name``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLER, name, str(n), when, *argv], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if TMP_PATTERN.match(p.name))


# --- 1. the command a Ctrl-C prints repeats the run's overrides -------------------------------------------------


def _tiny_config(folder: Path) -> Path:
    path = folder / "tiny run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 0, "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 256, "test_limit": 64},
        "pretrain": {"epochs": 2},
    }, sort_keys=False))
    return path


def test_the_printed_continue_command_resumes_the_run_as_printed(tmp_path, monkeypatch, capsys):
    """`run C --out S --seed 5 --threads 2`, Ctrl-C after a checkpoint: the printed command keeps --seed and
    --threads, resumes without refusal or thread warning, and ends on the uninterrupted run's weights."""
    config, out = _tiny_config(tmp_path), tmp_path / "S5"
    overrides = ["--seed", "5", "--threads", "2", "--no-progress"]
    threads = torch.get_num_threads()
    real_replace = os.replace

    def ctrl_c_after_the_first_checkpoint(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if Path(dst).name == "checkpoint.pt":
            raise KeyboardInterrupt

    try:
        monkeypatch.setattr(os, "replace", ctrl_c_after_the_first_checkpoint)
        assert main(["run", str(config), "--out", str(out), *overrides]) == 130
        monkeypatch.undo()
        err = capsys.readouterr().err.strip().splitlines()[-1]
        head = "admmcompress: interrupted; continue from the last checkpoint: "
        assert err.startswith(head)
        printed = shlex.split(err.removeprefix(head))
        assert printed == ["admmcompress", "run", str(config), "--out", str(out), *overrides, "--resume"]

        # what it printed before: without the overrides, the resume is refused
        torch.set_num_threads(threads)  # as a new process would start
        assert main(["run", str(config), "--out", str(out), "--resume"]) == 2
        assert "seed" in capsys.readouterr().err

        torch.set_num_threads(threads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(printed[1:]) == 0
        assert not [w for w in caught if "threads" in str(w.message)]  # --threads 2 again: a bit-identical resume
        rerun = capsys.readouterr().out.strip().splitlines()[-1]
        assert rerun.endswith(f"--out {shlex.quote(f'{out}-again')} --seed 5 --threads 2 --no-progress)")

        torch.set_num_threads(threads)
        assert main(["run", str(config), "--out", str(tmp_path / "whole"), *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed, whole = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_the_continue_command_keeps_allow_config_change_and_drops_overwrite(tmp_path, monkeypatch, capsys):
    def interrupted(args, config, out, stale, ctx):
        (out / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_locked", interrupted)
    config, out = _tiny_config(tmp_path), tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--overwrite", "--seed", "3"]) == 130
    assert capsys.readouterr().err.strip().endswith(f"--out {out} --seed 3 --resume")
    argv = ["run", str(config), "--out", str(out), "--resume", "--allow-config-change", "--threads", "1"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().endswith(f"--out {out} --threads 1 --allow-config-change --resume")


# --- 2. a killed export or report: the next one cleans up and works ---------------------------------------------


@pytest.mark.parametrize(("flag", "name", "n", "when"), [
    ("--packed", "packed.bin", 1, "before"),
    ("--onnx", "m.onnx", 1, "before"),
    ("--compact", "model.safetensors", 1, "before"),  # the weights, in the private folder
    ("--compact", "manifest.json", 1, "before"),  # weights written, manifest not yet
    ("--compact", "cmp", 1, "before"),  # both written, the folder not yet renamed into place
])
def test_an_export_killed_mid_write_leaves_nothing_in_the_way(tiny_finished_run, tmp_path, capsys, flag, name, n,
                                                             when):
    if flag == "--onnx":
        pytest.importorskip("onnx")
    exp = tmp_path / "exp"
    out = exp / ("cmp" if flag == "--compact" else name)
    argv = ["export", flag, str(tiny_finished_run), "--out", str(out)]
    killed(name, n, argv, when)
    assert leftovers(exp)  # the kill left its temporary file (or private folder) behind
    assert (exp / f".{out.name}.admmcompress.lock").is_file()  # and its lock file, which the OS unlocked
    assert not out.exists()  # never a half-written --out: no file, no folder with weights but no manifest
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"admmcompress: removed 1 unfinished temporary file(s) of a killed write to '{out}'\n" in err
    assert leftovers(exp) == []
    assert sorted(p.name for p in exp.iterdir()) == [out.name]
    if flag == "--compact":
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]
        load_compacted(out)


def test_a_report_killed_mid_write_is_cleaned_by_the_next_report(tiny_finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_finished_run, run)
    killed("metrics.json", 1, ["report", str(run)])
    assert [n for n in leftovers(run) if n.startswith(".metrics.json.")]
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"admmcompress: removed 1 unfinished temporary file(s) of a killed write to '{run}'\n" in err
    assert leftovers(run) == []
    # the report held the folder's lock and let it go; the killed report's lock file stays (a killed run's is
    # run --resume's marker of a run started there, and the two cannot be told apart), emptied and unlocked
    assert (run / ".admmcompress.lock").read_text() == ""
    RunLock(run).acquire().release()


def test_export_cleans_only_its_own_temporary_names(tmp_path):
    """Other names' temporary files may be another export's, writing now; a user's files are never touched."""
    exp = tmp_path / "exp"
    exp.mkdir()
    own, other = exp / ".m.bin.abcd1234.tmp", exp / ".n.bin.abcd1234.tmp"
    users = [exp / "m.bin.tmp", exp / ".m.bin.tmp", exp / ".m.bin.ABCD1234.tmp", exp / "notes.txt"]
    for path in (own, other, *users):
        path.write_bytes(b"x")
    private = exp / ".cmp.abcd1234.tmp"  # a compact folder's, killed while written whole
    private.mkdir()
    (private / "model.safetensors").write_bytes(b"x")
    assert clean_export_leftovers(exp / "m.bin") == [own]
    assert clean_export_leftovers(exp / "cmp") == [private]
    assert sorted(p.name for p in exp.iterdir()) == sorted(p.name for p in (other, *users))
    # a --compact folder holding only temporary files is emptied (so accepted); one with a user's file is not
    cmp = exp / "cmp"
    cmp.mkdir()
    (cmp / ".manifest.json.abcd1234.tmp").write_bytes(b"x")
    assert clean_export_leftovers(cmp) == [cmp / ".manifest.json.abcd1234.tmp"] and list(cmp.iterdir()) == []
    (cmp / ".manifest.json.abcd1234.tmp").write_bytes(b"x")
    (cmp / "model.safetensors").write_bytes(b"x")
    assert clean_export_leftovers(cmp) == [] and len(list(cmp.iterdir())) == 2


def test_clean_orphans_targets_only_the_named_writes(tmp_path):
    for name in (".a.md.abcd1234.tmp", ".a.png.abcd1234.tmp", ".b.md.abcd1234.tmp"):
        (tmp_path / name).write_bytes(b"x")
    removed = clean_orphans(tmp_path, targets=["a.md", "a.png"])
    assert sorted(p.name for p in removed) == [".a.md.abcd1234.tmp", ".a.png.abcd1234.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == [".b.md.abcd1234.tmp"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_failing_compact_save_leaves_no_folder(tmp_path, monkeypatch, n):
    """A write error at any of the three renames: a WriteError, and neither the folder nor a temporary file."""
    real, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        seen[0] += 1
        if seen[0] == n:
            raise OSError(28, os.strerror(28))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    folder = tmp_path / "c"
    named = [folder / "model.safetensors", folder / "manifest.json", folder][n - 1]
    with pytest.raises(WriteError, match=re.escape(f"cannot write '{named}': No space left on device; free some")):
        get_executor("compact").save(nn.Sequential(nn.Linear(3, 2)), folder)
    assert list(tmp_path.iterdir()) == []


def test_the_compact_save_over_an_earlier_one_and_into_an_empty_folder(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    executor = get_executor("compact")
    executor.save(nn.Sequential(nn.Linear(3, 2)), folder)  # an empty folder is replaced whole
    executor.save(nn.Sequential(nn.Linear(3, 4)), folder)  # over an earlier save: file by file
    assert load_compacted(folder, nn.Sequential(nn.Linear(3, 9)))[0].out_features == 4
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c", "manifest.json", "model.safetensors"]


# --- 3. the library's warnings print as one line ----------------------------------------------------------------


def test_the_librarys_warnings_are_one_line_and_others_keep_pythons_format():
    import admmcompress.train.runner as runner

    line = cli._format_warning("resuming with 1 threads", RuntimeWarning, runner.__file__, 697)
    assert line == "admmcompress: warning: resuming with 1 threads\n"
    assert cli._format_warning("x", UserWarning, torch.__file__, 3) == warnings.formatwarning(
        "x", UserWarning, torch.__file__, 3)


def test_a_run_prints_a_library_warning_as_one_line(tmp_path):
    """A cadence that never comes in its phase is warned about at the run's start (here a --dry-run's)."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "lenet300100"}, "data": {"dataset": "mnist", "train_limit": 128, "test_limit": 64},
        "pretrain": {"epochs": 0},
        "stages": [{"plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]},
                    "admm": {"epochs": 1, "update_every_steps": 1000}, "retrain": {"epochs": 1}}],
    }, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "admmcompress.cli", "run", str(config), "--dry-run"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "never comes" in line]
    assert len(lines) == 1 and lines[0].startswith("admmcompress: warning: stages[0]: admm: one update every 1000")
    assert "warnings.warn(" not in done.stderr and "runner.py" not in done.stderr
