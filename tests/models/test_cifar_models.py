"""CIFAR models (no torchvision): parameter counts, shapes, width multipliers, registry."""

import pytest
import torch

from admmcompress.models import create_model, list_models
from admmcompress.models.widths import scaled
from admmcompress.structures.groups import kept_count

CIFAR = ["resnet20", "resnet56", "resnet18_cifar", "vgg16_cifar", "mobilenetv2_cifar"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_cifar_models_are_registered():
    assert set(CIFAR) <= set(list_models())


@pytest.mark.parametrize(
    ("name", "params", "half"),
    [
        ("resnet20", 272_474, 68_786),  # 269,722 with option-A shortcuts + 2,752 for the two 1x1 projections
        ("resnet56", 855_770, 215_282),
        ("resnet18_cifar", 11_173_962, 2_797_610),  # BENCHMARKING.md reference counts (full and x0.5)
        ("vgg16_cifar", 14_724_042, 3_684_842),
        ("mobilenetv2_cifar", 2_236_682, None),
    ],
)
def test_parameter_counts(name, params, half):
    assert n_params(create_model(name)) == params
    if half is not None:
        assert n_params(create_model(name, width_mult=0.5)) == half


@pytest.mark.parametrize("name", CIFAR)
def test_forward_shape_and_declared_input(name):
    model = create_model(name, num_classes=7).eval()
    assert model.input_shape == (3, 32, 32)
    with torch.no_grad():
        assert model(torch.zeros(2, *model.input_shape)).shape == (2, 7)


def test_width_multiplier_rounds_like_structured_pruning():
    for channels in (3, 16, 64, 100, 512):
        for mult in (0.25, 0.5, 0.75):
            assert scaled(channels, mult) == kept_count(channels, 1 - mult)
    with pytest.raises(ValueError, match="width_mult=0 must be > 0"):
        scaled(16, 0)


def test_bad_vgg_config_names_the_entry():
    from admmcompress.models.vgg import VGG

    with pytest.raises(ValueError, match="VGG config entry 'X'"):
        VGG((8, "X"))
