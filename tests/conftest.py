"""Shared settings for the fast suite: few threads, modest hypothesis budgets."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The tensors here are tiny: one thread avoids OpenMP spin-waits that make every op ~100x
# slower when the machine's cores are busy with something else.
torch.set_num_threads(1)

settings.register_profile(
    "fast",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# CI (.ci/run sets ADMMCOMPRESS_HYPOTHESIS=ci): the same examples on every run, so a red CI is a change's doing;
# a developer's own runs draw new examples and find what is new (a CI run found the clustering zero level so).
settings.register_profile("ci", settings.get_profile("fast"), derandomize=True)
settings.load_profile(os.environ.get("ADMMCOMPRESS_HYPOTHESIS", "fast"))


@pytest.fixture()
def private_rng():
    """Seeded, and the global RNG restored afterwards: later tests see the state they would without these.
    A test module takes it for every test with ``pytestmark = pytest.mark.usefixtures("private_rng")``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture(autouse=True)
def keep_thread_count():
    """A config's `threads:` sets torch's thread count for the whole process; put it back after every test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# The tiny finished run several test files read (export, report, compare, plugin executors): MNIST, 256
# images, one epoch per phase. Session-scoped so it trains once; a test that changes it works on a copy.
TINY_RUN_SPEC = {
    "name": "tiny",
    "seed": 1,
    "threads": 1,
    "model": {"name": "lenet300100"},
    "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 256, "test_limit": 64},
    "pretrain": {"epochs": 1},
    "stages": [
        {
            "plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]},
            "method": "admm",
            "admm": {"epochs": 1, "rho": 1.0e-2},
            "retrain": {"epochs": 1},
        }
    ],
}


@pytest.fixture(scope="session")
def tiny_finished_run(tmp_path_factory):
    """The folder of ``TINY_RUN_SPEC`` run through ``admmcompress run`` (read it; copy it to change it)."""
    import warnings

    import yaml

    from admmcompress.cli import main

    tmp = tmp_path_factory.mktemp("tiny_run")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN_SPEC, sort_keys=False))
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "ADMM residual", RuntimeWarning)
            assert main(["run", str(config), "--out", str(tmp / "run"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp / "run"
