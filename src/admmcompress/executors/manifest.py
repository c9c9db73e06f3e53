"""Save and load compacted models as a shape manifest (JSON) plus a plain safetensors state dict.

A compacted model has other layer widths than its model code builds, so its state dict alone does not
load. The ``compact`` executor's ``save`` writes ``manifest.json`` with the constructor arguments of every
Conv, Linear, BatchNorm and column-executor layer (the shapes) and ``model.safetensors`` with the state
dict; no module is pickled. ``load_compacted`` (the executor's ``load``) builds the model skeleton (by
registry name from the manifest, or the one you pass), replaces those layers with fresh ones of the
recorded shapes, then calls an ordinary ``load_state_dict(strict=True)``: the original widths are never
needed. ``save_compacted`` is the deprecated old name of the save.

>>> import tempfile
>>> from admmcompress.executors import get_executor
>>> model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 1))
>>> folder = tempfile.mkdtemp()
>>> _ = get_executor("compact").save(model, folder)
>>> skeleton = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 2, 1))   # other widths
>>> load_compacted(folder, skeleton)[0].out_channels
5
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn
from typing_extensions import deprecated

from admmcompress.executors.column import ColumnConv2d, ColumnLinear

FORMAT = "admmcompress.compacted/1"
MANIFEST, WEIGHTS = "manifest.json", "model.safetensors"


def _conv_spec(m: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _bn_spec(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


SPECS: dict[type, Callable[[nn.Module], dict[str, Any]]] = {
    nn.Conv1d: _conv_spec,
    nn.Conv2d: _conv_spec,
    nn.Conv3d: _conv_spec,
    nn.BatchNorm1d: _bn_spec,
    nn.BatchNorm2d: _bn_spec,
    nn.BatchNorm3d: _bn_spec,
    nn.Linear: lambda m: {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    },
    ColumnConv2d: lambda m: {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "columns": m.kept.numel(),
        "stride": list(m.stride),
        "padding": list(m.padding),
        "dilation": list(m.dilation),
        "bias": m.bias is not None,
    },
    ColumnLinear: lambda m: {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "columns": m.kept.numel(),
        "bias": m.bias is not None,
    },
}
BUILDERS: dict[str, type] = {cls.__name__: cls for cls in SPECS}


def shape_manifest(model: nn.Module, model_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready manifest: format, the optional registered ``{"name", "kwargs"}``, layer shapes."""
    layers = {
        name: {"type": type(m).__name__, **SPECS[type(m)](m)}
        for name, m in model.named_modules()
        if type(m) in SPECS
    }
    return {
        "format": FORMAT,
        "model": model_spec,
        "layers": layers,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _write_compacted(model: nn.Module, folder: str | Path, model_spec: dict[str, Any] | None = None) -> Path:
    """Write ``manifest.json`` and ``model.safetensors`` into ``folder``; returns the folder.

    ``model_spec`` (e.g. ``{"name": "resnet20", "kwargs": {"num_classes": 10}}``) lets ``load_compacted``
    build the skeleton from the model registry without being given one. Package-internal: call it as
    ``get_executor("compact").save(model, folder, model_spec=...)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = shape_manifest(model, model_spec)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


@deprecated(
    "save_compacted(model, folder, model_spec) is deprecated; use "
    "admmcompress.executors.get_executor('compact').save(model, folder, model_spec=model_spec)"
)
def save_compacted(model: nn.Module, folder: str | Path, model_spec: dict[str, Any] | None = None) -> Path:
    """Deprecated old name: ``get_executor("compact").save(model, folder, model_spec=...)``."""
    return _write_compacted(model, folder, model_spec)


def load_compacted(folder: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a compacted model from ``folder``: skeleton -> recorded layer shapes -> state dict."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"'{folder}' has no {MANIFEST}; give the folder written by the compact executor's save")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"'{path}' has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if model is None:
        spec = manifest.get("model")
        if not spec:
            raise ValueError(
                f"'{path}' names no registered model; pass the skeleton: load_compacted(folder, MyModel())"
            )
        from admmcompress.models import create_model

        model = create_model(spec["name"], **spec.get("kwargs", {}))
    for name, layer in manifest["layers"].items():
        _replace(model, name, _build(name, dict(layer)))
    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    return model


def _build(name: str, layer: dict[str, Any]) -> nn.Module:
    kind = layer.pop("type")
    if kind not in BUILDERS:
        raise ValueError(
            f"layer '{name}' has type {kind!r}, which load_compacted cannot build; known: {sorted(BUILDERS)}"
        )
    if kind in ("ColumnConv2d", "ColumnLinear"):
        return BUILDERS[kind](**layer)
    return BUILDERS[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in layer.items()})


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise ValueError(
            f"the skeleton has no module '{parent_name}' for layer '{name}'; "
            "is it the same architecture the manifest was saved from?"
        ) from None
    if not name:
        raise ValueError("the whole model is a single layer; save it with torch's own state dict instead")
    setattr(parent, child, module)


__all__ = ["load_compacted", "save_compacted", "shape_manifest"]
