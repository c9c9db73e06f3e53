"""Weight averaging over quantized layers (review 41): a clustered layer ends on the mean of its snapshots, on its
codes with the averaged centroids; values held on fixed levels stay on them."""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.data.datasets import Split
from admmcompress.finalize import QuantizedMaskSet
from admmcompress.finalize.quantized import HeldValues
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import Runner

CONFIG = {
    "seed": 3,
    "model": {"name": "mlp"},
    "data": {"batch_size": 16},
    "pretrain": {"epochs": 1},
    "stages": [{
        "method": "magnitude",
        "plan": {"rules": [{"match": "0", "structure": "clustering", "clusters": 4},
                           {"match": "2", "structure": "fixed_point", "bits": 3}]},
        "admm": {"epochs": 0},
        "retrain": {"epochs": 3, "average_from_epoch": 1, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    }],
}


def _data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(64, 20, generator=g), torch.randint(0, 4, (64,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def test_an_averaged_clustered_layer_keeps_its_codes_with_the_averaged_centroids(monkeypatch):
    snapshots: list[dict[str, torch.Tensor]] = []
    original = Runner._record

    def record(self, phase, *args, **kwargs):
        if phase.kind == "retrain":  # the weights the average folds in, one snapshot per epoch
            snapshots.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return original(self, phase, *args, **kwargs)

    monkeypatch.setattr(Runner, "_record", record)
    data, model = _data(), _model()
    runner = Runner(RunConfig.from_dict(CONFIG), model, data, data, progress=False, train_dense=False)
    metrics = runner.run()
    assert len(snapshots) == 3 and metrics["weight_average"]["stage1/retrain"]["snapshots"] == 3
    held = runner.masks.held
    assert isinstance(runner.masks, QuantizedMaskSet) and held["0.weight"].update == "centroids"

    clustered = model[0].weight.detach()
    mean = torch.stack([s["0.weight"] for s in snapshots]).mean(0)
    assert torch.allclose(clustered, mean, atol=1e-6)  # the average, not the last epoch's weights
    assert not torch.equal(clustered, snapshots[-1]["0.weight"])
    assert torch.equal(clustered, held["0.weight"].decode(clustered.dtype))  # on its codes, levels = centroids
    assert clustered.unique().numel() <= 4
    assert all(torch.equal(s["0.weight"] == 0, clustered == 0) for s in snapshots)  # pruned zeros kept

    fixed = model[2].weight.detach()  # held on 3-bit fixed levels: the same in every snapshot, so in the mean
    assert held["2.weight"].update == "hold"
    assert torch.equal(fixed, snapshots[-1]["2.weight"]) and torch.equal(fixed, held["2.weight"].decode(fixed.dtype))
    assert metrics["stages"][0]["accuracy_after_retrain"] == metrics["weight_average"]["stage1/retrain"][
        "accuracy_averaged"]


def test_refit_centroids_takes_each_clusters_mean_and_leaves_fixed_levels():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 3.0, 0.0], [5.0, 5.0, 0.0]]))
    codes = torch.tensor([[0, 0, -1], [1, 1, -1]])
    masks = QuantizedMaskSet({"weight": codes >= 0}, {"weight": HeldValues(torch.tensor([1.5, 4.0]), codes,
                                                                           "centroids")})
    masks.refit_centroids(layer)
    assert masks.held["weight"].levels.tolist() == [2.0, 5.0]
    fixed = QuantizedMaskSet({}, {"weight": HeldValues(torch.tensor([1.5, 4.0]), codes, "hold")})
    fixed.refit_centroids(layer)
    assert fixed.held["weight"].levels.tolist() == [1.5, 4.0]
