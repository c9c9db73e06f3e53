"""Quantization-aware retraining with a straight-through estimator (``quantized_weights: ste``)."""

import copy

import pytest
import torch
from torch import nn

from admmcompress import Plan
from admmcompress.finalize import HeldValues, QuantizedMaskSet, hard_prune, hard_quantize, partial_quantize

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

PLAN = Plan.from_dict(
    [
        {"match": "0", "structure": "unstructured", "sparsity": 0.5},
        {"match": "0", "structure": "fixed_point", "bits": 2},
        {"match": "2", "structure": "binary"},
        {"match": "4", "structure": "clustering", "clusters": 3},
    ]
)


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(256, 6)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    return model, x, y


def fit(model, optimizer, x, y, steps, loss_fn=nn.functional.cross_entropy):
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss_fn(model(x), y).item()


def training_with_ste(steps: int):
    """A model hard-quantized by PLAN, trained ``steps`` Adam steps with STE: (model, x, y, masks, optimizer)."""
    model, x, y = model_and_data()
    masks = hard_quantize(model, PLAN.resolve(model)).with_update("ste")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    masks.attach(model, optimizer)
    fit(model, optimizer, x, y, steps)
    return model, x, y, masks, optimizer


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_ste_weights_stay_on_their_levels_and_pruned_zeros_hold_while_codes_move(name):
    model, x, y = model_and_data()
    masks = hard_prune(model, PLAN.resolve(model)).with_update("ste")
    levels = {n: h.levels.clone() for n, h in masks.held.items()}
    codes = {n: h.codes.clone() for n, h in masks.held.items()}
    pruned = model[0].weight.detach() == 0
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=1e-3),
            "adam": lambda p: torch.optim.Adam(p, lr=0.05)}[name]
    optimizer = make(model.parameters())
    masks.attach(model, optimizer)
    fit(model, optimizer, x, y, 200)
    params = dict(model.named_parameters())
    for n in ("0.weight", "2.weight"):
        held = masks.held[n]
        assert held.update == "ste"
        assert torch.equal(held.levels, levels[n]), "the levels are fixed"
        assert torch.equal(params[n].detach(), held.decode()), f"{n} is off its levels"
        assert set(torch.unique(params[n].detach()).tolist()) <= set(levels[n].tolist()) | {0.0}
        assert not torch.equal(held.codes, codes[n]), f"{n}: no weight changed level"
    assert bool((params["0.weight"].detach()[pruned] == 0).all())
    assert torch.equal(masks.held["0.weight"].codes == -1, pruned)
    assert masks.held["4.weight"].update == "centroids"  # clustering keeps centroid updating


def test_ste_finds_the_levels_a_regression_needs_where_hold_cannot_move():
    """y = X w* with w* on the layer's own levels but other codes: STE reaches w* exactly, hold stays."""
    found = {}
    for update in ("hold", "ste"):
        layer = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[0.9, -0.2, 0.45, -1.1]]))
        two_bits = Plan.from_dict([{"match": "", "structure": "fixed_point", "bits": 2}])
        masks = hard_quantize(layer, two_bits.resolve(layer))
        start = layer.weight.detach().clone()
        wanted = -start.flip(1)  # every weight on another level of the same set
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        y = x @ wanted.T
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
        masks.with_update(update).attach(layer, optimizer)
        fit(layer, optimizer, x, y, 300, loss_fn=nn.functional.mse_loss)
        found[update] = (layer.weight.detach().clone(), start, wanted)
    weight, start, wanted = found["hold"]
    assert torch.equal(weight, start)
    weight, start, wanted = found["ste"]
    assert torch.equal(weight, wanted)


def test_shadow_round_trips_and_training_continues_identically():
    model, x, y, masks, optimizer = training_with_ste(20)
    state = masks.state_dict()
    assert "0.weight@shadow" in state and "4.weight@shadow" not in state
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(optimizer.state_dict())
    fit(model, optimizer, x, y, 20)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    again, _, _ = model_and_data()
    again.load_state_dict(model_state)
    restored = QuantizedMaskSet.from_state_dict(state).with_update("ste")  # keeps the saved shadow
    assert torch.equal(restored.held["0.weight"].shadow, state["0.weight@shadow"])
    optimizer = torch.optim.Adam(again.parameters(), lr=0.05)
    optimizer.load_state_dict(opt_state)
    restored.attach(again, optimizer)
    fit(again, optimizer, x, y, 20)
    for k, v in straight.items():
        assert torch.equal(again.state_dict()[k], v), k


def test_back_to_hold_drops_the_shadow_and_freezes_the_values():
    model, x, y, masks, _ = training_with_ste(10)
    masks.detach()
    held = masks.with_update("hold")
    assert all(h.shadow is None for h in held.held.values())
    assert not any(k.endswith("@shadow") for k in held.state_dict())
    before = model[0].weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    held.attach(model, optimizer)
    fit(model, optimizer, x, y, 10)
    assert torch.equal(model[0].weight.detach(), before)


def test_partial_quantization_holds_are_not_switched_and_bad_updates_are_refused():
    model, _, _ = model_and_data()
    targets = Plan.from_dict([{"match": "0", "structure": "fixed_point", "bits": 2}]).resolve(model)
    partial = partial_quantize(model, targets, 0.5)
    assert partial.with_update("ste") is partial  # partial holds are not switched: the same set back
    assert partial.held["0.weight"].update == "hold"
    with pytest.raises(ValueError, match="choose 'hold'.*'ste'"):
        partial.with_update("centroids")
    with pytest.raises(ValueError, match="shadow belongs to update='ste'"):
        HeldValues(torch.ones(2), torch.zeros(3, dtype=torch.int64), "hold", shadow=torch.zeros(3))
