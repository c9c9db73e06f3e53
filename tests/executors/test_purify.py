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
