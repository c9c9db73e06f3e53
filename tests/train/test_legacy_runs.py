"""Run folders written before the driver registry still resume and report.

Before the registry, checkpoints of a one-shot magnitude stage carried no driver state, checkpoints had no
``transforms`` entry, and config.yaml spelled ADMM's rho inside ``admm:`` and wrote a ``reweighted:`` mapping
for every stage. A run crashed in such a state, rewritten to that older form, resumes to the same weights as an
uninterrupted run. (Checked against real run folders of the pre-registry code too: eight crash points, every
phase of an admm + magnitude + reweighted run, bit-identical after resuming with this code.)
"""

from __future__ import annotations

import pytest
import torch
import yaml

from admmcompress.data import load_dataset
from admmcompress.models import LeNet300100
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import STATE_FILE, Runner

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

LEGACY_SPEC = {
    "name": "legacy", "seed": 3, "model": {"name": "lenet300100"}, "data": {"batch_size": 64},
    "pretrain": {"epochs": 1},
    "stages": [
        {"plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.8}]}, "method": "admm",
         "admm": {"epochs": 2, "rho": 1.0e-2, "rho_growth": 1.2, "rho_max": 1.0, "update_every_steps": 3},
         "retrain": {"epochs": 1}, "reweighted": {"penalty": 1.0e-4, "power": 1, "eps": 1.0e-3}},
        {"plan": {"rules": [{"match": "fc2", "structure": "filter", "sparsity": 0.5}]}, "method": "magnitude",
         "admm": {"epochs": 2, "rho": 1.0e-3}, "retrain": {"epochs": 1},
         "reweighted": {"penalty": 1.0e-4, "power": 1, "eps": 1.0e-3}},
    ],
}


class Crash(Exception):
    pass


def model(seed: int = 0) -> LeNet300100:
    torch.manual_seed(seed)
    return LeNet300100()


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist", "train", limit=256), load_dataset("mnist", "test", limit=100)


@pytest.mark.parametrize("crash_epoch", [3, 6])  # inside stage 1's ADMM phase; inside stage 2's magnitude phase
def test_a_pre_registry_run_folder_resumes_exactly(tmp_path, data, monkeypatch, crash_epoch):
    config = RunConfig.from_dict(LEGACY_SPEC)
    assert config.stages[0].options.rho == 1e-2 and config.stages[0].options.rho_growth == 1.2
    reference = model()
    Runner(config, reference, *data, progress=False).run()

    out = tmp_path / "run"
    original, calls = Runner._record, {"n": 0}

    def record(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_epoch:
            raise Crash
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", record)
    with pytest.raises(Crash):
        Runner(RunConfig.from_dict(LEGACY_SPEC), model(), *data, out_dir=out, progress=False).run()
    monkeypatch.undo()

    # rewrite the folder to the pre-registry form
    state = ckpt.load_state(out / STATE_FILE)
    state.pop("transforms", None)
    if crash_epoch == 6:  # the magnitude phase: drivers of that method kept no state then
        assert state["phase_index"] == 3
        state["driver"] = None
    ckpt.save_state(out / STATE_FILE, state)
    (out / "config.yaml").write_text(yaml.safe_dump(LEGACY_SPEC, sort_keys=False))

    resumed = model(seed=99)
    Runner(RunConfig.from_yaml(out / "config.yaml"), resumed, *data, out_dir=out, progress=False).run(resume=True)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
