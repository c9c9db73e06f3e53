"""``quantized_weights: ste`` after iterative quantization (review 41): the last round freezes every entry, and
such a layer is fully quantized, so the retrain phase trains it straight-through instead of holding it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress import FixedPoint, Plan
from admmcompress.data.datasets import Split
from admmcompress.drivers import IterativeQuantization
from admmcompress.finalize import partial_quantize
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import Runner


def test_a_fully_frozen_layer_switches_to_ste_and_learns_its_codes():
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    masks = IterativeQuantization(model, Plan({"": FixedPoint(bits=2)}), updates=2).finalize()
    assert bool(masks.held["weight"].frozen.all())
    ste = masks.with_update("ste")
    assert ste is not masks and ste.held["weight"].update == "ste" and ste.held["weight"].frozen is None
    assert masks.with_update("ste", leave={"weight"}) is masks  # a driver's own holds can be left alone
    levels = ste.held["weight"].levels
    x, y = torch.randn(256, 16), torch.randint(0, 8, (256,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ste.attach(model, optimizer)
    before = model.weight.detach().clone()
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    after = model.weight.detach()
    assert int((after != before).sum()) > 0  # the codes moved (held, nothing would)
    assert set(after.unique().tolist()) <= set(levels.tolist())  # still on the same levels


def test_a_partly_frozen_layer_still_holds():
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    partial = partial_quantize(model, Plan({"": FixedPoint(bits=2)}).resolve(model), 0.5)
    assert partial.with_update("ste") is partial


def _config(retrain: dict | None = None, admm: dict | None = None) -> RunConfig:
    return RunConfig.from_dict({
        "seed": 3,
        "model": {"name": "mlp"},
        "data": {"batch_size": 16},
        "pretrain": {"epochs": 1},
        "stages": [{
            "method": "iterative_quantization",
            "plan": {"rules": [{"match": "0", "structure": "fixed_point", "bits": 2}]},
            "admm": {"epochs": 1, "update_every_steps": 2, **(admm or {})},
            "retrain": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.5}, **(retrain or {})},
        }],
    })


def _data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(64, 20, generator=g), torch.randint(0, 4, (64,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def _run(config: RunConfig, **kwargs) -> Runner:
    runner = Runner(config, _model(), _data(), _data(), progress=False, train_dense=False, **kwargs)
    runner.run()
    return runner


def test_retrain_with_ste_after_iterative_quantization_retrains_the_quantized_weights():
    held = _run(_config())
    ste = _run(_config({"quantized_weights": "ste"}))
    w_held, w_ste = held.model[0].weight.detach(), ste.model[0].weight.detach()
    levels = held.masks.held["0.weight"].levels
    assert torch.equal(ste.masks.held["0.weight"].levels, levels)  # the same iterative quantization before
    assert int((w_held != w_ste).sum()) > 0  # ste moved weights between levels; hold kept them
    assert set(w_ste[w_ste != 0].unique().tolist()) <= set(levels.tolist())
    assert torch.equal(w_ste, ste.masks.held["0.weight"].decode(w_ste.dtype))  # the final codes are the weights
    assert ste.masks.held["0.weight"].update == "hold"  # held again after the phase, as after hard quantization


class _Stop(Exception):
    pass


def test_a_resume_inside_the_iterative_phase_leaves_its_own_holds_as_the_uninterrupted_run_does(tmp_path):
    """``quantized_weights: ste`` on the iterative phase itself: its own rounds stay held on a resume too."""
    # 4 steps per epoch, one update at step 8 (the end of epoch 2): epoch 3 trains with every entry frozen
    config = _config(admm={"epochs": 3, "update_every_steps": 8, "quantized_weights": "ste",
                           "optimizer": {"name": "sgd", "lr": 0.5}})
    data = _data()
    full = _run(config)

    class StopInTheLastEpoch(Runner):
        def _save(self) -> None:
            super()._save()
            if self.phases[self.phase_index].kind == "prune" and self.epoch == 2:
                raise _Stop

    with pytest.raises(_Stop):
        StopInTheLastEpoch(config, _model(), data, data, out_dir=tmp_path, progress=False, train_dense=False).run()
    resumed = Runner(config, _model(), data, data, out_dir=tmp_path, progress=False, train_dense=False)
    resumed.run(resume=True)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
