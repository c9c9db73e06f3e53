"""A registry of benchmark models by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from admmcompress.messages import first_line, short_repr

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    if name in _MODELS:
        raise ValueError(f"model '{name}' is already registered")
    _MODELS[name] = factory


def list_models() -> list[str]:
    return sorted(_MODELS)


# A model spec read from a file is bounded before anything is built: a width far past any real model, or a layer
# count that takes minutes to build even on the meta device, is a damaged or crafted file (the loaders then
# bound the built model's elements too).
MAX_SPEC_INT = 1 << 24
MAX_SPEC_LAYERS = 1024
_LAYER_COUNT_KEYS = ("layers", "depth", "blocks")


def spec_problem(kwargs: Any, limit: int = MAX_SPEC_INT) -> str | None:
    """Why a model spec's ``kwargs`` (read from a file) must not be built, or None: only JSON scalars and short
    lists, integers up to ``MAX_SPEC_INT``, layer counts up to ``MAX_SPEC_LAYERS``.

    >>> spec_problem({"hidden": [500, 100], "dropout": 0.5}) is None
    True
    >>> print(spec_problem({"num_layers": 100000}))
    num_layers=100000 is above 1024 (a layer count); the file is damaged or not from admmcompress
    """
    if not isinstance(kwargs, dict):
        return f"its model arguments are a {type(kwargs).__name__}, not a mapping"
    for key, value in kwargs.items():
        values = value if isinstance(value, list) else [value]
        if len(values) > MAX_SPEC_LAYERS or not all(
            v is None or isinstance(v, (bool, int, float, str)) for v in values
        ):
            return f"{key}={str(value)[:60]} is not a short list of numbers or names"
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool):
                cap = MAX_SPEC_LAYERS if any(word in str(key).lower() for word in _LAYER_COUNT_KEYS) else limit
                if abs(v) > cap:
                    kind = " (a layer count)" if cap == MAX_SPEC_LAYERS else ""
                    return f"{key}={v} is above {cap}{kind}; the file is damaged or not from admmcompress"
    return None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("lenet5", dropout=0.5)``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; registered models: {', '.join(list_models())} (a model your code "
                         "or a plugin registers: import it first, or pass the model itself)")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"model '{name}': bad arguments {short_repr(kwargs, 200)}: {first_line(err)}") from None
    # a value the layers refuse (dropout 2.0: ValueError; num_classes -1 or a width past memory: RuntimeError,
    # MemoryError): torch's text, with the model and arguments
    except (ValueError, RuntimeError, MemoryError) as err:
        raise ValueError(
            f"model '{name}' {short_repr(kwargs, 200)}: {first_line(err)}; fix the model's arguments"
        ) from None

