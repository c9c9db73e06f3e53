"""Unused-path removal never changes outputs; purification removes weak groups; both feed compaction."""

import pytest
import torch
from structured_helpers import IMAGE_MODELS, random_structured_masks, randomize_norms

from admmcompress.executors.compact import compact
from admmcompress.executors.purify import nonzero_params, purify, remove_unused_paths
from admmcompress.finalize import MaskSet, hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Column, Filter


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_unused_path_removal_never_changes_outputs(name):
    torch.manual_seed(1)
    model = randomize_norms(create_model(name))
    x = torch.randn(2, *model.input_shape)
    masks = random_structured_masks(model, x)
    fresh = torch.randn(3, *model.input_shape)
    before = outputs(model, fresh)
    report = remove_unused_paths(model, x, masks)
    assert (outputs(model, fresh) - before).abs().max() <= 1e-4
    assert report.nonzero_after <= report.nonzero_before
    assert all(p.max_output_change <= 1e-4 for p in report.passes)
    for name_, mask in report.masks.items():  # the extended masks describe the model exactly
        assert not (dict(model.named_parameters())[name_].detach()[~mask] != 0).any()


def lenet_filter_column(seed=0):
    torch.manual_seed(seed)
    model = create_model("lenet5").eval()
    rules = [
        Rule(Filter(sparsity=0.5), match="conv2"),
        Rule(Column(sparsity=0.6), match="conv2"),
        Rule(Column(sparsity=0.9), match="fc1"),
        Rule(Filter(sparsity=0.5), match="fc1"),
    ]
    masks = hard_prune(model, Plan(rules).resolve(model))
    return model, masks, torch.randn(2, 1, 28, 28)


def test_lenet5_filter_column_paths_are_removed_both_ways_and_reported():
    model, masks, x = lenet_filter_column()
    fresh = torch.randn(5, 1, 28, 28)
    before = outputs(model, fresh)
    with torch.no_grad():  # every column of conv1's channel 3 is gone in conv2: filter 3 of conv1 is unread
        model.conv2.weight[:, 3] = 0
        masks.intersect("conv2.weight", model.conv2.weight != 0)
        before = outputs(model, fresh)
    report = remove_unused_paths(model, x, masks)
    assert (outputs(model, fresh) - before).abs().max() <= 1e-4
    first = report.passes[0]
    assert first.filters.get("conv1", 0) >= 1 and model.conv1.weight[3].abs().sum() == 0
    assert first.channels.get("fc1", 0) > 0  # folded conv2 channels: 16 fc1 columns each
    assert "unused paths, pass 1" in report.describe() and report.nonzero_after < report.nonzero_before
    small = compact(model, x, report.masks)
    assert small.model.conv1.out_channels <= 19 and small.params_after < 431_080 / 4


def test_purification_removes_weak_filters_then_retraining_can_start():
    model, masks, x = lenet_filter_column()
    with torch.no_grad():
        model.conv2.weight[0] *= 1e-3  # a kept filter that carries almost nothing
    report = purify(model, x, masks, threshold=0.05)
    assert report.passes[0].name == "purification" and report.passes[0].filters.get("conv2", 0) >= 1
    assert model.conv2.weight[0].abs().sum() == 0 and not report.masks["conv2.weight"][0].any()
    assert nonzero_params(model) == report.nonzero_after


def test_purify_with_zero_threshold_is_exact_and_threshold_is_checked():
    model, masks, x = lenet_filter_column()
    fresh = torch.randn(3, 1, 28, 28)
    before = outputs(model, fresh)
    report = purify(model, x, masks, threshold=0.0)
    assert all(p.name.startswith("unused paths") for p in report.passes)
    assert (outputs(model, fresh) - before).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="threshold=-1 must be >= 0"):
        purify(model, x, MaskSet(), threshold=-1)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_purify_keeps_the_held_levels_of_a_quantized_model(threshold):
    """purify/remove_unused_paths returned a plain MaskSet: retraining with it moved 2-bit weights off their 4
    levels (a review's finding); the removed weights' codes are pruned too, so apply() cannot revive them."""
    from torch import nn

    from admmcompress.finalize import QuantizedMaskSet, hard_quantize
    from admmcompress.structures import FixedPoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 3))
    plan = Plan([Rule(Filter(sparsity=0.5), match="0"), Rule(FixedPoint(bits=2), type="Conv2d"),
                 Rule(FixedPoint(bits=2), type="Linear")])
    masks = hard_quantize(model, plan.resolve(model))
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))
    out = purify(model, x, masks, threshold=threshold).masks
    assert isinstance(out, QuantizedMaskSet) and set(out.held) == set(masks.held)
    for name, held in out.held.items():
        assert not bool((held.codes[~out.masks[name]] >= 0).any())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out.attach(model, opt)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for name in out.held:
        w = dict(model.named_parameters())[name].detach()
        assert w[w != 0].unique().numel() <= 4 and not bool(w[~out.masks[name]].any())
