"""Save and load compacted models as a shape manifest (JSON) plus a plain safetensors state dict.

A compacted model has other layer widths than its model code builds, so its state dict alone does not
load. The ``compact`` executor's ``save`` writes ``manifest.json`` with the constructor arguments of every
Conv, Linear, BatchNorm and column-executor layer (the shapes) and ``model.safetensors`` with the state
dict; no module is pickled. ``load_compacted`` (the executor's ``load``) builds the model skeleton (by
registry name from the manifest, or the one you pass), replaces those layers with fresh ones of the
recorded shapes, then calls an ordinary ``load_state_dict(strict=True)``: the original widths are never
needed. ``save_compacted`` is the deprecated old name of the save.

Factorized convs (``Tucker2Conv``, ``SharedKernelConv``: what a low-rank target leaves where the model code builds a
plain conv) are recorded whole, by their widths and factor sizes (Tucker-2 ranks, number of basis kernels), and
built in the skeleton's conv's place; a Tucker2Conv's three convs are not recorded again.

Transformers (a skeleton built from the ORIGINAL config, passed by the caller): the manifest also records
LayerNorms (``WidthKeepingLayerNorm`` with its full width) and Embeddings as layers; under ``tensors`` the
shape of every parameter held by a module it does not know (RMSNorm weights, ViT's position embeddings and
class token, ConvNeXt's layer scale), re-created as zeros of that shape before the state dict loads; under
``attributes`` the head counts the head executor lowers (``num_heads``, ``num_attention_heads``, ``n_heads``,
``num_key_value_heads``, ``all_head_size``, ``split_size``; also the head size and ``scaling``, which a skeleton
built from a compacted config gets wrong) and an RMSNorm's ``variance_epsilon``, per module; under
``width_attributes`` the width attributes an attention layout names (``AttentionLayout.width_attrs``:
DistilBERT's ``dim``), per attention block only: ``dim`` is too common a name to record on every module
(``nn.Softmax(dim=-1)``), so the loader accepts one only where the skeleton's layout of that block names it;
under ``config`` the fields compaction edits (``hidden_size``, ``hidden_sizes``, ``rms_norm_eps``); under
``tied`` the groups of parameter names that are one tensor (an LM head sharing the token embedding), saved once
per name and tied again after loading. Each must
name something the skeleton has, of the same kind (rank, integer or float), or the load is refused in one line
before anything changes. Manifests without these keys load as before.

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
>>> small = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
>>> _ = get_executor("compact").save(small, folder)
>>> load_compacted(folder, nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)))[1].normalized_shape
(3,)
"""

from __future__ import annotations

import errno
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

from admmcompress.atomic import WriteError, atomic_folder, atomic_write
from admmcompress.executors.column import ColumnConv2d, ColumnLinear
from admmcompress.executors.penni import SharedKernelConv
from admmcompress.executors.tucker import Tucker2Conv
from admmcompress.module_swap import replace_module
from admmcompress.plan.attention import (
    ALL_HEADS_ATTRS,
    HEAD_COUNT_ATTRS,
    HEAD_SIZE_ATTRS,
    KV_COUNT_ATTRS,
    attention_layouts,
)
from admmcompress.plan.residual import WidthKeepingLayerNorm, tied_parameters

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
SPECS.update({
    nn.LayerNorm: lambda m: {
        "normalized_shape": list(m.normalized_shape),
        "eps": float(m.eps),
        "elementwise_affine": m.weight is not None,
        "bias": m.bias is not None,
    },
    WidthKeepingLayerNorm: lambda m: {
        "normalized_shape": m.normalized_shape[-1],
        "full_width": m.full_width,
        "eps": float(m.eps),
        "elementwise_affine": m.weight is not None,
        "bias": m.bias is not None,
        "channels_first": m.channels_first,
    },
    nn.Embedding: lambda m: {
        "num_embeddings": m.num_embeddings,
        "embedding_dim": m.embedding_dim,
        "padding_idx": m.padding_idx,
        "max_norm": m.max_norm,
        "norm_type": float(m.norm_type),
        "scale_grad_by_freq": m.scale_grad_by_freq,
        "sparse": m.sparse,
    },
})


def _padding(padding: Any) -> Any:
    return padding if isinstance(padding, str) else list(padding)


# Factorized convs (a low-rank target's modules): recorded whole, by the widths and factor sizes that give their
# parts; the parts (a Tucker2Conv's three convs) are not recorded again.
SPECS.update({
    Tucker2Conv: lambda m: {
        "in_channels": m.first.in_channels,
        "out_channels": m.last.out_channels,
        "ranks": list(m.ranks),
        "kernel_size": list(m.core.kernel_size),
        "stride": list(m.core.stride),
        "padding": _padding(m.core.padding),
        "dilation": list(m.core.dilation),
        "bias": m.last.bias is not None,
        "first_bias": m.first.bias is not None,  # compaction folds a removed constant channel into a bias
        "core_bias": m.core.bias is not None,
        "padding_mode": m.core.padding_mode,
    },
    SharedKernelConv: lambda m: {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "bases": int(m.basis.shape[0]),
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": list(m.padding),
        "dilation": list(m.dilation),
        "bias": m.bias is not None,
    },
})


def _conv_on_meta(in_channels: int, out_channels: int, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                  padding: Any, dilation: tuple[int, ...], bias: bool, padding_mode: str = "zeros") -> nn.Conv2d:
    """The plain conv a factorized layer is built from: on the meta device (its weight is never needed)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias,
                     padding_mode=padding_mode, device="meta")


def _here() -> torch.device:
    return torch.empty(0).device  # the device of the loader's ``with torch.device(...)`` (meta while checking)


def _build_tucker2(*, ranks: tuple[int, int], **shapes: Any) -> nn.Module:
    # from the shapes, not by factorizing a conv: compaction may have left the ranks above the widths
    return Tucker2Conv.from_shapes(ranks=ranks, device="meta", **shapes).to_empty(device=_here())


def _build_shared(*, bases: int, **conv: Any) -> nn.Module:
    return SharedKernelConv(_conv_on_meta(**conv), bases).to_empty(device=_here())


BUILDERS: dict[str, Callable[..., nn.Module]] = {cls.__name__: cls for cls in SPECS}
BUILDERS.update({"Tucker2Conv": _build_tucker2, "SharedKernelConv": _build_shared})
# The types every argument of the layers added with the transformers support must have (strict: a file's
# "eps": "1e-5" or "bias": 1 is refused, not passed on to a constructor that would keep it).
_INT, _FLOAT, _BOOL, _OPT_INT, _OPT_FLOAT = "int", "float", "bool", "int or null", "float or null"
FIELD_TYPES: dict[str, dict[str, str]] = {
    "LayerNorm": {"normalized_shape": "ints", "eps": _FLOAT, "elementwise_affine": _BOOL, "bias": _BOOL},
    "WidthKeepingLayerNorm": {"normalized_shape": _INT, "full_width": _INT, "eps": _FLOAT,
                              "elementwise_affine": _BOOL, "bias": _BOOL, "channels_first": _BOOL},
    "Embedding": {"num_embeddings": _INT, "embedding_dim": _INT, "padding_idx": _OPT_INT, "max_norm": _OPT_FLOAT,
                  "norm_type": _FLOAT, "scale_grad_by_freq": _BOOL, "sparse": _BOOL},
    "Tucker2Conv": {"in_channels": _INT, "out_channels": _INT, "ranks": "ints", "kernel_size": "ints",
                    "stride": "ints", "padding": "padding", "dilation": "ints", "bias": _BOOL,
                    "first_bias": _BOOL, "core_bias": _BOOL, "padding_mode": "padding_mode"},
    "SharedKernelConv": {"in_channels": _INT, "out_channels": _INT, "bases": _INT, "kernel_size": "ints",
                         "stride": "ints", "padding": "sizes", "dilation": "ints", "bias": _BOOL},
}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# Integer attributes the head executor lowers (executors/heads.py), per attention module, and the float
# eps an RMSNorm's hidden-size compaction rescales (plan/residual.keep_norm_widths). The head size and the
# attention's scale never change, but a skeleton built from a compacted config (BERT derives its head size from
# hidden_size) would get them wrong, so they are recorded too.
INT_ATTRIBUTES = HEAD_COUNT_ATTRS + KV_COUNT_ATTRS + ALL_HEADS_ATTRS + HEAD_SIZE_ATTRS
# The attention layouts' own width attributes (DistilBERT's ``dim``) live under their own key: recorded and
# accepted per block the layouts name, never by name on every module (``nn.Softmax`` has a ``dim`` too).
WIDTH_ATTRIBUTES = "width_attributes"
FLOAT_ATTRIBUTES = ("variance_epsilon", "scaling")
# Model config fields compaction edits (plan/residual.update_hidden_size) and their JSON types.
CONFIG_FIELDS = {"hidden_size": _INT, "hidden_sizes": "ints", "rms_norm_eps": _FLOAT, "head_dim": _INT}
# Fields compaction may add to a config that derived them (Qwen2's head_dim after hidden-size pruning): a skeleton
# built from the original config does not have them yet (a review: a reload lost it, and saving crashed again).
ADDED_CONFIG_FIELDS = frozenset({"head_dim"})
MAX_DIMS, MAX_INT = 8, 1 << 40


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_type(value: Any, kind: str) -> bool:
    """Whether a JSON value has one of the ``FIELD_TYPES`` kinds (ints bounded, floats finite)."""
    if kind in ("ints", "sizes"):  # sizes may be 0 (a padding)
        least = 1 if kind == "ints" else 0
        return isinstance(value, list) and 0 < len(value) <= MAX_DIMS and all(
            _is_int(v) and least <= v <= MAX_INT for v in value)
    if kind == "padding":
        return value in ("same", "valid") or _has_type(value, "sizes")
    if kind == "padding_mode":
        return value in PADDING_MODES
    if kind.endswith(" or null") and value is None:
        return True
    if kind.startswith("int"):
        return _is_int(value) and 0 <= value <= MAX_INT
    if kind.startswith("float"):
        return isinstance(value, float) and math.isfinite(value) and value >= 0
    return isinstance(value, bool)


def shape_manifest(model: nn.Module, model_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready manifest: format, the optional registered ``{"name", "kwargs"}``, layer shapes, the shapes
    of the parameters of every other module (RMSNorm weights, position embeddings, class tokens, layer scales),
    the head-count attributes of attention modules, the width attributes their layouts name and the config fields
    compaction edits."""
    recorded = {name for name, m in model.named_modules() if type(m) in SPECS}
    # a recorded layer's parts (a Tucker2Conv's convs) are built with it, from its record
    modules = {name: m for name, m in model.named_modules() if not _inside(name, recorded)}
    layers = {name: {"type": type(m).__name__, **SPECS[type(m)](m)} for name, m in modules.items() if type(m) in SPECS}
    tensors = {
        f"{name}.{attr}" if name else attr: list(p.shape)
        for name, m in modules.items()
        if type(m) not in SPECS
        for attr, p in m._parameters.items()
        if p is not None
    }
    attributes = {}
    for name, m in modules.items():
        found = {a: getattr(m, a) for a in INT_ATTRIBUTES if _is_int(getattr(m, a, None))}
        found.update({a: getattr(m, a) for a in FLOAT_ATTRIBUTES if isinstance(getattr(m, a, None), float)})
        if found and type(m) not in SPECS:
            attributes[name] = found
    config = getattr(model, "config", None)
    fields = {k: _json_value(getattr(config, k)) for k in CONFIG_FIELDS if hasattr(config, k)}
    return {
        "format": FORMAT,
        "model": model_spec,
        "layers": layers,
        "tensors": tensors,
        "attributes": attributes,
        WIDTH_ATTRIBUTES: _width_attributes(model),
        "config": {k: v for k, v in fields.items() if _has_type(v, CONFIG_FIELDS[k])},
        "tied": [[f"{m}.{a}" if m else a for m, a in names] for names in tied_parameters(model)],
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _layout_widths(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The width attributes each attention block's layout names, by block (``{}`` where none is read)."""
    try:
        layouts = attention_layouts(model)
    except ValueError:  # a block that cannot be read as a layout: its widths were never lowered by the heads either
        return {}
    return {lay.module: lay.width_attrs for lay in layouts.values() if lay.width_attrs}


def _width_attributes(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{block: {attr: value}}`` for the integer width attributes the attention layouts name (DistilBERT's
    ``dim``), which ``remove_dead_heads`` lowers with the heads and transformers 4's forward reads."""
    found = {}
    for block, attrs in _layout_widths(model).items():
        module = model.get_submodule(block)
        values = {a: getattr(module, a) for a in attrs if _has_type(getattr(module, a, None), _INT)}
        if values:
            found[block] = values
    return found


def _inside(name: str, layers: set[str]) -> bool:
    """Whether module ``name`` lies inside one of ``layers`` (``"a.b.c"`` inside ``"a.b"`` or ``"a"``)."""
    parts = name.split(".")
    return bool(name) and ("" in layers or any(".".join(parts[:i]) in layers for i in range(1, len(parts))))


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _write_compacted(model: nn.Module, folder: str | Path, model_spec: dict[str, Any] | None = None) -> Path:
    """Write ``manifest.json`` and ``model.safetensors`` into ``folder``; returns the folder.

    ``model_spec`` (e.g. ``{"name": "resnet20", "kwargs": {"num_classes": 10}}``) lets ``load_compacted``
    build the skeleton from the model registry without being given one. Package-internal: call it as
    ``get_executor("compact").save(model, folder, model_spec=...)``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():  # mkdir would say only "File exists", as a traceback
        raise ValueError(f"'{folder}' is a file; a compacted model is saved as a folder, choose another path")
    created = not folder.exists()
    _make_folder(folder)  # a folder that cannot be made: one line naming it, before any work
    if created:
        folder.rmdir()  # made only to check that it can be: the rename below makes it, whole
    manifest = shape_manifest(model, model_spec)
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        tensor = v.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing memory (tied weights): each gets its own copy, 'tied' reties them
        state[k] = tensor.clone() if storage in seen else tensor.contiguous()
        seen.add(storage)
    weights = save_safetensors(state, metadata={"format": FORMAT})
    manifest["weights"] = {"file": WEIGHTS, "bytes": len(weights), "sha256": sha256_hex(weights)}
    manifest[SELF_CHECKSUM] = canonical_sha256(manifest)
    text = json.dumps(manifest, indent=1)

    def write(into: Path) -> None:  # weights first, manifest last: a manifest on disk always names complete weights
        atomic_write(into / WEIGHTS, lambda tmp: tmp.write_bytes(weights))
        atomic_write(into / MANIFEST, lambda tmp: tmp.write_text(text))

    if not created and any(folder.iterdir()):  # saved over an earlier save (the API may): file by file, each atomic
        write(folder)
        return folder
    # a new (or empty) folder is written whole: a kill or a failed write leaves no folder (or the empty one it
    # had), never weights without their manifest; a killed write's private folder is removed by the next export
    atomic_folder(folder, write)
    return folder


def _make_folder(folder: Path) -> None:
    """``mkdir -p folder``; a failure is one WriteError line naming the folder and the fix (mkdir's own
    NotADirectoryError / read-only OSError would be a traceback)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocking = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            reason, fix = f"'{blocking}' is a file, not a folder", "choose another path"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason, fix = err.strerror or str(err), "make the folder writable (or write elsewhere) and retry"
        elif err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason, fix = err.strerror or str(err), "free some space (or write elsewhere) and retry"
        else:
            reason, fix = err.strerror or str(err), "check the folder and retry"
        raise WriteError(err.errno or 0, f"cannot create folder '{folder}': {reason}; {fix}") from None


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
    The model comes back in eval mode, whatever the skeleton's (call ``.train()`` to fine-tune it).
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
        expected.update(_check_extras(skeleton, manifest, layers))
        dtype = _saved_dtype(state)
        if dtype is not None and any(_is_float(d) and d != str(dtype) for d, _ in expected.values()):
            # layers are built in the default dtype: a float64 / half model never loaded
            expected = {k: (str(dtype) if _is_float(d) else d, shape) for k, (d, shape) in expected.items()}
        else:
            dtype = None  # the built layers have the saved dtype already: nothing is cast
        _check_tied(manifest.get("tied", []), skeleton, layers, expected)
        if model is None:  # the skeleton is built at its full widths first: bound it too
            full = sum(v.numel() for v in skeleton.state_dict().values())
            elements = max(full, sum(math.prod(shape) for _, shape in expected.values()))
            if elements > MAX_MODEL_ELEMENTS:
                _fail(f"describes {elements:,} elements (more than {MAX_MODEL_ELEMENTS:,}); pass the skeleton")
        found = {k: (str(v.dtype), tuple(v.shape)) for k, v in state.items()}
        if found != expected:
            wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
            hint = ("; is the skeleton given the architecture it was saved from?" if model is not None else "")
            _fail(f"'{weights_path}' does not fit the layers its manifest describes (first differences: {wrong[:4]})"
                  f"{hint}")
        if model is None:
            model = _skeleton(manifest["model"])  # only now: everything checked
        for name, layer in manifest["layers"].items():
            _replace(model, name, _build(name, dict(layer)))
        _apply_extras(model, manifest)
        if dtype is not None:
            model.to(dtype)  # floating parameters and buffers only: kept-column indices stay integers
        model.load_state_dict(state, strict=True)
        _check_column_indices(model)
        _retie(model, manifest.get("tied", []), state)
        parameters = manifest.get("parameters")
        if parameters is not None and parameters != sum(p.numel() for p in model.parameters()):
            _fail(f"records {parameters:,} parameters, the model it describes has another count")
    return model.eval()  # for inference, as from_pretrained: a BatchNorm in train mode would give other outputs


def _is_float(dtype: str) -> bool:
    kind = getattr(torch, dtype.removeprefix("torch."), None)
    return isinstance(kind, torch.dtype) and kind.is_floating_point


def _saved_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The one floating dtype of the saved tensors (None when there are several, or none)."""
    kinds = {v.dtype for v in state.values() if v.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else None


def read_compact_manifest(path: str | Path) -> dict[str, Any]:
    """``manifest.json`` read and checked: JSON, its own checksum, format and the types of every field."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        _fail(f"'{path}' is {len(raw):,} bytes; a compacted-model manifest is far smaller (corrupt?)")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nesting past the stack
        _fail(f"'{path}' is not valid JSON ({type(err).__name__}: {str(err)[:80]}): the file is damaged; save the "
              "compacted model again")
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
    tensors, attributes = manifest.get("tensors", {}), manifest.get("attributes", {})
    config = manifest.get("config", {})
    if not isinstance(tensors, dict) or not all(_has_type(v, "ints") or v == [] for v in tensors.values()):
        _fail(f"'{path}': 'tensors' must map parameter names to shapes (lists of at most {MAX_DIMS} positive ints)")
    if not isinstance(attributes, dict) or not all(isinstance(v, dict) for v in attributes.values()):
        _fail(f"'{path}': 'attributes' must map module names to {{attribute: value}}")
    widths = manifest.get(WIDTH_ATTRIBUTES, {})  # absent from manifests written before it: nothing to restore
    if not isinstance(widths, dict) or not all(isinstance(v, dict) for v in widths.values()):
        _fail(f"'{path}': '{WIDTH_ATTRIBUTES}' must map attention block names to {{attribute: value}}")
    if not isinstance(config, dict):
        _fail(f"'{path}': 'config' must map config fields to values, not {config!r}")
    tied = manifest.get("tied", [])
    names = [n for group in tied for n in group] if isinstance(tied, list) and all(
        isinstance(g, list) and len(g) > 1 for g in tied) else None
    if names is None or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        _fail(f"'{path}': 'tied' must be a list of lists of two or more distinct parameter names")


def _check_extras(
    skeleton: nn.Module, manifest: dict[str, Any], layers: dict[str, nn.Module]
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check the recorded parameter shapes, attributes and config fields against the skeleton (each must name
    something the skeleton has, of the same kind); the state-dict entries the parameter shapes give."""
    modules = dict(skeleton.named_modules())

    def module(name: str, what: str) -> nn.Module:
        if name not in modules:
            _fail(f"records {what} of module {name!r}, which the skeleton does not have (another architecture?)")
        if any(name == layer or name.startswith(f"{layer}.") for layer in layers):
            _fail(f"records {what} of module {name!r}, which is one of its layers")
        return modules[name]

    expected = {}
    for name, shape in manifest.get("tensors", {}).items():
        owner, _, attr = name.rpartition(".")
        current = module(owner, f"parameter {name!r}")._parameters.get(attr)
        if current is None:
            _fail(f"records parameter {name!r}, which the skeleton does not have (another architecture?)")
        if len(shape) != current.dim():
            _fail(f"records parameter {name!r} with shape {shape}; the skeleton's has {current.dim()} dimensions")
        expected[name] = (str(current.dtype), tuple(shape))
    for name, values in manifest.get("attributes", {}).items():
        owner = module(name, "attributes")
        for attr, value in values.items():
            kind = _INT if attr in INT_ATTRIBUTES else _FLOAT if attr in FLOAT_ATTRIBUTES else None
            full = f"{name}.{attr}"
            if kind is None:
                _fail(f"records attribute {full!r}; only {list(INT_ATTRIBUTES + FLOAT_ATTRIBUTES)} are restored")
            if not _has_type(value, kind) or not _has_type(getattr(owner, attr, None), kind):
                _fail(f"records attribute {full!r} = {value!r}; it must be of type {kind}, on a skeleton module "
                      f"that has one (the skeleton's: {getattr(owner, attr, None)!r})")
    _check_width_attributes(skeleton, manifest.get(WIDTH_ATTRIBUTES, {}), module)
    recorded = manifest.get("config", {})
    config = getattr(skeleton, "config", None)
    if recorded and config is None:
        _fail(f"records config fields {sorted(recorded)}, but the skeleton has no config; pass the transformers model")
    for field, value in recorded.items():
        kind = CONFIG_FIELDS.get(field)
        if kind is None:
            _fail(f"records config field {field!r}; only {sorted(CONFIG_FIELDS)} are restored")
        current = _json_value(getattr(config, field, None))
        if field in ADDED_CONFIG_FIELDS and current is None and _has_type(value, kind):
            continue
        if not _has_type(value, kind) or not _has_type(current, kind) or (
                kind == "ints" and len(value) != len(current)):
            _fail(f"records config.{field} = {value!r}; the skeleton's config has {current!r} (another model?)")
    return expected


def _check_width_attributes(skeleton: nn.Module, widths: dict[str, dict[str, Any]],
                            module: Callable[[str, str], nn.Module]) -> None:
    """Each recorded width attribute names one the skeleton's layout of that attention block names, and holds an
    int where the skeleton's block holds one (``module`` checks the block's name)."""
    if not widths:
        return
    named = _layout_widths(skeleton)
    for name, values in widths.items():
        owner = module(name, "width attributes")
        for attr, value in values.items():
            full = f"{name}.{attr}"
            if attr not in named.get(name, ()):
                _fail(f"records width attribute {full!r}, but the skeleton reads no attention block there with that "
                      f"width attribute (there: {list(named.get(name, ()))}); pass the skeleton it was saved from, "
                      "with any attention adapter it used registered")
            if not _has_type(value, _INT) or not _has_type(getattr(owner, attr, None), _INT):
                _fail(f"records width attribute {full!r} = {value!r}; it must be of type {_INT}, on a skeleton block "
                      f"that has one (the skeleton's: {getattr(owner, attr, None)!r})")


def _check_tied(tied: list[list[str]], skeleton: nn.Module, layers: dict[str, nn.Module],
                expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Every tied group names parameters (not buffers) of one dtype and shape, once the layers are replaced."""
    if not tied:
        return
    params = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)
              if not any(n.startswith(f"{layer}.") for layer in layers)}
    params |= {f"{layer}.{n}" for layer, module in layers.items() for n, _ in module.named_parameters()}
    for group in tied:
        shapes = {name: expected.get(name) if name in params else None for name in group}
        if None in shapes.values() or len(set(shapes.values())) != 1:
            _fail(f"records parameters {group} as one tensor, but they are not parameters of one shape: {shapes}")


@torch.no_grad()
def _retie(model: nn.Module, tied: list[list[str]], state: dict[str, torch.Tensor]) -> None:
    """Make each recorded group of parameters one tensor again (an LM head sharing the token embedding)."""
    for group in tied:
        if not all(torch.equal(state[name], state[group[0]]) for name in group):
            _fail(f"records parameters {group} as one tensor, but their saved values differ")
        first = model.get_parameter(group[0])
        for name in group[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)


@torch.no_grad()
def _apply_extras(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Give the (checked) skeleton the recorded parameter shapes (zeros, filled by the state dict next), head
    and width attributes and config fields."""
    for name, shape in manifest.get("tensors", {}).items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = owner._parameters[attr]
        if tuple(current.shape) != tuple(shape):  # the same shape: keep it (and any tie it has)
            fresh = torch.zeros(shape, dtype=current.dtype, device=current.device)
            owner._parameters[attr] = nn.Parameter(fresh, requires_grad=current.requires_grad)
    for key in ("attributes", WIDTH_ATTRIBUTES):
        for name, values in manifest.get(key, {}).items():
            owner = model.get_submodule(name)
            for attr, value in values.items():
                setattr(owner, attr, value)
    config = getattr(model, "config", None)
    for field, value in manifest.get("config", {}).items():
        setattr(config, field, list(value) if isinstance(value, list) else value)


def _skeleton(spec: dict[str, Any] | None, device: str = "cpu") -> nn.Module:
    if not spec:
        raise ValueError(
            "names no registered model; pass the skeleton: load_compacted(folder, MyModel())"
        )
    from admmcompress.models import create_model
    from admmcompress.models.registry import spec_problem

    problem = spec_problem(spec.get("kwargs", {}))
    if problem:
        raise ValueError(f"names model {spec.get('name')!r} with {problem}")
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
    types = FIELD_TYPES.get(kind)
    if types is not None and (set(layer) != set(types) or not all(_has_type(v, types[k]) for k, v in layer.items())):
        _fail(f"has layer '{name}' ({kind}) with arguments {layer}; it needs exactly {types}")
    placement = sorted({"device", "dtype"} & set(layer))
    if placement:  # chosen by the loader (meta first, then the CPU), never by the file
        _fail(f"has layer '{name}' ({kind}) with arguments {placement}, which a manifest does not set (damaged?)")
    if kind not in ("ColumnConv2d", "ColumnLinear"):
        layer = {k: tuple(v) if isinstance(v, list) else v for k, v in layer.items()}
    try:
        with torch.device(device):
            return BUILDERS[kind](**layer)
    except Exception as err:  # arguments from a file: say which layer, in one line
        _fail(f"has layer '{name}' ({kind}) with arguments it cannot be built from ({type(err).__name__}: {err})")


def _check_column_indices(model: nn.Module) -> None:
    """The kept-column indices of column executors point inside their layer's dense GEMM columns."""
    for name, m in model.named_modules():
        if not isinstance(m, (ColumnConv2d, ColumnLinear)) or not m.kept.numel():
            continue
        if int(m.kept.min()) < 0 or int(m.kept.max()) >= m.dense_columns:
            _fail(f"has layer '{name}' whose kept columns run outside its {m.dense_columns} columns (damaged weights)")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name = name.rpartition(".")[0]
    try:
        model.get_submodule(parent_name)
    except AttributeError:
        raise ValueError(
            f"the skeleton has no module '{parent_name}' for layer '{name}'; "
            "is it the same architecture the manifest was saved from?"
        ) from None
    if not name:
        raise ValueError("the whole model is a single layer; save it with torch's own state dict instead")
    replace_module(model, name, module)


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
