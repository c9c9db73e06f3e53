"""Deprecated: one call to ship a compacted model (manifest + safetensors, and ONNX), each checked.

Use the executors instead: ``get_executor("compact").save(model, folder, model_spec=...)`` /
``.load(folder)`` and ``get_executor("onnx").save(model, folder / "model.onnx", example=x)`` (which
checks the file against ONNX Runtime). ``export_compacted`` stays for one release; it writes
``manifest.json`` and ``model.safetensors`` (rebuilt with ``load_compacted`` and compared with the
model) and, with ``onnx=True``, ``model.onnx`` exported by
:func:`admmcompress.executors.onnx_export.export_onnx` and run with ONNX Runtime on the example
inputs. Any difference above ``atol`` raises; the returned dict holds the measured differences.

>>> summary = export_compacted(result.model, x, "out/resnet20_small",            # doctest: +SKIP
...                            model_spec={"name": "resnet20", "kwargs": {}})
>>> summary["onnx_max_abs_diff"] < 1e-4                                         # doctest: +SKIP
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import deprecated

from admmcompress.executors.fold import forward
from admmcompress.executors.manifest import _write_compacted, load_compacted


@deprecated(
    "export_compacted(model, x, folder, spec) is deprecated; use "
    "admmcompress.executors.get_executor('compact').save(model, folder, model_spec=spec) and "
    "get_executor('onnx').save(model, folder / 'model.onnx', example=x)"
)
@torch.no_grad()
def export_compacted(
    model: nn.Module,
    example_inputs,
    folder: str | Path,
    model_spec: dict[str, Any] | None = None,
    onnx: bool = True,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Deprecated: save ``model`` into ``folder`` (manifest, safetensors, optionally ONNX), verify each file."""
    folder = Path(folder)
    model = model.eval()
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    expected = forward(model, example_inputs)
    _write_compacted(model, folder, model_spec)
    skeleton = None
    if model_spec is None:
        import copy

        skeleton = copy.deepcopy(model)  # same code; its widths are replaced from the manifest anyway
    restored = load_compacted(folder, skeleton).eval()
    summary: dict[str, Any] = {
        "folder": str(folder),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    summary["reload_max_abs_diff"] = float((forward(restored, example_inputs) - expected).abs().max())
    if summary["reload_max_abs_diff"] > atol:
        raise RuntimeError(
            f"reloading '{folder}' changed the outputs by {summary['reload_max_abs_diff']:.3g}"
        )
    if onnx:
        from admmcompress.executors.onnx_export import export_onnx, run_onnx

        path = folder / "model.onnx"
        export_onnx(model, inputs, path)
        got = torch.from_numpy(run_onnx(path, *inputs)[0])
        summary["onnx"] = str(path)
        summary["onnx_max_abs_diff"] = float((got - expected).abs().max())
        if summary["onnx_max_abs_diff"] > atol:
            raise RuntimeError(
                f"onnxruntime's outputs for '{path}' differ from torch's by "
                f"{summary['onnx_max_abs_diff']:.3g}"
            )
    return summary


__all__ = ["export_compacted"]
