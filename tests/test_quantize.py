"""Hard quantization and retraining: values held bit-exactly, centroids learned, joint prune+quantize."""

import pytest
import torch
from torch import nn

from admmcompress import ADMM, Plan, compress
from admmcompress.data.datasets import Split
from admmcompress.finalize import (
    MaskSet,
    QuantizedMaskSet,
    hard_prune,
    hard_quantize,
    mask_set_from_state,
    release_holds,
)

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
}

JOINT = Plan.from_dict(
    [
        {"match": "0", "structure": "unstructured", "sparsity": 0.8},
        {"match": "0", "structure": "fixed_point", "bits": 3},
        {"match": "3", "structure": "ternary"},
        {"match": "5", "structure": "clustering", "clusters": 4},
    ]
)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3)
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


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_quantized_values_are_unchanged_by_retraining_and_clusters_keep_k_values(make_opt):
    model = small_model()
    opt = make_opt(model.parameters())
    train(model, opt, 5, seed=7)  # stale momentum / moments everywhere
    final = hard_prune(model, JOINT.resolve(model))
    assert isinstance(final, QuantizedMaskSet)
    params = dict(model.named_parameters())
    held_before = {n: params[n].detach().clone() for n in ("0.weight", "3.weight")}
    codes_before = final.held["5.weight"].codes.clone()
    other_before = params["0.bias"].detach().clone()
    final.attach(model, opt)
    train(model, opt, 60)
    for name, before in held_before.items():
        assert torch.equal(params[name].detach(), before), f"{name} moved during retraining"
    assert not torch.equal(params["0.bias"].detach(), other_before)  # the rest really trained
    clustered = params["5.weight"].detach()
    assert torch.unique(clustered).numel() <= 4
    assert torch.equal(final.held["5.weight"].codes, codes_before)
    assert torch.equal(clustered, final.held["5.weight"].decode())


def test_joint_prune_then_quantize_keeps_the_kept_weights_on_levels():
    model = small_model()
    final = hard_prune(model, JOINT.resolve(model))
    w = model[0].weight.detach()
    assert int((w != 0).sum()) == round(w.numel() * 0.2)  # pruning target met exactly
    assert torch.unique(w[w != 0]).numel() <= 8  # 3 bits on the kept weights
    assert torch.equal(final["0.weight"], w != 0)
    # Ternary zeros are added to the masks: they stay pruned.
    t = model[3].weight.detach()
    assert torch.equal(final["3.weight"], t != 0) and (t == 0).any()
    assert torch.unique(t[t != 0].abs()).numel() == 1


def test_admm_with_quantization_targets_finalizes_to_held_levels():
    model = small_model()
    admm = ADMM(model, JOINT, rho=1e-2)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    for _ in range(3):
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(x), y) + admm.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        admm.step()
    assert set(admm.state) == {
        "0.weight:unstructured",
        "0.weight:fixed_point",
        "3.weight:ternary",
        "5.weight:clustering",
    }
    final = admm.finalize()
    assert isinstance(final, QuantizedMaskSet) and set(final.held) == {"0.weight", "3.weight", "5.weight"}


def test_state_dict_round_trip_and_release():
    model = small_model()
    final = hard_prune(model, JOINT.resolve(model))
    restored = mask_set_from_state(final.state_dict())
    assert isinstance(restored, QuantizedMaskSet)
    for name, held in final.held.items():
        assert (
            torch.equal(restored.held[name].codes, held.codes) and restored.held[name].update == held.update
        )
    assert type(mask_set_from_state(MaskSet({"a": torch.ones(2, dtype=torch.bool)}).state_dict())) is MaskSet
    targets = Plan.from_dict([{"match": "0", "structure": "fixed_point", "bits": 2}]).resolve(model)
    released = release_holds(final, targets)
    assert set(released.held) == {"3.weight", "5.weight"} and set(released.masks) == set(final.masks)


def test_hard_quantize_without_masks_prunes_first():
    model = small_model()
    final = hard_quantize(model, JOINT.resolve(model))
    w = model[0].weight.detach()
    assert int(final["0.weight"].sum()) == int((w != 0).sum()) == round(36 * 0.2)
    assert torch.unique(w[w != 0]).numel() <= 8


def test_progressive_quantization_stages_8_4_2_bits_keep_pruned_zeros():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    data = Split(x, y)
    model = small_model()
    prune = Plan.from_dict([{"match": "3", "structure": "unstructured", "sparsity": 0.75}])
    plans = [prune] + [
        Plan.from_dict(
            [
                {"type": "Linear", "structure": "fixed_point", "bits": b},
                {"match": "0", "structure": "fixed_point", "bits": 8},
            ]
        )
        for b in (8, 4, 2)
    ]
    result = compress(
        model, plans, data, data, admm={"epochs": 1, "rho": 1e-2}, retrain={"epochs": 1}, batch_size=32
    )
    w3 = model[3].weight.detach()
    assert int((w3 != 0).sum()) == round(w3.numel() * 0.25)  # pruned in stage 1, still pruned after 3 more
    assert torch.unique(w3[w3 != 0]).numel() <= 4 and torch.unique(model[5].weight.detach()).numel() <= 4
    assert torch.unique(model[0].weight.detach()).numel() <= 256
    assert isinstance(result.masks, QuantizedMaskSet)
    assert result.metrics["storage"]["storage_reduction"]["best"] > 1


def test_iterative_partial_quantization_freezes_a_growing_share_on_fixed_levels():
    from admmcompress.finalize import partial_quantize

    model = small_model()
    targets = Plan.from_dict([{"match": "3", "structure": "fixed_point", "bits": 2}]).resolve(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    state, shares = None, []
    for fraction in (0.3, 0.3, 0.5, 1.0):
        if state is not None:
            state.detach()
        state = partial_quantize(model, targets, fraction, state)
        held = state.held["3.weight"]
        w = model[3].weight.detach()
        frozen_values = w[held.frozen].clone()
        assert torch.equal(frozen_values, held.decode()[held.frozen])  # frozen entries sit on a level
        shares.append(float(held.frozen.float().mean()))
        free_before = w[~held.frozen].clone()
        state.attach(model, opt)
        train(model, opt, 10)
        w = model[3].weight.detach()
        assert torch.equal(w[held.frozen], frozen_values)  # held bit-exactly while the rest trains
        if (~held.frozen).any():
            assert not torch.equal(w[~held.frozen], free_before)
    assert shares == sorted(shares) and shares[0] == pytest.approx(0.3, abs=0.01) and shares[-1] == 1.0
    assert torch.unique(model[3].weight.detach()).numel() <= 4
    restored = mask_set_from_state(state.state_dict())
    assert torch.equal(restored.held["3.weight"].frozen, state.held["3.weight"].frozen)
    with pytest.raises(ValueError, match=r"fraction=0 must be in \(0, 1\]"):
        partial_quantize(model, targets, 0)


def test_a_quantization_pattern_leaves_norm_scales_alone_and_naming_one_is_refused():
    """{match: '*'} quantized a LayerNorm's scale to 2 bits: no storage saved (kept with the biases), accuracy lost."""
    from admmcompress.plan import PlanError

    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    targets = Plan.from_dict([{"match": "*", "structure": "fixed_point", "bits": 2}]).resolve(model)
    assert [t.param_name for t in targets] == ["0.weight", "3.weight"]
    with pytest.raises(PlanError, match=r"layer '1' \(LayerNorm\) has a 1-D weight .* drop it from the rule"):
        Plan.from_dict([{"match": "1", "structure": "fixed_point", "bits": 2}]).resolve(model)
