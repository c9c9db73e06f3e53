"""Ctrl-C during a run (one line with the command that continues it, exit 130, lock released); thread counts."""

from __future__ import annotations

import yaml

from admmcompress import cli
from admmcompress.train.lock import RunLock


def _config(tmp_path):
    path = tmp_path / "tiny run.yaml"  # a space: the printed command must still be one the shell reads right
    path.write_text(yaml.safe_dump({"model": {"name": "lenet300100"}, "data": {"dataset": "mnist"},
                                    "pretrain": {"epochs": 1}}, sort_keys=False))
    return path


def test_ctrl_c_after_a_checkpoint_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(args, config, out, stale, ctx):
        (out / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_locked", interrupted)
    out = tmp_path / "my run"
    assert cli.main(["run", str(_config(tmp_path)), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"admmcompress: interrupted; continue from the last checkpoint: admmcompress run "
                   f"'{tmp_path / 'tiny run.yaml'}' --out '{out}' --resume"]
    RunLock(out).acquire().release()  # the interrupted run let go of its folder


def test_sigterm_ends_a_run_as_ctrl_c_does_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """`timeout` or a scheduler stops a run with SIGTERM: it ended silently with 143 (a user review's finding)."""
    import os
    import signal

    def terminated(args, config, out, stale, ctx):
        (out / "checkpoint.pt").write_bytes(b"")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "_run_locked", terminated)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    assert cli.main(["run", str(_config(tmp_path)), "--out", str(out)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"admmcompress: terminated (SIGTERM); continue from the last checkpoint: admmcompress run "
                   f"'{tmp_path / 'tiny run.yaml'}' --out {out} --resume"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the command's only
    RunLock(out).acquire().release()


def test_ctrl_c_under_torchrun_says_to_launch_every_rank_again(tmp_path, monkeypatch, capsys):
    """Under torchrun the continue command is a torchrun line for as many processes, printed by rank 0 only: one
    process would resume the run with another world size."""
    from admmcompress.train.distributed import Distributed

    def interrupted(args, config, out, stale, ctx):
        (out / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_locked", interrupted)
    class TwoRanks(Distributed):  # rank 0 of two, without a process group (abort and close need one)
        def abort(self, err):
            pass

        def close(self):
            pass

    monkeypatch.setattr(cli.Distributed, "from_env", classmethod(lambda cls: TwoRanks(0, 2)))
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():  # as torchrun sets them
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    assert cli.main(["run", str(_config(tmp_path)), "--out", str(out), "--seed", "3"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"admmcompress: interrupted; continue from the last checkpoint: torchrun --standalone "
                   f"--nproc-per-node 2 -m admmcompress run '{tmp_path / 'tiny run.yaml'}' --out {out} --seed 3 "
                   "--resume"]


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(args, config, out, stale, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_locked", interrupted)
    out = tmp_path / "run"
    assert cli.main(["run", str(_config(tmp_path)), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"admmcompress: interrupted before the run's first checkpoint; nothing to resume in {out}"]
    assert not out.exists()  # the empty folder the run made is removed, as for any run that wrote nothing


def test_absurd_thread_counts_are_one_line(tmp_path, capsys):
    """OpenMP aborts the process when asked for 100000 threads: refused first, flag and config alike."""
    config = _config(tmp_path)
    assert cli.main(["run", str(config), "--threads", "100000", "--dry-run"]) == 2
    assert "--threads 100000 must be an integer in [1, 1024]" in capsys.readouterr().err
    spec = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**spec, "threads": 100000}))
    assert cli.main(["run", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "threads=100000 is more than 1024" in err[0]
