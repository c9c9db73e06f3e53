"""Fixtures the command-line tests share."""

from __future__ import annotations

import pytest

from admmcompress import run_export


@pytest.fixture
def no_run_read(monkeypatch):
    """Fail the test if export opens the run: --out is checked before any work."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the run was opened before --out was checked")

    monkeypatch.setattr(run_export, "open_run", refuse)
