"""MaskSet: pruned weights stay bit-exactly zero under any optimizer (SPEC P2), hard pruning."""

import pytest
import torch
from torch import nn

from admmcompress.finalize import MaskSet, hard_prune, masks_from_model
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Column, Filter, Unstructured

OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-4),
    "adam-amsgrad-wd-foreach": lambda p: torch.optim.Adam(
        p, lr=1e-2, weight_decay=5e-4, amsgrad=True, foreach=True
    ),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "rmsprop-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, weight_decay=5e-4),
}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3)
    )


PLAN = Plan(
    {
        "0": Filter(sparsity=0.5),
        "3": Unstructured(sparsity=0.9),
        "5": Column(sparsity=0.5),
    }
)


def train(model, optimizer, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def assert_pruned_exactly_zero(model, masks):
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        pruned = params[name].detach()[~keep]
        assert pruned.numel() > 0
        assert torch.count_nonzero(pruned) == 0, (
            f"{name}: {torch.count_nonzero(pruned)} pruned weights revived"
        )


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("warm_state", [False, True], ids=["fresh", "stale-state"])
def test_pruned_weights_stay_bit_exact_zero_for_100_steps(make_opt, warm_state):
    model = small_model()
    opt = make_opt(model.parameters())
    if warm_state:
        train(model, opt, 5, seed=7)  # momentum / moments are now nonzero everywhere (SPEC P2)
        assert any(
            torch.count_nonzero(v) == v.numel()
            for s in opt.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
    masks = hard_prune(model, PLAN.resolve(model))
    assert_pruned_exactly_zero(model, masks)
    kept_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks.attach(model, opt)
    for _ in range(4):
        train(model, opt, 25)
        assert_pruned_exactly_zero(model, masks)
    # Training really happened on the kept weights.
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert not torch.equal(params[name].detach()[keep], kept_before[name][keep])
    # Optimizer state is zero at pruned entries too, so nothing is waiting to revive them.
    for name, keep in masks.items():
        for value in opt.state[params[name]].values():
            if torch.is_tensor(value) and value.shape == keep.shape:
                assert torch.count_nonzero(value[~keep]) == 0


def test_without_state_zeroing_stale_momentum_revives_weights():
    # The control for the test above: masking gradients alone (no optimizer hook) is not enough.
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train(model, opt, 5)
    masks = hard_prune(model, PLAN.resolve(model))
    masks.attach(model)  # gradient hooks only, no optimizer watched
    train(model, opt, 3)
    params = dict(model.named_parameters())
    assert any(torch.count_nonzero(params[n].detach()[~k]) > 0 for n, k in masks.items())


def test_watch_before_attach_is_an_error():
    with pytest.raises(RuntimeError, match="call attach"):
        MaskSet({"weight": torch.ones(2, 2, dtype=torch.bool)}).watch(
            torch.optim.SGD([nn.Parameter(torch.ones(1))])
        )


def test_gradients_are_masked_and_detach_removes_hooks():
    model = nn.Linear(4, 3)
    keep = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    masks = MaskSet({"weight": keep})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks.attach(model, opt)
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    assert torch.count_nonzero(model.weight.grad[~keep]) == 0
    assert torch.count_nonzero(model.weight.grad[keep]) == keep.sum()
    opt.step()
    masks.detach()
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    assert torch.count_nonzero(model.weight.grad[~keep]) == (~keep).sum()  # no longer masked
    opt.step()
    assert torch.count_nonzero(model.weight.detach()[~keep]) > 0  # and no longer re-masked


def test_attach_twice_does_not_stack_hooks():
    model = nn.Linear(4, 3)
    masks = MaskSet({"weight": torch.rand(3, 4) > 0.5})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(model, opt)
    masks.attach(model, opt)
    assert len(masks._handles) == 2  # one gradient hook and one step hook
    masks.detach()
    assert masks._handles == []


def test_apply_zeroes_pruned_entries_in_place():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    keep = torch.tensor([[True, False, True], [False, False, True]])
    MaskSet({"weight": keep}).apply(model)
    assert torch.equal(model.weight.detach(), torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 6.0]]))


def test_masks_naming_missing_parameters():
    with pytest.raises(KeyError, match=r"masks name parameters the model does not have: \['fc9.weight'\]"):
        MaskSet({"fc9.weight": torch.ones(2, dtype=torch.bool)}).apply(nn.Linear(2, 1))


def test_hard_prune_intersects_two_targets_on_one_parameter():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    w = model[0].weight.detach().clone()
    plan = Plan.from_dict(
        [
            {"match": "0", "structure": "filter", "sparsity": 0.5},
            {"match": "0", "structure": "column", "sparsity": 0.75},
        ]
    )
    masks = hard_prune(model, plan.resolve(model))
    assert list(masks.masks) == ["0.weight"]
    kept_rows = Filter(sparsity=0.5).support(w)
    expected = kept_rows & Column(sparsity=0.75).support(w * kept_rows)  # columns ranked on the kept filters
    assert torch.equal(masks["0.weight"], expected)
    rows = expected.reshape(6, -1).any(dim=1)
    cols = expected.reshape(6, -1).any(dim=0)
    assert int(rows.sum()) == 3 and int(cols.sum()) == 9
    assert torch.equal(model[0].weight.detach(), w * expected)
    assert model[0].bias.detach().abs().sum() > 0  # biases are not targets


def test_hard_prune_keeps_frozen_masks():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    frozen_keep = torch.ones(5, 6, dtype=torch.bool)
    frozen_keep[0] = False
    frozen = MaskSet({"0.weight": frozen_keep, "2.weight": torch.tensor([[True] * 5, [False] * 5])})
    masks = hard_prune(model, Plan({"0": Unstructured(sparsity=0.5)}).resolve(model), frozen)
    assert set(masks.masks) == {"0.weight", "2.weight"}
    assert not masks["0.weight"][0].any()
    assert torch.equal(masks["2.weight"], frozen["2.weight"])
    assert torch.count_nonzero(model[2].weight.detach()[1]) == 0
    # The frozen set itself is untouched.
    assert frozen["0.weight"].sum() == 24


def test_hard_prune_uses_exact_counts():
    model = small_model()
    masks = hard_prune(model, PLAN.resolve(model))
    assert int(masks["0.weight"].reshape(4, -1).any(dim=1).sum()) == 2
    assert int(masks["3.weight"].sum()) == round(16 * 144 * 0.1)
    assert int(masks["5.weight"].any(dim=0).sum()) == 8
    sparsity = masks.sparsity()
    assert sparsity["3.weight"] == pytest.approx(1 - 230 / 2304, abs=1e-6)


def test_intersect_and_merged():
    a = MaskSet({"w": torch.tensor([True, True, False])})
    b = MaskSet({"w": torch.tensor([True, False, True]), "v": torch.tensor([True])})
    merged = a.merged(b)
    assert merged["w"].tolist() == [True, False, False]
    assert merged["v"].tolist() == [True]
    assert a["w"].tolist() == [True, True, False]  # inputs unchanged
    a.intersect("w", torch.tensor([0, 1, 1]))
    assert a["w"].tolist() == [False, True, False]
    assert a["w"].dtype == torch.bool
    assert "w" in a and "v" not in a and len(merged) == 2


def test_a_quantized_set_merged_with_more_pruning_cannot_revive_the_pruned_weights():
    """merged() kept the old codes, so apply() wrote their levels back into entries the new mask prunes."""
    from admmcompress.finalize import hard_quantize
    from admmcompress.structures import FixedPoint

    torch.manual_seed(0)
    model = nn.Linear(6, 4, bias=False)
    quantized = hard_quantize(model, Plan([Rule(FixedPoint(bits=2), match="")]).resolve(model))
    extra = torch.ones(4, 6, dtype=torch.bool)
    extra[0] = False
    merged = quantized.merged(MaskSet({"weight": extra}))
    merged.apply(model)
    assert not bool(model.weight[0].any()) and bool(model.weight[1:].all())
    assert bool((quantized.held["weight"].codes[0] >= 0).all())  # the input set is unchanged
    assert merged.copy().held["weight"] is merged.held["weight"] and type(merged.copy()) is type(merged)


def test_state_dict_round_trip():
    model = small_model()
    masks = hard_prune(model, PLAN.resolve(model))
    state = masks.state_dict()
    restored = MaskSet.from_state_dict(state)
    assert list(restored.masks) == list(masks.masks)
    for name, keep in masks.items():
        assert torch.equal(restored[name], keep)
        assert restored[name].dtype == torch.bool
    state["0.weight"].fill_(True)  # a saved copy, not an alias
    assert not masks["0.weight"].all()
    # Through torch.save / torch.load with weights_only, as a checkpoint would.
    import io

    buf = io.BytesIO()
    torch.save(masks.state_dict(), buf)
    buf.seek(0)
    loaded = MaskSet.from_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(loaded[n], k) for n, k in masks.items())


def test_masks_from_model_reads_the_nonzero_pattern():
    model = small_model()
    masks = hard_prune(model, PLAN.resolve(model))
    again = masks_from_model(model, list(masks.masks))
    for name, keep in masks.items():
        # A kept weight could be exactly zero only by chance; with random init none is.
        assert torch.equal(again[name], keep)
