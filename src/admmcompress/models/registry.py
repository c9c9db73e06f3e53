"""A registry of benchmark models by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    if name in _MODELS:
        raise ValueError(f"model '{name}' is already registered")
    _MODELS[name] = factory


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("lenet5", dropout=0.5)``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; registered models: {', '.join(list_models())}")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"model '{name}': bad arguments {kwargs}: {err}") from None
    except ValueError as err:  # a value the layers refuse (dropout 2.0): torch's text, with the model and arguments
        raise ValueError(f"model '{name}' {kwargs}: {err}; fix the model's arguments") from None
