"""Deployment path: a quantized model to ONNX with integer weights behind ``DequantizeLinear``.

The model is exported with ``torch.onnx.export`` (the torch.export-based exporter), with a dynamic
batch dimension (the first dimension of every input tensor, named ``batch``) unless
``dynamic_batch=False``, and with ``dynamic_sequence=True`` a dynamic second dimension (``sequence``) of
every input with at least two. Inputs are a tuple of tensors or a mapping of named tensors (a tokenizer's
``{"input_ids": ..., "attention_mask": ...}``: the ONNX inputs take those names); outputs may be a tensor,
a tuple or a mapping such as transformers' ``ModelOutput`` (every tensor in it becomes an ONNX output, named
by its key). Then every weight initializer is rewritten by what its values allow:

- **integer grid** ``s * c`` (fixed point, binary, ternary, power of two with a small exponent
  range; see ``admmcompress.encoding``): an int8 (or int16, opset 21) initializer of the codes ``c`` and a
  ``DequantizeLinear(c, s, 0)`` node, the QDQ form ONNX Runtime recognises for quantized weights.
  ``s * c`` is computed in float32 by both PyTorch and ONNX Runtime, so the dequantized weights
  are bit-identical to the model's.
- **codebook** (clustering: ``K`` shared values that lie on no grid): a uint8 (uint16 above 256
  values) initializer of indices into a float32 table (zero included when the layer is pruned) and
  ``Cast(to int64) -> Gather(table, indices)``. QDQ cannot express it: ``DequantizeLinear`` is
  affine (``(c - z) * s``), and k-means centroids are not equally spaced, so any grid fine enough
  to hold them exactly needs far more codes than ``K`` (usually more than int16 has). The Gather
  costs nothing at run time: its inputs are all initializers, so ONNX Runtime folds it into a
  float32 weight when the session is created; the file keeps 1-2 bytes per weight, and the values
  are the table's, bit for bit. Used only when smaller than float32 (dense or sparse, below).
- anything else (unquantized layers) stays float32.

Whichever tensor holds one entry per weight (codes, indices, float values) is written as a *sparse initializer*
(its nonzeros and their int64 positions, ``OnnxSummary.sparse``) where that is smaller: a pruned layer below about
a third (float32) or a ninth (int8 codes) of its weights. ONNX Runtime makes it dense when the session is created,
so the graph and its outputs do not change; a pruned model's file shrinks with its nonzeros.

Shared-kernel convs (PENNI's training form, :class:`~admmcompress.executors.penni.SharedKernelConv`) are exported
in their two-stage form (a copy through :func:`~admmcompress.executors.penni.to_two_stage`; the model passed in is
not changed): the exporter would otherwise fold the bases and coefficients into the rebuilt dense kernels, and
the file would hold as many weights as the dense model. ``OnnxSummary.two_stage`` names them.

Needs the optional ``export`` extra: ``pip install "admmcompress[export]"`` (onnx, onnxruntime,
onnxscript).

The ``onnx`` executor (``get_executor("onnx")``): ``save`` = ``export_onnx`` checked against ONNX
Runtime on the example inputs, ``export`` = the same for a finished run's model at two batch sizes
(``admmcompress export --onnx``).

>>> import torch.nn as nn  # doctest: +SKIP
>>> summary = export_onnx(model, (torch.randn(1, 1, 28, 28),), "lenet5_q.onnx")  # doctest: +SKIP
>>> summary.quantized                                                             # doctest: +SKIP
{'conv1.weight': 'int8', 'conv2.weight': 'int8', 'fc1.weight': 'int8', 'fc2.weight': 'int8'}
>>> run_onnx("lenet5_q.onnx", torch.randn(32, 1, 28, 28))[0].shape               # doctest: +SKIP
(32, 10)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from admmcompress.atomic import WriteError, atomic_write, nearest_existing
from admmcompress.encoding import grid_of
from admmcompress.executors.base import Executor, FinishedRun, register_executor
from admmcompress.executors.penni import shared_layers, to_two_stage
from admmcompress.structures.groups import gemm_params

OPSET = 21  # int16 DequantizeLinear needs opset 21
MAX_ONNX_BYTES = 2**31 - 1  # protobuf's limit on one serialized message (the whole self-contained file)


@dataclass
class OnnxSummary:
    """Which weights became integer + DequantizeLinear or codebook indices + Gather (with their
    integer type), which stayed float, whether the batch dimension is dynamic, and which shared-kernel convs
    were exported in their two-stage form."""

    path: str
    quantized: dict[str, str] = field(default_factory=dict)
    float_weights: list[str] = field(default_factory=list)
    codebook: dict[str, str] = field(default_factory=dict)
    sparse: dict[str, str] = field(default_factory=dict)  # weights stored as a sparse initializer (nonzeros only)
    dynamic_batch: bool = False
    dynamic_sequence: bool = False
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    two_stage: list[str] = field(default_factory=list)  # shared-kernel convs exported as their two stages


def output_tensors(output: Any) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Names and tensors of a model output: a tensor, a tuple/list, or a mapping (``ModelOutput``).

    >>> names, tensors = output_tensors({"logits": torch.zeros(1), "loss": None, "hidden": (torch.ones(2),)})
    >>> names, [t.shape for t in tensors]
    (['logits', 'hidden.0'], [torch.Size([1]), torch.Size([2])])
    """
    names: list[str] = []
    tensors: list[torch.Tensor] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            names.append(name)
            tensors.append(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}" if name else f"output_{i}")

    walk(output, "")
    return names, tuple(tensors)


class _Exportable(torch.nn.Module):
    """Calls the model with positional tensors (by name when the example was a mapping) and returns a flat
    tuple of output tensors: the form torch.onnx.export takes. The model sits under ``model.``."""

    def __init__(self, model: torch.nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return output_tensors(_call(self.model, args, self.names))[1]


def _call(model: torch.nn.Module, values: tuple[Any, ...], names: list[str] | None) -> Any:
    return model(**dict(zip(names, values, strict=True))) if names else model(*values)


def _positional(example_inputs: Any) -> tuple[tuple[Any, ...], list[str] | None]:
    """``(values, names)``: a mapping's values in order with its keys, else the tuple and None."""
    if isinstance(example_inputs, Mapping):
        for key, value in example_inputs.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"export_onnx: input '{key}' is {type(value).__name__}; named inputs must all be tensors "
                    "(drop the others from the example, or fix them in a wrapper module)"
                )
        return tuple(example_inputs.values()), [str(k) for k in example_inputs]
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), None
    return tuple(example_inputs), None


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"ONNX export needs the 'export' extra: pip install 'admmcompress[export]' ({err})"
        ) from None
    return onnx


def integer_codes(weight: torch.Tensor) -> tuple[np.ndarray, float] | None:
    """``(codes, scale)`` with ``weight == float32(scale) * codes`` exactly, int8 or int16; else None."""
    flat = weight.detach().to(torch.float32).reshape(-1)
    levels = torch.unique(flat[flat != 0])
    grid = grid_of(levels)
    if grid is None:
        return None
    scale, low, high = grid
    codes = torch.round(flat.to(torch.float64) / scale).to(torch.int64)
    if not torch.equal(torch.tensor(scale, dtype=torch.float32) * codes.to(torch.float32), flat):
        return None
    dtype = np.int8 if -128 <= low and high <= 127 else np.int16
    return codes.reshape(weight.shape).numpy().astype(dtype), scale


def sparse_bytes(array: np.ndarray) -> int:
    """Bytes of ``array`` as a sparse initializer: each nonzero's value and its int64 position."""
    return int(np.count_nonzero(array)) * (array.itemsize + 8)


def codebook_indices(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """``(indices, table)`` with ``weight == table[indices]`` (uint8/uint16 indices, float32 table; 0.0, where the
    weight holds it, first, so that a pruned weight's index is 0 and a sparse initializer leaves it out).

    None when that is not smaller than storing ``weight`` as float32 (e.g. an unquantized layer).
    """
    flat = weight.detach().to(torch.float32).reshape(-1)
    table, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    zero = torch.nonzero(table == 0).flatten()
    if zero.numel():  # move 0.0 to index 0: indices below it shift up by one
        z = int(zero[0])
        order = torch.cat([zero, torch.arange(z), torch.arange(z + 1, table.numel())])
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel())
        table, inverse = table[order], position[inverse]
    if table.numel() > 2**16:
        return None
    dtype = np.uint8 if table.numel() <= 2**8 else np.uint16
    if table.numel() * 4 + flat.numel() * np.dtype(dtype).itemsize >= flat.numel() * 4:
        return None
    return inverse.reshape(weight.shape).numpy().astype(dtype), table.numpy()


@contextlib.contextmanager
def _quiet_registration():
    """The exporter logs one line per torchvision op it skips when torchvision is absent (it is, beside this torch):
    noise about ops no model here uses."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _batch_shapes(
    example_inputs: tuple[Any, ...], sequence: bool = False
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Example inputs with a batch (and sequence) of at least 2 (a size of 1 would be specialised) and their
    dynamic shapes."""
    batch = torch.export.Dim("batch")
    length = torch.export.Dim("sequence")
    inputs, shapes = [], []
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            dims = [0, 1] if sequence and value.dim() >= 2 else [0]
            for d in dims:
                if value.shape[d] == 1:
                    value = value.expand(*value.shape[:d], 2, *value.shape[d + 1:]).contiguous()
            shapes.append({d: (batch if d == 0 else length) for d in dims})
        else:
            shapes.append(None)
        inputs.append(value)
    return tuple(inputs), tuple(shapes)


@torch.no_grad()
def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...] | Mapping[str, torch.Tensor],
    path: str | Path,
    opset: int = OPSET,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = False,
) -> OnnxSummary:
    """Export ``model`` (in eval mode) to ``path``; quantized weights become int + DequantizeLinear,
    clustered ones uint8 indices + Gather; ``dynamic_batch``: any batch size (first input dimension);
    ``dynamic_sequence``: any length of the second dimension of inputs with two or more."""
    onnx = _require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    _check_out_folder(path)  # a file where a folder goes: one line now, not after the export
    two_stage = shared_layers(model)
    if two_stage:  # else the exporter folds bases and coefficients into dense kernels: no weights saved
        model = to_two_stage(model)
    was_training = model.training
    model.eval()
    values, names = _positional(example_inputs)
    output = _call(model, values, names)
    output_names, _ = output_tensors(output)
    # A plain model (positional tensors in, one tensor out) is exported as it is, so its initializers keep
    # the model's own parameter names; anything else goes through the flattening wrapper.
    plain = names is None and isinstance(output, torch.Tensor)
    wrapped = model if plain else _Exportable(model, names)
    weights = {}
    for name, module in wrapped.named_modules():
        for param in gemm_params(module):
            weights[f"{name}.{param}" if name else param] = getattr(module, param).detach()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The exporter may write the float weights to a side file; export apart, keep one self-contained file.
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        shapes = None
        if dynamic_batch or dynamic_sequence:
            values, shapes = _batch_shapes(values, sequence=dynamic_sequence)
            if not dynamic_batch:  # keep only the sequence axes
                shapes = tuple({d: v for d, v in s.items() if d != 0} or None if s else None for s in shapes)
        with _quiet_registration():
            torch.onnx.export(
                wrapped, values, str(raw), dynamo=True, opset_version=opset, verbose=False,
                dynamic_shapes=shapes if plain or shapes is None else (shapes,), input_names=names,
                output_names=None if plain else output_names,
                # unoptimized: the optimizer folds BatchNorm into conv weights and repacks RNN gates under new
                # names, so no initializer equals a model weight and every quantized/sparse weight went dense
                optimize=False,
            )
        graph_model = onnx.load(str(raw))
    model.train(was_training)
    graph = graph_model.graph
    summary = OnnxSummary(
        str(path), dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence,
        inputs=[i.name for i in graph.input], outputs=[o.name for o in graph.output], two_stage=two_stage,
    )
    kept, new_nodes, sparse = [], [], []

    def store(array: np.ndarray, name: str, weight_name: str) -> None:
        """``array`` as an initializer, or as a sparse one (its nonzeros and their positions) where smaller."""
        if sparse_bytes(array) < array.nbytes:
            flat = array.reshape(-1)
            where = np.flatnonzero(flat).astype(np.int64)
            sparse.append(helper.make_sparse_tensor(numpy_helper.from_array(flat[where], name),
                                                    numpy_helper.from_array(where, f"{name}_positions"),
                                                    list(array.shape)))
            summary.sparse[weight_name] = f"{where.size:,} of {flat.size:,} stored"
        else:
            kept.append(numpy_helper.from_array(array, name))

    for init in graph.initializer:
        weight = weights.get(init.name)
        value = numpy_helper.to_array(init) if weight is not None else None
        matches = (
            weight is not None and value.shape == tuple(weight.shape) and np.array_equal(value, weight.numpy())
        )
        found = integer_codes(weight) if matches else None
        table = codebook_indices(weight) if matches and found is None else None
        if table is not None and min(value.nbytes, sparse_bytes(value)) <= min(
                table[0].nbytes, sparse_bytes(table[0])) + table[1].nbytes:
            table = None  # an unquantized pruned layer (one level per nonzero): its float nonzeros are smaller
        if table is not None:
            indices, levels = table
            base = init.name
            store(indices, f"{base}_indices", base)
            kept.append(numpy_helper.from_array(levels, f"{base}_codebook"))
            new_nodes.append(
                helper.make_node(
                    "Cast", [f"{base}_indices"], [f"{base}_indices_int64"], to=TensorProto.INT64,
                    name=f"{base}_Cast",
                )
            )
            new_nodes.append(
                helper.make_node(
                    "Gather", [f"{base}_codebook", f"{base}_indices_int64"], [base], axis=0, name=f"{base}_Gather"
                )
            )
            summary.codebook[base] = f"{indices.dtype} K={levels.size}"
            continue
        if found is None:
            if matches:
                store(value, init.name, init.name)
            else:
                kept.append(init)
            if weight is not None:
                summary.float_weights.append(init.name)
            continue
        codes, scale = found
        base = init.name
        store(codes, f"{base}_quantized", base)
        kept.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{base}_scale"))
        kept.append(numpy_helper.from_array(np.array(0, dtype=codes.dtype), f"{base}_zero_point"))
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                [base],
                name=f"{base}_DequantizeLinear",
            )
        )
        summary.quantized[base] = str(codes.dtype)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.sparse_initializer.extend(sparse)  # ONNX Runtime makes them dense when the session is created
    stored_sparse = {t.values.name for t in sparse}  # a dense value_info of the same name fails shape inference
    kept_info = [v for v in graph.value_info if v.name not in stored_sparse]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    # One self-contained protobuf, whatever the name's extension, serialized once for the check and the file;
    # over protobuf's 2 GB a message cannot be serialized at all: refused here, before anything is written.
    size = graph_model.ByteSize()
    if size > MAX_ONNX_BYTES:
        raise ValueError(
            f"ONNX export: the model is {size / 2**30:.2f} GiB as one ONNX file, over protobuf's 2 GiB limit; "
            "export it with --compact (manifest + safetensors), or quantize its weights to fewer bits first"
        )
    data = graph_model.SerializeToString()
    onnx.checker.check_model(data)
    # atomic: a full disk leaves no truncated file at `path` (a retry would be refused as "exists")
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return summary


def _check_out_folder(path: Path) -> None:
    """Refuse a ``path`` under a file (atomic_write creates missing folders, but not through a file)."""
    existing = nearest_existing(path.parent)
    if existing.exists() and not existing.is_dir():
        raise WriteError(
            errno.ENOTDIR, f"cannot write '{path}': '{existing}' is a file, not a folder; choose another path"
        )


def run_onnx(path: str | Path, *inputs: torch.Tensor, **named: torch.Tensor) -> list[np.ndarray]:
    """Run the exported model with ONNX Runtime on CPU (for checks against PyTorch); inputs by position or,
    for a model exported from named inputs, by name."""
    try:
        import onnxruntime as ort
    except ImportError as err:  # pragma: no cover
        raise ImportError(
            f"checking an ONNX export needs onnxruntime: pip install 'admmcompress[export]' ({err})"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if named:
        feeds = {name: t.detach().numpy() for name, t in named.items()}
    else:
        feeds = {i.name: t.detach().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


def max_onnx_diff(path: str | Path, model: torch.nn.Module, example: Any) -> float:
    """Largest |ONNX Runtime - torch| over every output tensor of ``model`` on ``example`` (a tensor, a tuple
    or a mapping of named tensors)."""
    values, names = _positional(example)
    was_training = model.training
    with torch.no_grad():
        expected = output_tensors(_call(model.eval(), values, names))[1]
    model.train(was_training)
    got = run_onnx(path, **dict(zip(names, values, strict=True))) if names else run_onnx(path, *values)
    return max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected, strict=True))


def _max_onnx_diff(path: str | Path, model: torch.nn.Module, batches: tuple[torch.Tensor, ...]) -> float:
    with torch.no_grad():
        return max(float((torch.from_numpy(run_onnx(path, b)[0]) - model(b)).abs().max()) for b in batches)



EXPORT_ATOL = 1e-4  # `admmcompress export --onnx`: ONNX Runtime against torch on the run's test inputs

@register_executor("onnx")
class OnnxExecutor(Executor):
    """ONNX with integer weights + DequantizeLinear (codebooks: indices + Gather), checked with ONNX Runtime."""

    summary = "ONNX with integer weights + DequantizeLinear"
    hints = {
        "convert": "ONNX is a file: save it and run it with onnxruntime",
        "load": "run the file with admmcompress.executors.onnx_export.run_onnx(path, x) or onnxruntime",
    }

    def save(
        self,
        model: torch.nn.Module,
        path: str | Path,
        example: Any = None,
        opset: int = OPSET,
        dynamic_batch: bool = True,
        atol: float | None = 1e-4,
        dynamic_sequence: bool = False,
    ) -> OnnxSummary:
        """``export_onnx(model, example, path)``, then ONNX Runtime's outputs on ``example`` (a tensor, a tuple
        or a mapping of named tensors) must match every output of the model within ``atol`` (``atol=None``:
        no check)."""
        if example is None:
            raise ValueError(
                "onnx.save needs example=<inputs the model is called with> (a tensor, a tuple or a dict): "
                "the exporter traces the model"
            )
        inputs = example if isinstance(example, tuple | Mapping) else (example,)
        summary = export_onnx(
            model, inputs, path, opset=opset, dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence
        )
        if atol is not None:
            diff = max_onnx_diff(path, model, inputs)
            if diff > atol:
                raise RuntimeError(f"onnxruntime's outputs for '{path}' differ from torch's by {diff:.3g}")
        return summary

    def export(self, run: FinishedRun, out: str | Path) -> str:
        """Export the run's model, check it against ONNX Runtime at batch sizes 8 and 1, summarize."""
        model = run.model
        x = run.example(8)
        summary = export_onnx(model, (x,), out)
        diff = _max_onnx_diff(out, model, (x, x[:1]))  # two batch sizes: the graph's batch dimension is dynamic
        if not diff <= EXPORT_ATOL:  # as save() and the packed/compact exports: a wrong graph is not a success
            raise RuntimeError(f"onnxruntime's outputs for '{out}' differ from torch's by {diff:.3g} (more than "
                               f"{EXPORT_ATOL:g}); the file was written but does not compute the run's model")
        return (
            f"onnx: {out}; integer weights + DequantizeLinear: {summary.quantized or 'none'}; "
            f"codebook indices + Gather: {summary.codebook or 'none'}; "
            f"float weights: {summary.float_weights or 'none'}; "
            + (f"stored sparse (nonzeros only): {summary.sparse}; " if summary.sparse else "")
            + f"dynamic batch: {summary.dynamic_batch}; "
            + (f"shared-kernel convs in their two-stage form: {summary.two_stage}; " if summary.two_stage else "")
            + f"max |onnxruntime - torch| on {len(x)} test inputs (batches of {len(x)} and 1): {diff:.3g}"
        )


__all__ = [
    "OnnxExecutor", "OnnxSummary", "codebook_indices", "export_onnx", "integer_codes", "max_onnx_diff",
    "output_tensors", "run_onnx", "sparse_bytes",
]
