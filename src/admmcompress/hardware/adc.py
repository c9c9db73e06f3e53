"""Finite ADC resolution: each tile's partial sum is converted with ``bits`` before the digital sum (modelled).

A layer's GEMM ``y = W x`` is split by the crossbar's input blocks (``inputs_per_tile`` wordlines per tile):
``y = sum_b W[:, b] x[b]``. Each partial sum ``W[:, b] x[b]`` leaves its tile through an ADC with
``2^bits - 1`` levels, uniform and symmetric on ``[-FS_b, FS_b]`` (``FS_b`` = the largest ``|partial sum|`` seen on
a calibration batch, per layer and block: the gain a designer would set), and the digital periphery adds the
converted values. Inputs are treated as analog values applied at once (one conversion per tile and
output), a simplification of bit-serial 1-bit DACs, stated wherever results are shown.

Linear and ``Conv2d`` (``groups=1``, integer padding, zero padding mode) layers are covered; the conv runs
as an im2col GEMM. Other layers keep exact arithmetic and are listed in ``skipped``.

>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> x = torch.randn(16, 8)
>>> exact = model(x)
>>> with adc_quantization(model, 12, x, inputs_per_tile=4) as adc:
...     close = (model(x) - exact).abs().max().item() < 1e-2
>>> close, adc.skipped
(True, [])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from admmcompress.hardware.crossbar import gemm_layers


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _columns(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Inputs as ``(N, K, P)`` GEMM columns and the output shape to restore."""
    if isinstance(module, nn.Linear):
        lead = x.shape[:-1]
        return x.reshape(-1, x.shape[-1], 1), (*lead, module.out_features)
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    h = (x.shape[2] + 2 * module.padding[0] - module.dilation[0] * (module.kernel_size[0] - 1) - 1) // module.stride[0]
    w = (x.shape[3] + 2 * module.padding[1] - module.dilation[1] * (module.kernel_size[1] - 1) - 1) // module.stride[1]
    return cols, (x.shape[0], module.out_channels, h + 1, w + 1)


def _partials(module: nn.Module, x: torch.Tensor, inputs_per_tile: int) -> tuple[list[torch.Tensor], Any]:
    cols, shape = _columns(module, x)
    matrix = module.weight.reshape(module.weight.shape[0], -1)
    parts = []
    for start in range(0, matrix.shape[1], inputs_per_tile):
        block = slice(start, start + inputs_per_tile)
        parts.append(torch.matmul(matrix[:, block], cols[:, block, :]))  # (N, O, P)
    return parts, shape


def _assemble(module: nn.Module, total: torch.Tensor, shape: Any) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        out = total.squeeze(-1).reshape(shape)
    else:
        out = total.reshape(shape)
    if module.bias is not None:
        bias = module.bias if isinstance(module, nn.Linear) else module.bias.view(1, -1, 1, 1)
        out = out + bias
    return out


@dataclass
class ADCModel:
    """Installed ADC hooks: per-layer full-scale ranges and the layers left exact."""

    bits: int
    inputs_per_tile: int
    full_scale: dict[str, list[float]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    # of `skipped`, the Linear/Conv2d layers the model covers that the calibration pass never called through their
    # own forward (an unused layer, MultiheadAttention's out_proj): left exact for that reason, not for their kind
    uncalled: list[str] = field(default_factory=list)


@contextlib.contextmanager
def adc_quantization(
    model: nn.Module, bits: int, calibration: torch.Tensor, inputs_per_tile: int = 128
) -> Iterator[ADCModel]:
    """Inside the block every supported layer's tile partial sums pass a ``bits``-bit ADC.

    ``calibration`` is an input batch; one exact forward pass on it sets each ADC's full scale.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 24:
        raise ValueError(f"adc_quantization: bits={bits!r} must be an integer in [2, 24], e.g. 8")
    if isinstance(inputs_per_tile, bool) or not isinstance(inputs_per_tile, int) or inputs_per_tile < 1:
        raise ValueError(
            f"adc_quantization: inputs_per_tile={inputs_per_tile!r} must be a positive integer (the tile's wordlines), "
            "e.g. 128"
        )
    state = ADCModel(bits, inputs_per_tile)
    layers = {name: m for name, m in gemm_layers(model) if _supported(m)}
    state.skipped = [name for name, m in gemm_layers(model) if name not in layers]
    handles = []

    def calibrate(name: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            parts, _ = _partials(module, args[0], inputs_per_tile)
            scales = [float(p.abs().max()) for p in parts]
            # A layer called several times (shared, in a loop) has one ADC: its full scale covers every call (the
            # last call's alone clipped the others' partial sums, even at 16 bits)
            seen = state.full_scale.get(name, scales)
            state.full_scale[name] = [max(a, b) for a, b in zip(seen, scales, strict=True)]

        return hook

    def convert(name: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            parts, shape = _partials(module, args[0], inputs_per_tile)
            top = 2 ** (bits - 1) - 1  # symmetric levels -top..top (2^bits - 1 of them)
            total = torch.zeros_like(parts[0])
            for part, scale in zip(parts, state.full_scale[name], strict=True):
                step = scale / top if scale > 0 else 1.0
                total = total + torch.clamp(torch.round(part / step), -top, top) * step
            return _assemble(module, total, shape)

        return hook

    modes = [(m, m.training) for m in model.modules()]  # each layer's own: a frozen BatchNorm stays in eval
    model.eval()
    try:
        handles = [m.register_forward_hook(calibrate(name)) for name, m in layers.items()]
        with torch.no_grad():
            model(calibration)
        for h in handles:
            h.remove()
        # A layer the calibration pass never called through its own forward (MultiheadAttention's out_proj) has no
        # full scale and would never be converted: named in `skipped`, not counted as covered
        state.skipped = [name for name, _ in gemm_layers(model) if name not in state.full_scale]
        state.uncalled = [name for name in state.skipped if name in layers]
        handles = [m.register_forward_hook(convert(name)) for name, m in layers.items() if name in state.full_scale]
        yield state
    finally:
        for h in handles:
            h.remove()
        for module, training in modes:
            module.training = training


__all__ = ["ADCModel", "adc_quantization"]
