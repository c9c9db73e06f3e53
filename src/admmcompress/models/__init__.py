"""Benchmark models, built by name: ``create_model("lenet5")``."""

from admmcompress.models import cifar_resnet, lenet, mobilenetv2, vgg  # noqa: F401  (registers the models)
from admmcompress.models.cifar_resnet import CifarResNet
from admmcompress.models.lenet import LeNet5, LeNet300100
from admmcompress.models.mobilenetv2 import MobileNetV2
from admmcompress.models.registry import create_model, list_models, register_model
from admmcompress.models.rnn import GRUClassifier, LSTMLanguageModel  # registers gru_fsdd, lstm_ptb
from admmcompress.models.vgg import VGG

__all__ = [
    "CifarResNet",
    "GRUClassifier",
    "LSTMLanguageModel",
    "LeNet5",
    "LeNet300100",
    "MobileNetV2",
    "VGG",
    "create_model",
    "list_models",
    "register_model",
]
