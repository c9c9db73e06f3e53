"""The command's entry point: its exit status, and how a torchrun worker leaves (no interpreter finalization)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from admmcompress import cli
from admmcompress.train import distributed
from admmcompress.train.distributed import Distributed

ROOT = Path(__file__).resolve().parents[1]


def _record_exit(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", lambda code: calls.append(("os._exit", code)))
    monkeypatch.setattr(cli.logging, "shutdown", lambda: calls.append("logging.shutdown"))
    return calls


def test_a_torchrun_worker_flushes_and_leaves_with_os_exit(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    calls = _record_exit(monkeypatch)
    flushed: list[str] = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def flush(self) -> None:
            flushed.append(self.name)
            if self.name == "stderr":
                raise BrokenPipeError  # a reader that went away does not stop the exit

    monkeypatch.setattr(sys, "stdout", Stream("stdout"))
    monkeypatch.setattr(sys, "stderr", Stream("stderr"))
    with pytest.raises(SystemExit):  # os._exit is recorded, not done: sys.exit follows in the test only
        cli.entry()
    assert flushed == ["stdout", "stderr"]
    assert calls == ["logging.shutdown", ("os._exit", 3)]


def test_one_process_exits_through_sys_exit_with_mains_status(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = _record_exit(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        cli.entry()
    assert stop.value.code == 3 and calls == []


def test_the_script_and_python_dash_m_go_through_entry():
    assert 'admmcompress = "admmcompress.cli:entry"' in (ROOT / "pyproject.toml").read_text()
    source = (ROOT / "src" / "admmcompress" / "__main__.py").read_text()
    assert "entry()" in source and "main()" not in source


def test_close_frees_garbage_before_leaving_the_group(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed.gc, "collect", lambda: calls.append("collect") or 0)
    Distributed(1, 2).close()
    assert calls == ["collect", "destroy"]
    calls.clear()
    Distributed().close()  # one process: no group to leave
    assert calls == []
