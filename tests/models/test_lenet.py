"""LeNet models and the model registry."""

import pytest
import torch

from admmcompress.models import LeNet5, LeNet300100, create_model, list_models, register_model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_lenet5_parameter_count_and_layers():
    model = LeNet5()
    assert n_params(model) == 431_080
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {
        "conv1.weight": (20, 1, 5, 5),
        "conv1.bias": (20,),
        "conv2.weight": (50, 20, 5, 5),
        "conv2.bias": (50,),
        "fc1.weight": (500, 800),
        "fc1.bias": (500,),
        "fc2.weight": (10, 500),
        "fc2.bias": (10,),
    }


def test_lenet300100_parameter_count_and_layers():
    model = LeNet300100()
    assert n_params(model) == 266_610
    assert [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")] == [
        (300, 784),
        (100, 300),
        (10, 100),
    ]


@pytest.mark.parametrize("name", ["lenet5", "lenet300100"])
def test_forward_shapes_on_mnist_sized_input(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


def test_dropout_is_only_active_in_training():
    torch.manual_seed(0)
    model = create_model("lenet5", dropout=0.5)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x), model(x))


def test_create_model_passes_arguments():
    assert create_model("lenet5", num_classes=7)(torch.zeros(1, 1, 28, 28)).shape == (1, 7)
    assert create_model("lenet300100", num_classes=3)(torch.zeros(1, 1, 28, 28)).shape == (1, 3)


def test_registry_lists_models():
    assert {"lenet5", "lenet300100"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_create_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'lenet6'; registered models: .*lenet300100, lenet5"):
        create_model("lenet6")


def test_create_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"model 'lenet5': bad arguments \{'width': 2\}"):
        create_model("lenet5", width=2)


def test_register_model_refuses_duplicates():
    with pytest.raises(ValueError, match="model 'lenet5' is already registered"):
        register_model("lenet5", LeNet5)
