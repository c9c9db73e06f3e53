"""Magnitude baselines: the cubic gradual schedule, exact counts, monotone masks, one-shot."""

import copy

import pytest
import torch
from torch import nn

from admmcompress.drivers import GradualMagnitude, one_shot
from admmcompress.finalize import MaskSet, hard_prune
from admmcompress.plan import Plan
from admmcompress.structures import Column, Filter, Unstructured
from admmcompress.structures.groups import kept_count


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 4)
    )


PLAN = Plan.from_dict(
    [
        {"match": "0", "structure": "filter", "sparsity": 0.75},
        {"match": "3", "structure": "unstructured", "compression": 10},
        {"match": "5", "structure": "column", "sparsity": 0.6},
    ]
)


def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def kept_groups(name, mask):
    rows = mask.reshape(mask.shape[0], -1)
    return {
        "0.weight": int(rows.any(dim=1).sum()),  # filters
        "3.weight": int(mask.sum()),  # single weights
        "5.weight": int(rows.any(dim=0).sum()),  # columns
    }[name]


N_GROUPS = {"0.weight": 8, "3.weight": 20 * 128, "5.weight": 20}
FINAL = {"0.weight": 0.75, "3.weight": 0.9, "5.weight": 0.6}


def test_cubic_schedule_values():
    gradual = GradualMagnitude(nn.Linear(10, 10), Plan({"": Unstructured(sparsity=0.9)}), updates=4)
    got = [gradual.sparsity_at(i, 0.8) for i in range(6)]
    expected = [0.8 * (1 - (1 - min(i, 4) / 4) ** 3) for i in range(6)]
    assert got == pytest.approx(expected, abs=1e-15)
    assert got[0] == 0.0 and got[4] == got[5] == 0.8
    assert got == sorted(got)
    assert [round(gradual.sparsity_at(i), 4) for i in (1, 2, 3)] == [0.5781, 0.875, 0.9844]


@pytest.mark.parametrize("updates", [0, -1, None, 2.5, True, "3"])
def test_updates_must_be_a_positive_whole_number(updates):
    with pytest.raises(ValueError, match=f"updates={updates!r} must be a whole number >= 1"):
        GradualMagnitude(nn.Linear(2, 2), Plan({"": Unstructured(sparsity=0.5)}), updates=updates)


def test_each_step_hits_exact_counts_and_masks_only_shrink():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gradual = GradualMagnitude(model, PLAN, updates=5)
    previous = None
    for t in range(1, 6):
        train(model, opt, 10, seed=t)
        if previous is not None:
            previous.detach()
        masks = gradual.step()
        assert gradual.iteration == t
        for name, mask in masks.items():
            sparsity = max(1e-9, gradual.sparsity_at(t, FINAL[name]))
            assert kept_groups(name, mask) == kept_count(N_GROUPS[name], sparsity)
            if previous is not None:
                assert not (mask & ~previous[name]).any(), f"{name}: a pruned weight came back at update {t}"
        masks.attach(model, opt)
        previous = masks
    for name, mask in previous.items():
        assert kept_groups(name, mask) == kept_count(N_GROUPS[name], FINAL[name])
    params = dict(model.named_parameters())
    train(model, opt, 5, seed=99)
    for name, mask in previous.items():
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0


def test_finalize_jumps_to_the_final_sparsity():
    model = small_cnn()
    gradual = GradualMagnitude(model, PLAN, updates=3)
    masks = gradual.finalize()
    assert gradual.iteration == 3
    for name, mask in masks.items():
        assert kept_groups(name, mask) == kept_count(N_GROUPS[name], FINAL[name])
    assert gradual.step() is not masks  # stepping past the end stays at the final sparsity
    assert gradual.iteration == 3
    for name, mask in gradual.masks.items():
        assert torch.equal(mask, masks[name])


def test_final_masks_equal_one_shot_without_training_between_updates():
    model = small_cnn()
    reference = copy.deepcopy(model)
    gradual_masks = GradualMagnitude(model, PLAN, updates=4).finalize()
    shot = one_shot(reference, PLAN)
    for name, mask in shot.items():
        assert torch.equal(gradual_masks[name], mask)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_one_shot_equals_hard_prune():
    model = small_cnn()
    twin = copy.deepcopy(model)
    frozen = MaskSet({"3.weight": torch.rand(20, 128, generator=torch.Generator().manual_seed(1)) > 0.5})
    a = one_shot(model, PLAN, frozen)
    b = hard_prune(twin, PLAN.resolve(twin), frozen)
    assert list(a.masks) == list(b.masks)
    for name, mask in a.items():
        assert torch.equal(mask, b[name])
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    # Resolved targets work as well as a plan.
    fresh = small_cnn()
    again = one_shot(fresh, PLAN.resolve(fresh), frozen)
    assert all(torch.equal(again[n], m) for n, m in a.items())


def test_one_shot_counts_and_magnitudes():
    model = nn.Linear(10, 6)
    before = model.weight.detach().clone()
    masks = one_shot(model, Plan({"": Filter(sparsity=0.5)}))
    keep_rows = masks["weight"].all(dim=1)
    assert int(keep_rows.sum()) == 3
    norms = before.norm(dim=1)
    assert norms[keep_rows].min() >= norms[~keep_rows].max()
    assert torch.equal(model.weight.detach(), before * masks["weight"])


def test_frozen_masks_survive_every_update():
    model = small_cnn()
    frozen_keep = torch.ones(20, 128, dtype=torch.bool)
    frozen_keep[:, :64] = False
    frozen = MaskSet({"3.weight": frozen_keep})
    gradual = GradualMagnitude(model, Plan({"5": Column(sparsity=0.5)}), updates=3, frozen=frozen)
    for _ in range(3):
        masks = gradual.step()
        assert torch.equal(masks["3.weight"], frozen_keep)
        assert torch.count_nonzero(model[3].weight.detach()[:, :64]) == 0


def test_state_dict_round_trip():
    model = small_cnn()
    gradual = GradualMagnitude(model, PLAN, updates=4)
    gradual.step()
    gradual.step()
    state = gradual.state_dict()
    restored = GradualMagnitude(copy.deepcopy(model), PLAN, updates=4)
    restored.load_state_dict(state)
    assert restored.iteration == 2
    for name, mask in gradual.masks.items():
        assert torch.equal(restored.masks[name], mask)
    # The next update from the restored driver matches the original's.
    nxt, nxt_restored = gradual.step(), restored.step()
    assert restored.iteration == gradual.iteration == 3
    for name, mask in nxt.items():
        assert torch.equal(nxt_restored[name], mask)
    for (n, p), (_, q) in zip(model.named_parameters(), restored.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_gradual_stage_keeps_held_quantized_values_through_steps_and_resume(tmp_path):
    from admmcompress.finalize import QuantizedMaskSet, mask_set_from_state
    from admmcompress.train import checkpoint as ckpt

    model = small_cnn()
    first = Plan.from_dict(
        [
            {"match": "3", "structure": "unstructured", "sparsity": 0.8},
            {"match": "3", "structure": "fixed_point", "bits": 2},
        ]
    )
    frozen = hard_prune(model, first.resolve(model))
    assert isinstance(frozen, QuantizedMaskSet) and "3.weight" in frozen.held
    quantized = model[3].weight.detach().clone()
    plan = Plan({"5": Column(sparsity=0.5)})
    gradual = GradualMagnitude(model, plan, updates=3, frozen=frozen)
    masks = gradual.step()
    assert isinstance(masks, QuantizedMaskSet) and torch.equal(masks.held["3.weight"].decode(), quantized)
    # Resume as the runner does: masks and driver state through a checkpoint, a fresh driver.
    ckpt.save_state(tmp_path / "state.pt", {"masks": masks.state_dict(), "driver": gradual.state_dict()})
    state = ckpt.load_state(tmp_path / "state.pt")
    resumed_model = copy.deepcopy(model)
    resumed = GradualMagnitude(resumed_model, plan, updates=3, frozen=mask_set_from_state(state["masks"]))
    resumed.load_state_dict(state["driver"])
    assert isinstance(resumed.masks, QuantizedMaskSet)
    assert torch.equal(resumed.masks.held["3.weight"].decode(), quantized)
    # Held values stay exactly in place while training and through the remaining updates.
    opt = torch.optim.Adam(resumed_model.parameters(), lr=0.1, weight_decay=0.1)
    resumed.masks.attach(resumed_model, opt)
    for _ in range(2):
        resumed_model(torch.randn(4, 2, 6, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        resumed.masks.detach()
        resumed.masks = resumed.step() if resumed.iteration < 3 else resumed.masks
        resumed.masks.attach(resumed_model, opt)
        assert torch.equal(resumed_model[3].weight.detach(), quantized)
    final = resumed.finalize()
    assert isinstance(final, QuantizedMaskSet) and torch.equal(resumed_model[3].weight.detach(), quantized)


def test_pruning_a_held_layer_further_keeps_the_pruned_weights_zero():
    from admmcompress.finalize import QuantizedMaskSet

    model = small_cnn()
    first = Plan.from_dict([{"match": "3", "structure": "fixed_point", "bits": 2}])
    frozen = hard_prune(model, first.resolve(model))
    quantized = model[3].weight.detach().clone()
    gradual = GradualMagnitude(model, Plan({"3": Unstructured(sparsity=0.9)}), updates=2, frozen=frozen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        masks = gradual.step().attach(model, opt)
        model(torch.randn(4, 2, 6, 6)).sum().backward()
        opt.step()
        masks.detach()
        keep = masks["3.weight"]
        assert isinstance(masks, QuantizedMaskSet)
        assert torch.equal(model[3].weight.detach(), quantized * keep)
    assert abs(float(keep.float().mean()) - 0.1) < 0.01
