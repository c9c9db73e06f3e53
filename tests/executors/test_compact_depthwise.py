"""Compaction of depthwise convolutions (MobileNetV2 CIFAR), also next to a grouped conv."""

import pytest
import torch
from structured_helpers import IMAGE_MODELS, random_structured_masks, randomize_norms
from test_compact import Branches
from torch import nn

from admmcompress.data.datasets import Split
from admmcompress.executors.compact import CompactionError, compact
from admmcompress.finalize import hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Filter
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import Runner

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def depthwise(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
    }


def test_mobilenetv2_is_registered_and_checked_by_the_every_model_test():
    assert "mobilenetv2_cifar" in IMAGE_MODELS
    assert len(depthwise(create_model("mobilenetv2_cifar"))) == 17


@pytest.mark.parametrize("mode", ["strict", "extend"])
def test_coupled_filter_pruning_halves_every_depthwise_conv_of_mobilenetv2(mode):
    torch.manual_seed(0)
    model = randomize_norms(create_model("mobilenetv2_cifar"))
    x = torch.randn(2, 3, 32, 32)
    targets = Plan([Rule(Filter(sparsity=0.5), type="Conv2d")]).resolve_coupled(model, x, mode)
    masks = hard_prune(model, targets)
    result = compact(model, x, masks)
    before, after = depthwise(model), depthwise(result.model)
    assert before.keys() == after.keys()
    for name, conv in after.items():
        full = before[name].out_channels
        assert conv.groups == conv.in_channels == conv.out_channels == full - round(full * 0.5), name
    fresh = torch.randn(3, 3, 32, 32)
    assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_random_structured_masks_remove_depthwise_channels_with_the_same_outputs():
    torch.manual_seed(1)
    model = randomize_norms(create_model("mobilenetv2_cifar"))
    x = torch.randn(2, 3, 32, 32)
    result = compact(model, x, random_structured_masks(model, x, sparsity=0.3))
    assert all(
        small.groups < full.groups
        for small, full in zip(depthwise(result.model).values(), depthwise(model).values(), strict=True)
    )
    fresh = torch.randn(4, 3, 32, 32)
    assert (outputs(result.model, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_a_mobilenetv2_run_config_with_coupling_compacts(tmp_path):
    torch.manual_seed(0)
    spec = {
        "model": {"name": "mobilenetv2_cifar"},
        "pretrain": {"epochs": 0},
        "data": {"batch_size": 4},
        "compact": {"samples": 2},
        "stages": [
            {
                "plan": {"rules": [{"type": "Conv2d", "structure": "filter", "sparsity": 0.5}]},
                "coupling": "strict",
                "method": "gradual",
                "admm": {"epochs": 1, "update_every_steps": 1},
                "retrain": {"epochs": 0},
            }
        ],
    }
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
    model = create_model("mobilenetv2_cifar")
    metrics = Runner(RunConfig.from_dict(spec), model, data, data, out_dir=tmp_path, progress=False).run()
    figures = metrics["compaction"]
    assert figures["macs_after"] < figures["macs_before"] / 2 and figures["max_abs_diff"] <= 1e-4
    assert (tmp_path / "compact" / "manifest.json").is_file()


def test_a_grouped_conv_after_a_depthwise_conv_keeps_its_groups():
    torch.manual_seed(0)
    model = randomize_norms(Branches(grouped=True))
    x = torch.randn(2, 3, 8, 8)
    plan = Plan([Rule(Filter(sparsity=0.5), match=n) for n in ("c", "dw")])
    masks = hard_prune(model, plan.resolve_coupled(model, x))
    small = compact(model, x, masks).model
    assert (small.dw.groups, small.g.in_channels, small.g.groups) == (4, 4, 2)  # 2 of 3 kept per conv group of g
    fresh = torch.randn(3, 3, 8, 8)
    assert (outputs(small, fresh) - outputs(model, fresh)).abs().max() <= 1e-4


def test_uncoupled_masks_uneven_across_a_grouped_convs_groups_name_the_layer_and_the_fix():
    model = randomize_norms(Branches(grouped=True))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # channels 0-2 (all of g's first conv group) zero, filters + BN
        model.c.weight[:3] = 0
        model.bn2.weight[:3] = 0
        model.bn2.bias[:3] = 0
    with pytest.raises(CompactionError, match=r"grouped conv 'g' \(groups=2\) needs the same number.*resolve_coupled"):
        compact(model, x)
