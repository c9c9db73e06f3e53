"""Fixtures shared by the executor tests (the block-sparse ones above all)."""

from __future__ import annotations

import pytest
import torch

from admmcompress.executors import blocksparse_cpp


@pytest.fixture()
def private_rng():
    """Seeded, and the global RNG restored afterwards: later tests see the state they would without these.
    A test module takes it for every test with ``pytestmark = pytest.mark.usefixtures("private_rng")``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


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
