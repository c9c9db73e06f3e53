"""The --out folder of `admmcompress run`: its lock, overwrite refusal, config diffs on resume, restarts, flags, NaN."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from admmcompress.atomic import TMP_PATTERN, clean_orphans
from admmcompress.cli import main
from admmcompress.train.lock import LOCK_FILE, RunLock, holder_pid
from admmcompress.train.loop import TrainingDiverged
from admmcompress.train.run_folder import config_diff, unsafe_changes
from admmcompress.train.runner import STATE_FILE, Phase, read_progress, run_phases

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

PLAN = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]}


def spec(**overrides) -> dict:
    base = {
        "name": "folder",
        "seed": 1,
        "threads": 1,
        "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 256, "test_limit": 100},
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
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("admmcompress: error: ")]
    assert len(errors) == 1, err
    return errors[0][len("admmcompress: error: ") :]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (config, out folder); tests copy what they change."""
    tmp = tmp_path_factory.mktemp("finished")
    config = write(tmp / "run.yaml", spec())
    out = tmp / "out"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    return config, out


# --- the lock -------------------------------------------------------------------------------------------
def test_a_held_lock_refuses_a_second_run_naming_the_pid(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", spec())
    out = tmp_path / "out"
    with RunLock(out):
        assert holder_pid(out) == os.getpid()
        message = error_line(capsys, ["run", str(config), "--out", str(out), "--no-progress"])
    assert f"pid {os.getpid()}" in message and "another --out" in message
    assert list(out.iterdir()) == []  # the refused run wrote nothing; the lock file went with the lock


def test_a_lock_held_by_another_process_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from admmcompress.train.lock import RunLock; RunLock({str(out)!r}).acquire(); "
                               "print('locked', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = write(tmp_path / "run.yaml", spec())
        message = error_line(capsys, ["run", str(config), "--out", str(out)])
        assert f"pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    # killed: the OS dropped its lock; the stale file (with its dead pid) is taken over
    assert holder_pid(out) == holder.pid
    with RunLock(out) as lock:
        assert lock.held and holder_pid(out) == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_without_os_locking_the_run_goes_on_after_a_warning(tmp_path, capsys, monkeypatch):
    import admmcompress.train.lock as lock_module

    monkeypatch.setattr(lock_module, "fcntl", None)
    with RunLock(tmp_path / "out") as lock:
        assert not lock.held
    assert "admmcompress: warning: no OS file locking" in capsys.readouterr().err


def test_lock_on_a_file_is_one_line(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", spec())
    (tmp_path / "file").write_text("x")
    message = error_line(capsys, ["run", str(config), "--out", str(tmp_path / "file")])
    assert "file" in message and "--out" in message


# --- overwrite refusal -------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["model.safetensors", "metrics.json", "config.yaml", "report.md"])
def test_a_folder_with_run_outputs_is_refused_without_resume_or_overwrite(tmp_path, capsys, output):
    out = tmp_path / "out"
    out.mkdir()
    (out / output).write_bytes(b"precious")
    config = write(tmp_path / "run.yaml", spec())
    message = error_line(capsys, ["run", str(config), "--out", str(out)])
    if output == "report.md":  # a name anyone may use: not called a run, but still never written over
        assert message.endswith(f"'{out}' holds report.md, which a run writes: move them, choose another --out, or "
                                "add --overwrite to replace them")
    else:
        assert "already holds a run" in message and "--overwrite" in message and output in message
    assert (out / output).read_bytes() == b"precious"


def test_resume_of_a_finished_run_without_its_checkpoint_is_refused(finished, tmp_path, capsys):
    config, done = finished
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.yaml", "model.safetensors", "metrics.json"):
        (out / name).write_bytes((done / name).read_bytes())
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume"])
    assert "finished run" in message and "--overwrite" in message
    assert (out / "model.safetensors").read_bytes() == (done / "model.safetensors").read_bytes()


def test_overwrite_replaces_the_old_run_and_only_its_outputs(finished, tmp_path):
    config, done = finished
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.yaml", "model.safetensors", "metrics.json", STATE_FILE):
        (out / name).write_bytes((done / name).read_bytes())
    (out / "notes.txt").write_text("mine")
    dense = write(tmp_path / "dense.yaml", spec(stages=[]))
    assert main(["run", str(dense), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert yaml.safe_load((out / "config.yaml").read_text())["stages"] == []
    assert read_progress(out) == (1, 0)  # the new run's checkpoint: pretrain done, nothing more


def test_overwrite_keeps_the_users_files_inside_the_runs_subfolders(tmp_path):
    """--overwrite removes what a run wrote in compact/, stages/ and tensorboard/ (and temporary files of cut-short
    writes), not a file the user put there; a subfolder left empty goes too."""
    from admmcompress.train.config import RunConfig
    from admmcompress.train.run_folder import FolderPlan, commit

    out = tmp_path / "out"
    written = ["compact/manifest.json", "compact/model.safetensors", "stages/stage1.safetensors",
               "stages/stage1_masks.safetensors", "stages/.stage2.safetensors.abcd1234.tmp",
               "tensorboard/events.out.tfevents.1733490000.host.123.0"]
    mine = ["compact/notes.md", "stages/stage1_comparison.csv"]
    for name in written + mine:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    plan = FolderPlan(out, remove=["compact", "stages", "tensorboard"], write_config=False)
    commit(plan, RunConfig.from_dict(spec()))
    assert [name for name in written if (out / name).exists()] == []
    assert all((out / name).read_text() == "x" for name in mine)
    assert not (out / "tensorboard").exists()


def test_overwrite_removes_the_old_runs_plots_and_keeps_the_config_it_reads(finished, tmp_path, capsys):
    config, done = finished
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.yaml", "metrics.json", "rates.png", "hardware.md", "hardware.png"):
        (out / name).write_bytes((done / "config.yaml").read_bytes())  # content does not matter here
    own = out / "config.yaml"
    own.write_text("# my notes\n" + yaml.safe_dump(spec(stages=[])))
    message = error_line(capsys, ["run", str(own), "--out", str(out), "--overwrite"])
    assert "--overwrite would replace" in message and "cp " in message
    assert own.read_text().startswith("# my notes")  # the user's file, untouched
    dense = write(tmp_path / "dense.yaml", spec(stages=[]))
    assert main(["run", str(dense), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert not any((out / name).exists() for name in ("rates.png", "hardware.md", "hardware.png"))


def test_clean_orphans_leaves_other_runs_in_subfolders_alone(tmp_path):
    mine, other = tmp_path / "stages" / "1", tmp_path / "other_run"
    mine.mkdir(parents=True)
    other.mkdir()
    for folder in (tmp_path, mine, other):
        (folder / ".checkpoint.pt.abcd1234.tmp").write_text("")
    removed = clean_orphans(tmp_path, below=("stages", "compact"))
    assert sorted(p.parent for p in removed) == sorted([tmp_path, mine])
    assert (other / ".checkpoint.pt.abcd1234.tmp").exists()  # another run's write in progress, maybe


def test_flags_that_contradict_are_one_line(tmp_path, capsys):
    config = str(write(tmp_path / "run.yaml", spec()))
    out = str(tmp_path / "out")
    assert "give one of them" in error_line(capsys, ["run", config, "--out", out, "--resume", "--overwrite"])
    assert "goes with --resume" in error_line(capsys, ["run", config, "--out", out, "--allow-config-change"])
    assert "--overwrite needs --out" in error_line(capsys, ["run", config, "--overwrite"])
    assert not Path(out).exists()


# --- config diff on resume ----------------------------------------------------------------------------------
def _copy_run(done: Path, out: Path) -> None:
    out.mkdir()
    for name in ("config.yaml", STATE_FILE):
        (out / name).write_bytes((done / name).read_bytes())


def test_resume_with_an_edited_config_is_refused_with_the_changed_keys(finished, tmp_path, capsys):
    _, done = finished
    out = tmp_path / "out"
    _copy_run(done, out)
    saved = (out / "config.yaml").read_bytes()
    edited = spec()
    edited["stages"][0]["plan"] = {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.8}]}
    edited["seed"] = 5
    message = error_line(capsys, ["run", str(write(tmp_path / "e.yaml", edited)), "--out", str(out), "--resume"])
    assert "stages.0.plan.rules.0.sparsity (0.9 -> 0.8)" in message and "seed (1 -> 5)" in message
    assert "--allow-config-change" in message
    message = error_line(
        capsys,
        ["run", str(tmp_path / "e.yaml"), "--out", str(out), "--resume", "--allow-config-change"],
    )
    assert "cannot accept" in message and "sparsity" in message and "seed" in message
    assert (out / "config.yaml").read_bytes() == saved  # never silently overwritten


def test_the_seed_flag_counts_as_a_config_change(finished, tmp_path, capsys):
    config, done = finished
    out = tmp_path / "out"
    _copy_run(done, out)
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", "--seed", "3"])
    assert "seed (1 -> 3)" in message


def test_allow_config_change_accepts_safe_changes_and_records_them(tmp_path, capsys, monkeypatch):
    """Stopped in the ADMM phase (checkpoint (1, 1)): more ADMM and retrain epochs, threads: accepted."""
    from admmcompress.train.runner import Runner

    config = write(tmp_path / "run.yaml", spec())
    out = tmp_path / "out"
    calls = []
    train_one_epoch = Runner._train_one_epoch

    def stop_at_third_epoch(self, phase, steps):
        calls.append(phase.label)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would, after the checkpoint of the second epoch
        return train_one_epoch(self, phase, steps)

    monkeypatch.setattr(Runner, "_train_one_epoch", stop_at_third_epoch)
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 130  # Ctrl-C's exit status
    monkeypatch.setattr(Runner, "_train_one_epoch", train_one_epoch)
    assert read_progress(out) == (1, 1)
    capsys.readouterr()
    edited = spec(threads=2)
    edited["stages"][0]["admm"]["epochs"] = 3
    edited["stages"][0]["retrain"]["epochs"] = 2
    edited_path = write(tmp_path / "e.yaml", edited)
    message = error_line(capsys, ["run", str(edited_path), "--out", str(out), "--resume"])
    assert "stages.0.admm.epochs (2 -> 3)" in message and "threads (1 -> 2)" in message
    edited["pretrain"]["epochs"] = 2
    write(edited_path, edited)
    message = error_line(capsys, ["run", str(edited_path), "--out", str(out), "--resume", "--allow-config-change"])
    assert "pretrain.epochs (1 -> 2: its phase is finished)" in message and "threads" not in message
    edited["pretrain"]["epochs"] = 1
    write(edited_path, edited)
    argv = ["run", str(edited_path), "--out", str(out), "--resume", "--allow-config-change", "--no-progress"]
    assert main(argv) == 0
    assert "config.yaml updated" in capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["threads"] == 2 and saved["stages"][0]["admm"]["epochs"] == 3
    history = yaml.safe_load((out / "metrics.json").read_text())["history"]
    assert [h["phase"] for h in history] == ["pretrain"] + ["stage1/prune"] * 3 + ["stage1/retrain"] * 2


def test_which_changes_are_safe_depends_on_the_progress():
    from admmcompress.train.config import RunConfig

    config = RunConfig.from_dict(spec())
    phases = run_phases(config)
    assert [p.config_key for p in phases] == ["pretrain", "stages.0.admm", "stages.0.retrain"]
    diff = {
        "threads": (1, 2),
        "pretrain.epochs": (1, 2),
        "stages.0.admm.epochs": (2, 4),
        "stages.0.admm.optimizer.lr": (0.001, 0.0005),
        "stages.0.admm.lr_schedule": ("admm_reset", "cosine"),
        "stages.0.options.rho": (0.01, 0.001),
        "stages.0.retrain.optimizer.name": ("adam", "sgd"),
        "stages.0.retrain.distill.alpha": (None, 0.5),
        "model.name": ("lenet300100", "lenet5"),
    }
    # in the ADMM phase, one epoch done
    refused = unsafe_changes(diff, phases, (1, 1))
    assert set(refused) == {"pretrain.epochs", "stages.0.admm.lr_schedule", "stages.0.options.rho",
                            "stages.0.retrain.distill.alpha", "model.name"}
    # the ADMM phase not started yet: its settings and the stage's options may change
    refused = unsafe_changes(diff, phases, (1, 0))
    assert set(refused) == {"pretrain.epochs", "stages.0.retrain.distill.alpha", "model.name"}
    # fewer epochs than the phase in progress has done: refused
    assert "stages.0.admm.epochs" in unsafe_changes({"stages.0.admm.epochs": (4, 1)}, phases, (1, 2))
    # nothing saved yet: everything goes (the run starts again from the beginning)
    assert unsafe_changes(diff, phases, None) == {}
    assert isinstance(phases[0], Phase)


def test_config_diff_names_nested_and_added_keys():
    old = {"a": 1, "s": [{"p": {"x": 1}}], "gone": 2}
    new = {"a": 1, "s": [{"p": {"x": 2}}, {"p": {}}], "new": None}
    diff = config_diff(old, new)
    assert diff == {"gone": (2, "(absent)"), "new": ("(absent)", None), "s.0.p.x": (1, 2), "s.1.p": ("(absent)", {})}


# --- resume before the first checkpoint, orphan temp files ------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(finished, tmp_path, capsys):
    config, done = finished
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_bytes((done / "config.yaml").read_bytes())
    (out / LOCK_FILE).write_text("999999\n")  # the killed run's stale lock file
    orphan = out / ".checkpoint.pt.ab12cd_3.tmp"
    orphan.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp"  # not one of ours: kept
    keep.write_text("mine")
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "starting from the beginning" in err and "temporary file" in err
    assert not orphan.exists() and keep.read_text() == "mine"
    assert not (out / LOCK_FILE).exists()
    for name in ("model.safetensors", "masks.safetensors"):
        got, want = load_file(str(out / name)), load_file(str(done / name))
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_killed_run_with_only_its_lock_file_resumes_from_the_start(tmp_path):
    config = write(tmp_path / "run.yaml", spec(stages=[]))
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("")
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file()


def test_the_lock_makes_the_folder_again_when_a_failed_run_removed_it(tmp_path, monkeypatch):
    """A run that fails before writing removes its empty folder after releasing the lock: another run that
    made the folder just before then finds it gone when it opens the lock file, makes it again and locks."""
    out = tmp_path / "out"
    real_open = os.open
    removed = []

    def open_after_removal(path, flags, *args):
        if not removed:  # the failed run's rmdir lands between this run's mkdir and its open
            out.rmdir()
            removed.append(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_after_removal)
    with RunLock(out) as lock:
        assert lock.held and (out / LOCK_FILE).is_file()
    assert removed


def test_a_failed_run_leaves_a_folder_another_run_took_meanwhile(tmp_path, capsys, monkeypatch):
    """The failed run removes its empty folder only while it is empty: one another run has locked since is left
    alone, without an error of its own on top of the run's."""
    config = str(write(tmp_path / "run.yaml", spec(model={"name": "no-such-model"})))
    out = tmp_path / "out"
    real_rmdir = Path.rmdir

    def other_run_locks_first(self):
        (out / LOCK_FILE).write_text("12345\n")  # the other run's lock file, between the check and the rmdir
        real_rmdir(self)

    monkeypatch.setattr(Path, "rmdir", other_run_locks_first)
    line = error_line(capsys, ["run", config, "--out", str(out)])
    assert "no-such-model" in line
    assert (out / LOCK_FILE).is_file()


def test_resume_of_an_empty_or_missing_folder_is_still_an_error(tmp_path, capsys):
    config = str(write(tmp_path / "run.yaml", spec()))
    assert "--resume: no checkpoint" in error_line(capsys, ["run", config, "--out", str(tmp_path / "new"), "--resume"])
    assert not (tmp_path / "new").exists()


def test_clean_orphans_touches_only_its_own_pattern(tmp_path):
    names = [".model.safetensors.x1y2z3_4.tmp", ".a.b.12345678.tmp", "model.tmp", ".x.tmp", ".x.ABCDEFGH.tmp"]
    for name in names:
        (tmp_path / name).write_text("")
    removed = {p.name for p in clean_orphans(tmp_path)}
    assert removed == {".model.safetensors.x1y2z3_4.tmp", ".a.b.12345678.tmp"}
    assert all(TMP_PATTERN.match(n) for n in removed)
    assert {p.name for p in tmp_path.iterdir()} == set(names) - removed
    holder = tmp_path / ".holder.abcdefgh.tmp"  # a folder of that name with a link inside is not a write's
    holder.mkdir()
    (holder / "link").symlink_to(tmp_path / "model.tmp")
    assert clean_orphans(tmp_path) == [] and holder.is_dir()


def test_a_safetensors_write_killed_midway_leaves_one_folder_that_clean_orphans_removes(tmp_path):
    """safetensors' save_file writes its own temp file (``.tmpXXXXXX``) beside the name it is given; the checkpoint
    writer gives it a name inside a private folder, so a kill leaves that folder, and nothing with a foreign name."""
    from admmcompress.train.checkpoint import save_tensors

    script = ("import sys, torch\nfrom admmcompress.train.checkpoint import save_tensors\n"
              "save_tensors(sys.argv[1], {'w': torch.zeros(60_000_000)})\n")
    target = tmp_path / "run" / "model.safetensors"
    target.parent.mkdir()
    child = subprocess.Popen([sys.executable, "-c", script, str(target)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.name.startswith(".tmp") for p in target.parent.rglob(".tmp*")):
        time.sleep(0.001)  # until safetensors has its own temp file open
    child.kill()
    child.wait()
    left = list(target.parent.iterdir())
    assert len(left) == 1 and TMP_PATTERN.match(left[0].name) and left[0].is_dir(), left
    assert clean_orphans(target.parent) == left and not any(target.parent.iterdir())
    save_tensors(target, {"w": torch.ones(3)})  # an uninterrupted write leaves the file alone
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]
    assert load_file(target)["w"].tolist() == [1.0, 1.0, 1.0]


# --- --seed / --threads -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--seed", "-1"], "--seed -1 must be an integer"),
        (["--threads", "0"], "--threads 0 must be an integer in [1, 1024]"),
        (["--threads", "-1"], "--threads -1 must be an integer in [1, 1024]"),
        (["--seed", str(2**64)], "--seed 18446744073709551616 must be an integer"),
    ],
)
def test_seed_and_threads_flags_are_validated(tmp_path, capsys, flags, expected):
    config = write(tmp_path / "run.yaml", spec())
    message = error_line(capsys, ["run", str(config), "--out", str(tmp_path / "out"), *flags])
    assert message.startswith(expected)
    assert not (tmp_path / "out").exists()


def test_threads_flag_sets_the_thread_count(tmp_path):
    config = write(tmp_path / "run.yaml", spec(stages=[], pretrain={"epochs": 0}))
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--threads", "2", "--no-progress"]) == 0
    assert torch.get_num_threads() == 2


# --- NaN/inf before training, and the NaN-loss advice ---------------------------------------------------------
def test_nan_in_pretrained_weights_is_refused_naming_the_tensor(tmp_path, capsys):
    from admmcompress.models import LeNet300100

    state = {k: v.clone() for k, v in LeNet300100().state_dict().items()}
    state["fc2.weight"][3, 4] = float("nan")
    save_file(state, str(tmp_path / "bad.safetensors"))
    config = spec(pretrained=str(tmp_path / "bad.safetensors"))
    del config["pretrain"]
    path = write(tmp_path / "run.yaml", config)
    for extra in ([], ["--dry-run"]):
        message = error_line(capsys, ["run", str(path), "--out", str(tmp_path / "out"), *extra])
        assert "'fc2.weight'" in message and "NaN/inf" in message and "bad.safetensors" in message
    assert not (tmp_path / "out").exists()


def test_nan_in_the_inputs_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import admmcompress.cli as cli
    from admmcompress.data.datasets import load_dataset

    def poisoned(name, split, data_dir=None, limit=None):
        data = load_dataset(name, split, data_dir, limit)
        if split == "train":
            data.x[7, 0, 3, 3] = float("inf")
        return data

    monkeypatch.setattr(cli, "load_dataset", poisoned)
    message = error_line(capsys, ["run", str(write(tmp_path / "run.yaml", spec())), "--out", str(tmp_path / "o")])
    assert "train inputs" in message and "sample 7" in message and "NaN/inf" in message
    assert not (tmp_path / "o").exists()


def test_nan_loss_advice_points_only_to_a_checkpoint_that_exists(tmp_path, capsys):
    # lr 1e30 diverges in the first epoch, before any checkpoint was written
    path = write(tmp_path / "run.yaml", spec(stages=[], pretrain={"epochs": 1, "optimizer": {"lr": 1.0e30}}))
    out = tmp_path / "out"
    message = error_line(capsys, ["run", str(path), "--out", str(out), "--no-progress"])
    assert "loss became" in message and "no checkpoint was saved yet" in message and "--overwrite" in message
    assert "--resume" not in message
    assert not (out / STATE_FILE).exists()
    # diverging after a checkpoint: the advice names it, and --resume --allow-config-change takes a lower lr
    staged = spec(pretrain={"epochs": 1}, stages=[{"plan": PLAN, "admm": {"epochs": 1, "rho": 1.0e-2,
                                                                         "optimizer": {"lr": 1.0e30}}}])
    path = write(tmp_path / "staged.yaml", staged)
    out = tmp_path / "staged"
    message = error_line(capsys, ["run", str(path), "--out", str(out), "--no-progress"])
    assert f"'{out / STATE_FILE}'" in message and "--resume --allow-config-change" in message
    assert read_progress(out) == (1, 0)
    staged["stages"][0]["admm"]["optimizer"]["lr"] = 1.0e-3
    write(path, staged)
    assert main(["run", str(path), "--out", str(out), "--resume", "--allow-config-change", "--no-progress"]) == 0


def test_nan_loss_without_an_output_folder_says_nothing_was_saved():
    from admmcompress.data import load_dataset
    from admmcompress.models import LeNet300100
    from admmcompress.train.config import RunConfig
    from admmcompress.train.runner import Runner

    config = RunConfig.from_dict(spec(stages=[], pretrain={"epochs": 1, "optimizer": {"lr": 1.0e30}}))
    data = load_dataset("mnist", "train", limit=128), load_dataset("mnist", "test", limit=50)
    with pytest.raises(TrainingDiverged, match="no output folder, so no checkpoint was saved"):
        Runner(config, LeNet300100(), *data, progress=False).run()


# --- --dry-run ------------------------------------------------------------------------------------------------
def test_dry_run_on_a_folder_another_run_is_writing_is_refused_like_the_run(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", spec())
    out = tmp_path / "out"
    with RunLock(out):  # another run holds the folder
        message = error_line(capsys, ["run", str(config), "--out", str(out), "--dry-run"])
        assert "being written by another admmcompress command" in message and f"pid {os.getpid()}" in message
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())  # the probe wrote nothing
    (out / LOCK_FILE).write_text("12345\n")  # a stale file of a killed run: the real run would take over
    assert main(["run", str(config), "--out", str(out), "--dry-run"]) == 0


def test_dry_run_checks_everything_and_writes_nothing(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", spec())
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dry run of 'folder'" in printed and "stage1/prune 2 epoch(s)" in printed and "fc1" in printed
    assert "write a new run" in printed
    assert not out.exists()
    bad = spec()
    bad["stages"][0]["plan"] = {"rules": [{"match": "conv9", "structure": "unstructured", "sparsity": 0.5}]}
    assert main(["run", str(write(tmp_path / "bad.yaml", bad)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("admmcompress: error: ") and "matches no layer" in err and "Traceback" not in err
    missing = spec(data={"dataset": "mnist", "data_dir": str(tmp_path / "nowhere")})
    assert main(["run", str(write(tmp_path / "m.yaml", missing)), "--dry-run"]) == 2


def test_resume_with_the_run_config_not_yaml_is_one_line(finished, tmp_path, capsys):
    config, done = finished
    out = tmp_path / "out"
    _copy_run(done, out)
    (out / "config.yaml").write_text("{{{")
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", "--dry-run"])
    assert "is not valid YAML" in message and "line 1" in message and "--overwrite" in message


def test_resume_and_report_with_an_alias_bomb_in_the_run_config_are_one_quick_line(finished, tmp_path, capsys):
    """Nine aliases nine levels deep: 10**8 values once expanded (the comparison with the config, the checksum)."""
    config, done = finished
    out = tmp_path / "out"
    _copy_run(done, out)
    bomb = ["bomb0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"bomb{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (out / "config.yaml").write_text((out / "config.yaml").read_text() + "\n".join(bomb) + "\n")
    started = time.perf_counter()
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", "--dry-run"])
    assert "aliases (*name) expand this document to more than 1,000,000 values" in message, message
    assert "--overwrite" in message
    whole = tmp_path / "whole"  # a finished run for report and export
    shutil.copytree(done, whole)
    (whole / "config.yaml").write_text((out / "config.yaml").read_text())
    for command in (["report", str(whole)], ["export", str(whole), "--compact", "--out", str(tmp_path / "exported")]):
        message = error_line(capsys, command)
        assert "aliases (*name) expand" in message, message
    assert time.perf_counter() - started < 30


def test_resume_without_the_run_config_is_refused(finished, tmp_path, capsys):
    """Nothing to check the config against: the checkpoint might be another config's."""
    config, done = finished
    out = tmp_path / "out"
    _copy_run(done, out)
    (out / "config.yaml").unlink()
    for extra in ([], ["--dry-run"]):
        message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", *extra])
        assert "config.yaml' is missing, so the config cannot be checked" in message
        assert "--allow-config-change to resume with this config anyway" in message
    assert (out / STATE_FILE).is_file()
    # a folder from a version (or the API) that wrote no config.yaml still resumes, knowingly
    assert main(["run", str(config), "--out", str(out), "--resume", "--allow-config-change", "--no-progress"]) == 0
    assert (out / "config.yaml").is_file() and (out / "metrics.json").is_file()


def test_dry_run_resume_loads_the_checkpoint_as_the_run_would(finished, tmp_path, capsys):
    """Another model's checkpoint is refused by --dry-run --resume with the real resume's line; a good one passes."""
    from admmcompress.models import create_model
    from admmcompress.train import checkpoint as ckpt

    config, done = finished
    out = tmp_path / "out"
    _copy_run(done, out)
    assert main(["run", str(config), "--out", str(out), "--resume", "--dry-run"]) == 0
    capsys.readouterr()
    state = ckpt.load_state(out / STATE_FILE)
    state["model"] = create_model("lenet5").state_dict()
    ckpt.save_state(out / STATE_FILE, state)
    before = (out / STATE_FILE).read_bytes()
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", "--dry-run"])
    assert "does not fit LeNet300100" in message
    assert (out / STATE_FILE).read_bytes() == before


# --- files the new run reads are not deleted by --overwrite; --resume needs no pretrained file ------------------
@pytest.mark.parametrize("key", ["pretrained", "teacher"])
def test_overwrite_refuses_to_delete_the_file_the_new_run_reads(finished, tmp_path, capsys, key):
    _, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    before = sorted(p.name for p in out.iterdir())
    new = spec(pretrained=str(out / "model.safetensors"), pretrain=None)
    if key == "teacher":
        new = spec(teacher=str(out / "model.safetensors"))
        new["stages"][0]["retrain"]["distill"] = {"alpha": 0.5}
    config = write(tmp_path / "new.yaml", new)
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--overwrite"])
    assert f"--overwrite would delete '{out / 'model.safetensors'}', the {key} file this run reads" in message
    assert sorted(p.name for p in out.iterdir()) == before  # nothing deleted


def test_overwrite_may_read_a_users_file_kept_in_the_runs_subfolder(finished, tmp_path):
    """Only the run's own files in stages/ go; the user's copy there is read, not refused."""
    _, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    (out / "stages").mkdir(exist_ok=True)
    shutil.copy(done / "model.safetensors", out / "stages" / "dense_copy.safetensors")
    config = write(tmp_path / "new.yaml", spec(pretrained=str(out / "stages" / "dense_copy.safetensors"),
                                               pretrain=None, stages=[]))
    assert main(["run", str(config), "--out", str(out), "--overwrite", "--no-progress", "--dry-run"]) == 0


def test_resume_does_not_read_the_pretrained_file(finished, tmp_path, monkeypatch):
    """The weights come from the checkpoint: a dense file moved away since the run started is not needed."""
    from admmcompress.train.runner import Runner

    _, done = finished
    dense = tmp_path / "dense.safetensors"
    shutil.copy(done / "model.safetensors", dense)
    config = write(tmp_path / "run.yaml", spec(pretrained=str(dense), pretrain=None))
    out = tmp_path / "out"
    train_one_epoch = Runner._train_one_epoch

    def stop_at_second_epoch(self, phase, steps, calls=[]):  # noqa: B006 - counts calls across this test
        calls.append(phase.label)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the first epoch's checkpoint
        return train_one_epoch(self, phase, steps)

    monkeypatch.setattr(Runner, "_train_one_epoch", stop_at_second_epoch)
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 130
    monkeypatch.setattr(Runner, "_train_one_epoch", train_one_epoch)
    dense.unlink()
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress", "--dry-run"]) == 0
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert (out / "masks.safetensors").is_file()


def test_resume_never_imports_plugins_the_run_folder_names(finished, tmp_path, capsys):
    """config.yaml naming a plugin inside someone else's folder: compared as written, its code never run."""
    config, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    marker = tmp_path / "ran"
    (out / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["plugins"] = [str(out / "evil.py")]
    write(out / "config.yaml", saved)
    for flags in (["--dry-run"], []):
        message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", *flags])
        assert message.startswith("--resume: the config differs") and "plugins" in message.split(",")[0]
    assert not marker.exists()
