"""Fixtures shared by the executor tests (the block-sparse ones above all)."""

from __future__ import annotations

import pytest

from admmcompress.executors import blocksparse_cpp


@pytest.fixture()
def no_compiler(monkeypatch):
    """As on a machine where the extension cannot be built: the loader answers ``None``."""
    monkeypatch.setattr(blocksparse_cpp, "load", lambda verbose=False: None)


@pytest.fixture(scope="module")
def ext():
    """The compiled block-sparse kernel; the test skips where it cannot be built (no compiler or headers)."""
    module = blocksparse_cpp.load()
    if module is None:
        pytest.skip("no C++ compiler / torch headers here")
    return module
