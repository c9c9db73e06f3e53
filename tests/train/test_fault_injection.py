"""Faults during a run: kill -9 at seeded random points, then --resume, ends on the uninterrupted run's exact
weights with no partial or temporary files; a full disk during a checkpoint write is one line, exit 2, and the
previous checkpoint stays intact."""

from __future__ import annotations

import errno
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from admmcompress.atomic import TMP_PATTERN
from admmcompress.cli import main
from admmcompress.train.lock import LOCK_FILE
from admmcompress.train.runner import STATE_FILE, read_progress

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

SPEC = {
    "name": "faults",
    "seed": 3,
    "threads": 1,
    "model": {"name": "lenet300100"},
    "data": {"dataset": "mnist", "batch_size": 32, "train_limit": 256, "test_limit": 100},
    "pretrain": {"epochs": 2},
    "stages": [
        {
            "plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.8}]},
            "admm": {"epochs": 3, "rho": 1.0e-2},
            "retrain": {"epochs": 2},
        },
        {
            "plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]},
            "admm": {"epochs": 2, "rho": 1.0e-2},
            "retrain": {"epochs": 2},
        },
    ],
}
OUTPUTS = ("model.safetensors", "masks.safetensors")




@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process): its config file and folder."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tmp / "faults.yaml"
    config.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    out = tmp / "out"
    threads = torch.get_num_threads()
    try:
        assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return config, out


def leftovers(folder: Path) -> list[str]:
    """Partial files a kill may leave: our temporary files, and the lock file."""
    return [p.name for p in folder.rglob("*") if TMP_PATTERN.match(p.name) or p.name == LOCK_FILE]


def assert_same_weights(got_dir: Path, want_dir: Path) -> None:
    for name in OUTPUTS:
        got, want = load_file(str(got_dir / name)), load_file(str(want_dir / name))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}:{key} differs after kill + resume"


def _start(config: Path, out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "admmcompress.cli", "run", str(config), "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )


def _wait_for_training(child: subprocess.Popen, log: Path, deadline: float) -> None:
    """Until the child says it starts training (imports, data and model loaded), or ends."""
    while "admmcompress: run '" not in log.read_text() and child.poll() is None:
        assert time.monotonic() < deadline, "the child never started training"
        time.sleep(0.005)


def _wait_for_progress(child: subprocess.Popen, out: Path, target: tuple[int, int], deadline: float) -> None:
    """Until the child's checkpoint reaches ``target`` (phase, epoch), or the child ends."""
    last = None
    while child.poll() is None:
        assert time.monotonic() < deadline, f"the child never reached {target}"
        try:
            stamp = (out / STATE_FILE).stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != last:
            last = stamp
            try:
                if read_progress(out) >= target:
                    return
            except Exception:  # replaced while read: read the next one
                pass
        time.sleep(0.005)


# Checkpoint positions of SPEC (phase, epoch): pretrain 2, stage 1 ADMM 3 / retrain 2, stage 2 ADMM 2 / retrain 2.
POSITIONS = [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (4, 0),
             (4, 1), (4, 2)]


def test_kill_at_seeded_random_points_then_resume_is_exact(reference, tmp_path):
    """Three kills: each after a seeded checkpoint position (or none: before the first checkpoint) and a seeded
    delay of up to 150 ms, so some land inside an epoch, some inside a checkpoint write."""
    config, want = reference
    rng = random.Random(20)
    points = [(None, rng.uniform(0.0, 0.15))] + [(rng.choice(POSITIONS), rng.uniform(0.0, 0.15)) for _ in range(2)]
    for i, (target, delay) in enumerate(points):
        out = tmp_path / f"killed{i}"
        log = tmp_path / f"child{i}.log"
        child = _start(config, out, log)
        try:
            _wait_for_training(child, log, time.monotonic() + 120)
            if target is not None:
                _wait_for_progress(child, out, target, time.monotonic() + 120)
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=30) in (-signal.SIGKILL, 0), log.read_text()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 0, log.read_text()
        assert_same_weights(out, want)
        assert leftovers(out) == []


class DiskFull:
    """``torch.save`` that writes ``allowed`` files, then fails as a full disk does (after writing some bytes)."""

    def __init__(self, allowed: int):
        self.allowed, self.calls = allowed, 0
        self.save = torch.save

    def __call__(self, obj, path, *args, **kwargs):
        self.calls += 1
        if self.calls > self.allowed:
            if hasattr(path, "write"):
                path.write(b"PK\x03\x04 half a checkpoint")
            else:
                Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.save(obj, path, *args, **kwargs)


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(reference, tmp_path, capsys,
                                                                              monkeypatch):
    config, want = reference
    out = tmp_path / "out"
    full = DiskFull(allowed=2)  # pretrain epochs 1 and 2 are saved; the end of the pretrain phase is not
    monkeypatch.setattr(torch, "save", full)
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 2
    monkeypatch.setattr(torch, "save", full.save)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("admmcompress: error: ")]
    assert len(errors) == 1, err
    message = errors[0]
    assert f"'{out / STATE_FILE}'" in message and "No space left on device" in message
    assert "previous 'checkpoint.pt' is intact" in message and "--resume" in message
    assert read_progress(out) == (0, 2)  # the previous checkpoint, whole
    assert leftovers(out) == []
    # space freed: the run continues and ends as the uninterrupted one
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_weights(out, want)
    assert leftovers(out) == []
