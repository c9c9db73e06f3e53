"""Deployment path: a quantized model to ONNX with integer weights behind ``DequantizeLinear``.

The model is exported with ``torch.onnx.export`` (the torch.export-based exporter); then every
weight initializer whose values lie on an integer grid ``s * c`` (fixed point, binary, ternary,
power of two with a small exponent range; see ``report.storage``) is replaced by an int8 (or
int16, opset 21) initializer of the codes ``c`` and a ``DequantizeLinear(c, s, 0)`` node, the
QDQ form ONNX Runtime recognises for quantized weights. ``s * c`` is computed in float32 by both
PyTorch and ONNX Runtime, so the dequantized weights are bit-identical to the model's.
Clustered layers (a table of shared values, no grid) and unquantized layers stay float.

Needs the optional ``export`` extra: ``pip install "admmcompress[export]"`` (onnx, onnxruntime,
onnxscript).

>>> import torch.nn as nn  # doctest: +SKIP
>>> summary = export_onnx(model, (torch.randn(1, 1, 28, 28),), "lenet5_q.onnx")  # doctest: +SKIP
>>> summary.quantized                                                             # doctest: +SKIP
{'conv1.weight': 'int8', 'conv2.weight': 'int8', 'fc1.weight': 'int8', 'fc2.weight': 'int8'}
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from admmcompress.report.storage import grid_of
from admmcompress.structures.groups import gemm_params

OPSET = 21  # int16 DequantizeLinear needs opset 21


@dataclass
class OnnxSummary:
    """Which weights became integer + DequantizeLinear (with their integer type), which stayed float."""

    path: str
    quantized: dict[str, str] = field(default_factory=dict)
    float_weights: list[str] = field(default_factory=list)


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


@torch.no_grad()
def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    path: str | Path,
    opset: int = OPSET,
) -> OnnxSummary:
    """Export ``model`` (in eval mode) to ``path``; quantized weights become int + DequantizeLinear."""
    onnx = _require_onnx()
    from onnx import helper, numpy_helper

    was_training = model.training
    model.eval()
    weights = {}
    for name, module in model.named_modules():
        for param in gemm_params(module):
            weights[f"{name}.{param}" if name else param] = getattr(module, param).detach()
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The exporter may write the float weights to a side file; export apart, keep one self-contained file.
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(model, example_inputs, str(raw), dynamo=True, opset_version=opset, verbose=False)
        graph_model = onnx.load(str(raw))
    model.train(was_training)
    graph = graph_model.graph
    summary = OnnxSummary(str(path))
    kept, new_nodes = [], []
    for init in graph.initializer:
        weight = weights.get(init.name)
        value = numpy_helper.to_array(init) if weight is not None else None
        found = None
        if (
            weight is not None
            and value.shape == tuple(weight.shape)
            and np.array_equal(value, weight.numpy())
        ):
            found = integer_codes(weight)
        if found is None:
            kept.append(init)
            if weight is not None:
                summary.float_weights.append(init.name)
            continue
        codes, scale = found
        base = init.name
        kept.append(numpy_helper.from_array(codes, f"{base}_quantized"))
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
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))
    return summary


def run_onnx(path: str | Path, *inputs: torch.Tensor) -> list[np.ndarray]:
    """Run the exported model with ONNX Runtime on CPU (for checks against PyTorch)."""
    try:
        import onnxruntime as ort
    except ImportError as err:  # pragma: no cover
        raise ImportError(
            f"checking an ONNX export needs onnxruntime: pip install 'admmcompress[export]' ({err})"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


__all__ = ["OnnxSummary", "export_onnx", "integer_codes", "run_onnx"]
