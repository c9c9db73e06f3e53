"""Save and load compacted models as a shape manifest (JSON) plus a plain safetensors state dict.

A compacted model has other layer widths than its model code builds, so its state dict alone does not
load. The ``compact`` executor's ``save`` writes ``manifest.json`` with the constructor arguments of every
Conv, Linear, BatchNorm and column-executor layer (the shapes) and ``model.safetensors`` with the state
dict; no module is pickled. ``load_compacted`` (the executor's ``load``) builds the model skeleton (by
registry name from the manifest, or the one you pass), replaces those layers with fresh ones of the
recorded shapes, then calls an ordinary ``load_state_dict(strict=True)``: the original widths are never
needed. ``save_compacted`` is the deprecated old name of the save.

Integrity: ``manifest.json`` records the SHA-256 and size of ``model.safetensors`` and its own SHA-256 (of
its canonical JSON, without that key), so a changed byte in either file is refused on load, one
``ManifestError`` line naming the file; so is a malformed manifest (wrong types, unknown layer types or
arguments) and weights whose names or shapes differ from the layers the manifest describes, all checked
on the meta device before any layer is built (a model built from the manifest's spec is refused above
``MAX_MODEL_ELEMENTS``). Manifests written before carry no checksums and still load, with a
``ManifestWarning`` saying so.

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

import hashlib
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from typing_extensions import deprecated

from admmcompress.atomic import atomic_write
from admmcompress.executors.column import ColumnConv2d, ColumnLinear

FORMAT = "admmcompress.compacted/1"
MANIFEST, WEIGHTS = "manifest.json", "model.safetensors"
SELF_CHECKSUM = "sha256"  # the manifest's own checksum: SHA-256 of its canonical JSON without this key
MAX_MANIFEST_BYTES = 1 << 24
MAX_MODEL_ELEMENTS = 1 << 28  # a skeleton built from a manifest's spec: at most 2^28 elements (1 GiB of float32)


class ManifestError(ValueError):
    """A compacted-model folder that cannot be loaded as it is (corrupt, malformed, or for another model); one
    line naming the file and what is wrong."""


class ManifestWarning(UserWarning):
    """A compacted-model manifest written before checksums: corruption of its files cannot be detected."""


def _fail(message: str) -> NoReturn:
    raise ManifestError(message)


def canonical_sha256(value: Any) -> str:
    """SHA-256 of ``value``'s canonical JSON (sorted keys, no spaces): the same for every way of writing it.

    >>> canonical_sha256({"b": 1, "a": [1.0, "x"]}) == canonical_sha256(json.loads('{ "a": [1.0, "x"], "b": 1 }'))
    True
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


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
    weights = save_safetensors(state, metadata={"format": FORMAT})
    manifest["weights"] = {"file": WEIGHTS, "bytes": len(weights), "sha256": sha256_hex(weights)}
    manifest[SELF_CHECKSUM] = canonical_sha256(manifest)
    # Weights first, manifest last (both atomic): a manifest on disk always names complete weights.
    atomic_write(folder / WEIGHTS, lambda tmp: tmp.write_bytes(weights))
    text = json.dumps(manifest, indent=1)
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(text))
    return folder


@deprecated(
    "save_compacted(model, folder, model_spec) is deprecated; use "
    "admmcompress.executors.get_executor('compact').save(model, folder, model_spec=model_spec)"
)
def save_compacted(model: nn.Module, folder: str | Path, model_spec: dict[str, Any] | None = None) -> Path:
    """Deprecated old name: ``get_executor("compact").save(model, folder, model_spec=...)``."""
    return _write_compacted(model, folder, model_spec)


def load_compacted(folder: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a compacted model from ``folder``: skeleton -> recorded layer shapes -> state dict.

    Checks first, builds after: both checksums, the manifest's structure, every layer's arguments (on the
    meta device) and the weights' names and shapes against the layers; any failure is one ``ManifestError``.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"'{folder}' has no {MANIFEST}; give the folder written by the compact executor's save")
    manifest = read_compact_manifest(path)
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"'{folder}' has no {WEIGHTS} beside its {MANIFEST}; save the compacted model again")
    data = weights_path.read_bytes()
    recorded = manifest.get("weights")
    if recorded is not None and (len(data) != recorded["bytes"] or sha256_hex(data) != recorded["sha256"]):
        _fail(
            f"'{weights_path}' is not the file its manifest records ({len(data):,} bytes, SHA-256 "
            f"{sha256_hex(data)[:16]}..., the manifest: {recorded['bytes']:,} bytes, {recorded['sha256'][:16]}...): "
            "it was changed or damaged; save the compacted model again"
        )
    try:
        state = load_safetensors(data)
    except Exception as err:  # safetensors' own error type: a damaged file, said in one line
        _fail(f"'{weights_path}' is not a readable safetensors file ({type(err).__name__}: {err})")
    if recorded is None:
        warnings.warn(
            f"'{path}' was written before compacted models carried checksums: corruption cannot be detected; "
            "save it again to add them",
            ManifestWarning,
            stacklevel=2,
        )
    with _named(path):
        skeleton = model if model is not None else _skeleton(manifest["model"], "meta")
        layers = {name: _build(name, dict(layer), "meta") for name, layer in manifest["layers"].items()}
        expected = _expected_state(skeleton, layers)
        if model is None:  # the skeleton is built at its full widths first: bound it too
            full = sum(v.numel() for v in skeleton.state_dict().values())
            elements = max(full, sum(math.prod(shape) for _, shape in expected.values()))
            if elements > MAX_MODEL_ELEMENTS:
                _fail(f"describes {elements:,} elements (more than {MAX_MODEL_ELEMENTS:,}); pass the skeleton")
        found = {k: (str(v.dtype), tuple(v.shape)) for k, v in state.items()}
        if found != expected:
            wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
            _fail(f"'{weights_path}' does not fit the layers its manifest describes (first differences: {wrong[:4]})")
        if model is None:
            model = _skeleton(manifest["model"])  # only now: everything checked
        for name, layer in manifest["layers"].items():
            _replace(model, name, _build(name, dict(layer)))
        model.load_state_dict(state, strict=True)
        parameters = manifest.get("parameters")
        if parameters is not None and parameters != sum(p.numel() for p in model.parameters()):
            _fail(f"records {parameters:,} parameters, the model it describes has another count")
    return model


def read_compact_manifest(path: str | Path) -> dict[str, Any]:
    """``manifest.json`` read and checked: JSON, its own checksum, format and the types of every field."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        _fail(f"'{path}' is {len(raw):,} bytes; a compacted-model manifest is far smaller (corrupt?)")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        _fail(f"'{path}' is not valid JSON ({err}): the file is damaged; save the compacted model again")
    if not isinstance(manifest, dict):
        _fail(f"'{path}' is not a compacted-model manifest (a JSON {type(manifest).__name__}, not an object)")
    recorded = manifest.get(SELF_CHECKSUM)
    if recorded is not None:
        actual = canonical_sha256({k: v for k, v in manifest.items() if k != SELF_CHECKSUM})
        if recorded != actual:
            _fail(f"'{path}' does not match its own SHA-256 (recorded {str(recorded)[:16]}..., now {actual[:16]}...): "
                  "it was changed or damaged; save the compacted model again")
    elif "weights" in manifest:  # written with checksums, but its own is gone: damaged, not old
        _fail(f"'{path}' records its weights' checksum but lost its own ('{SELF_CHECKSUM}'): the file is damaged")
    if manifest.get("format") != FORMAT:
        _fail(f"'{path}' has format {manifest.get('format')!r}, expected {FORMAT!r}")
    _check_fields(manifest, path)
    return manifest


def _check_fields(manifest: dict[str, Any], path: Path) -> None:
    spec, layers, weights = manifest.get("model"), manifest.get("layers"), manifest.get("weights")
    if spec is not None and not (
        isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs", {}), dict)
    ):
        _fail(f"'{path}': 'model' must be null or {{\"name\": str, \"kwargs\": {{...}}}}, not {spec!r}")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        _fail(f"'{path}': 'layers' must map layer names to their arguments")
    if weights is not None and not (
        isinstance(weights, dict) and isinstance(weights.get("bytes"), int) and isinstance(weights.get("sha256"), str)
    ):
        _fail(f"'{path}': 'weights' must be {{\"file\", \"bytes\": int, \"sha256\": str}}, not {weights!r}")
    parameters = manifest.get("parameters")
    if parameters is not None and (not isinstance(parameters, int) or isinstance(parameters, bool)):
        _fail(f"'{path}': 'parameters' must be an integer, not {parameters!r}")


def _skeleton(spec: dict[str, Any] | None, device: str = "cpu") -> nn.Module:
    if not spec:
        raise ValueError(
            "names no registered model; pass the skeleton: load_compacted(folder, MyModel())"
        )
    from admmcompress.models import create_model

    with torch.device(device):
        return create_model(spec["name"], **spec.get("kwargs", {}))


def _expected_state(skeleton: nn.Module, layers: dict[str, nn.Module]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, dtypes and shapes of the state dict once ``layers`` replace the skeleton's modules of their names."""
    state = {k: (str(v.dtype), tuple(v.shape)) for k, v in skeleton.state_dict().items()}
    for name in layers:
        if not name:
            _fail("has a layer with an empty name (the whole model); save such a model with its own state dict")
        parent = name.rpartition(".")[0]
        try:
            skeleton.get_submodule(parent) if parent else skeleton
        except AttributeError:
            _fail(f"names layer '{name}', but the skeleton has no module '{parent}' (another architecture?)")
        state = {k: v for k, v in state.items() if not k.startswith(f"{name}.")}
    for name, layer in layers.items():
        state.update({f"{name}.{k}": (str(v.dtype), tuple(v.shape)) for k, v in layer.state_dict().items()})
    return state


class _named:
    """Prefix ``ManifestError`` lines with the manifest's path; anything else the build raises becomes one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, err: BaseException | None, _tb: Any) -> None:
        if err is None or not isinstance(err, Exception) or isinstance(err, OSError):
            return
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if text.startswith("'"):  # already names its file
            raise ManifestError(text) from None
        if isinstance(err, ManifestError) or type(err) is ValueError:
            raise ManifestError(f"'{self.path}' {text}") from None
        raise ManifestError(f"'{self.path}' cannot be loaded ({type(err).__name__}: {text})") from None


def _build(name: str, layer: dict[str, Any], device: str = "cpu") -> nn.Module:
    """One layer from its recorded arguments (``device="meta"``: checked and shaped, nothing allocated)."""
    kind = layer.pop("type", None)
    if kind not in BUILDERS:
        raise ValueError(
            f"has layer '{name}' of type {kind!r}, which load_compacted cannot build; known: {sorted(BUILDERS)}"
        )
    if kind not in ("ColumnConv2d", "ColumnLinear"):
        layer = {k: tuple(v) if isinstance(v, list) else v for k, v in layer.items()}
    try:
        with torch.device(device):
            return BUILDERS[kind](**layer)
    except Exception as err:  # arguments from a file: say which layer, in one line
        _fail(f"has layer '{name}' ({kind}) with arguments it cannot be built from ({type(err).__name__}: {err})")


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


__all__ = [
    "ManifestError",
    "ManifestWarning",
    "canonical_sha256",
    "load_compacted",
    "read_compact_manifest",
    "save_compacted",
    "sha256_hex",
    "shape_manifest",
]
