"""Benchmark models, built by name: ``create_model("lenet5")``."""

from admmcompress.models import lenet  # noqa: F401  (registers the models)
from admmcompress.models.lenet import LeNet5, LeNet300100
from admmcompress.models.registry import create_model, list_models, register_model

__all__ = ["LeNet5", "LeNet300100", "create_model", "list_models", "register_model"]
