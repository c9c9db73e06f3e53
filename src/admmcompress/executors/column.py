"""Column (shape) executor: a convolution or Linear that computes only its kept GEMM columns.

Column pruning that does not empty a whole input channel cannot shrink the layer, but its GEMM can:
``ColumnConv2d`` builds the im2col matrix with the kept columns only (one ``index_select`` of the
padded input at precomputed positions) and multiplies it by the ``(out, kept)`` weight;
``ColumnLinear`` gathers the kept input features. ``apply_column_executors`` swaps them in only where
they measure faster than the dense layer on the example input (``mode="auto"``).

>>> conv = nn.Conv2d(4, 3, 3, padding=1)
>>> with torch.no_grad():
...     conv.weight[:, :, 0, :] = 0                  # a third of the columns pruned
>>> fast = ColumnConv2d.from_conv(conv)
>>> x = torch.ones(1, 4, 5, 5)
>>> fast.kept.numel(), bool(torch.allclose(fast(x), conv(x), atol=1e-6))
(24, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from admmcompress.executors.base import image_batch
from admmcompress.executors.fold import capture_inputs
from admmcompress.module_swap import replace_module
from admmcompress.timing import time_interleaved


def kept_columns(weight: torch.Tensor) -> torch.Tensor:
    """Indices of the GEMM columns (input channel x kernel position) with any nonzero entry."""
    matrix = weight.detach().reshape(weight.shape[0], -1)
    return torch.nonzero((matrix != 0).any(dim=0)).flatten()


class ColumnConv2d(nn.Module):
    """A 2-D convolution (``groups=1``, zero padding) that computes only the kept GEMM columns.

    ``weight`` is ``(out_channels, len(kept))``; ``kept`` holds the column indices into the dense
    ``(in_channels * kh * kw)`` axis (a buffer, saved with the state dict).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        columns: int,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.weight = nn.Parameter(torch.zeros(out_channels, columns))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("kept", torch.zeros(columns, dtype=torch.long))
        self._index: dict[tuple[int, int, str], torch.Tensor] = {}

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d) -> ColumnConv2d:
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"ColumnConv2d needs groups=1 and numeric zero padding, got groups={conv.groups}, "
                f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}; keep this layer dense"
            )
        kept = kept_columns(conv.weight)
        out = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            len(kept),
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
        )
        out.kept.copy_(kept)
        out.weight.copy_(conv.weight.reshape(conv.out_channels, -1)[:, kept])
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
        # the conv's dtype too: built in float32, a float64 / half conv became one that rejects its input
        return out.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @property
    def dense_columns(self) -> int:
        """GEMM columns of the dense conv (``in_channels x kh x kw``): ``kept`` indexes into these."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"columns={self.kept.numel()}/{self.dense_columns}, stride={self.stride}, padding={self.padding}"
        )

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # the cached gather positions derive from ``kept``, which this loads (in place, so same tensor)
        self._index = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ColumnConv2d:
        self._index = {}  # a move (.to(device)) gives ``kept`` anew: positions are derived again from it
        return super()._apply(fn, recurse)

    def _positions(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._index:
            kh, kw = self.kernel_size
            (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
            hp, wp = height + 2 * ph, width + 2 * pw
            ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
            kept = self.kept.cpu()
            c, ky, kx = kept // (kh * kw), (kept % (kh * kw)) // kw, kept % kw
            oy = torch.arange(ho).view(1, ho, 1) * sh
            ox = torch.arange(wo).view(1, 1, wo) * sw
            rows = (ky * dh).view(-1, 1, 1) + oy
            cols = (kx * dw).view(-1, 1, 1) + ox
            index = (c.view(-1, 1, 1) * hp * wp + rows * wp + cols).reshape(-1)
            self._index[key] = index.to(device)
        return self._index[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # checked: the gather reads flat positions, so other channel counts would pass unnoticed
        x, batched = image_batch(x, "ColumnConv2d", self.in_channels)
        n, _, h, w = x.shape
        ph, pw = self.padding
        kh, kw = self.kernel_size
        (sh, sw), (dh, dw) = self.stride, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:  # as nn.Conv2d, instead of an empty or failed gather
            raise ValueError(
                f"ColumnConv2d: input of {h}x{w} (padded {h + 2 * ph}x{w + 2 * pw}) is smaller than the dilated "
                f"kernel {dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}; give a larger input"
            )
        padded = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
        columns = padded.reshape(n, -1).index_select(1, self._positions(h, w, x.device))
        out = torch.matmul(self.weight, columns.view(n, self.kept.numel(), ho * wo))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        out = out.view(n, self.out_channels, ho, wo)
        return out if batched else out.squeeze(0)


class ColumnLinear(nn.Module):
    """A Linear that reads only its kept input features: ``y = x[..., kept] @ weight.T + bias``."""

    def __init__(self, in_features: int, out_features: int, columns: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, columns))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("kept", torch.zeros(columns, dtype=torch.long))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> ColumnLinear:
        kept = kept_columns(linear.weight)
        out = cls(linear.in_features, linear.out_features, len(kept), linear.bias is not None)
        out.kept.copy_(kept)
        out.weight.copy_(linear.weight[:, kept])
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
        return out.to(device=linear.weight.device, dtype=linear.weight.dtype)  # as ColumnConv2d.from_conv

    @property
    def dense_columns(self) -> int:
        """Input features of the dense Linear: ``kept`` indexes into these."""
        return self.in_features

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, columns={self.kept.numel()}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:  # the gather reads kept features only: a wider x passes
            width = "a scalar" if x.dim() == 0 else f"{x.shape[-1]} features"
            raise ValueError(f"ColumnLinear: input has {width}, expected in_features={self.in_features}")
        return F.linear(x.index_select(-1, self.kept), self.weight, self.bias)


def column_executor(module: nn.Module) -> nn.Module | None:
    """The column executor for ``module`` (None when it has no pruned column or no executor applies)."""
    if (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return (
            ColumnConv2d.from_conv(module)
            if len(kept_columns(module.weight)) < module.weight[0].numel()
            else None
        )
    if isinstance(module, nn.Linear):
        return (
            ColumnLinear.from_linear(module)
            if len(kept_columns(module.weight)) < module.in_features
            else None
        )
    return None


def time_pair(
    dense: nn.Module, fast: nn.Module, x: torch.Tensor, rounds: int = 9, warmup: int = 3
) -> tuple[float, float]:
    """Median milliseconds of ``dense(x)`` and ``fast(x)``, measured interleaved."""
    ms = time_interleaved({"dense": lambda: dense(x), "fast": lambda: fast(x)}, rounds, warmup)
    return ms["dense"], ms["fast"]


@torch.no_grad()
def apply_column_executors(
    model: nn.Module, example_inputs, mode: str = "auto", min_sparsity: float = 0.25, rounds: int = 9
) -> dict[str, dict[str, Any]]:
    """Replace layers with pruned columns by column executors, in place; returns per-layer decisions.

    ``mode="auto"`` keeps a replacement only where it measured faster on the layer's input from
    ``example_inputs`` (so the batch size of the example matters); ``"on"`` replaces wherever at
    least ``min_sparsity`` of the columns are pruned.
    """
    if mode not in ("auto", "on"):
        raise ValueError(f"apply_column_executors: mode={mode!r} must be 'auto' or 'on'")
    candidates = {}
    for name, module in model.named_modules():
        fast = column_executor(module)
        if fast is None:
            continue
        total = module.weight[0].numel()
        sparsity = 1.0 - fast.kept.numel() / total
        if sparsity >= min_sparsity:
            candidates[name] = (module, fast, sparsity)
    inputs = capture_inputs(model, example_inputs, set(candidates))
    decisions: dict[str, dict[str, Any]] = {}
    for name, (module, fast, sparsity) in candidates.items():
        entry: dict[str, Any] = {"column_sparsity": round(sparsity, 4)}
        if mode == "auto" and name not in inputs:  # not called on the example (or not with a tensor): nothing to time
            entry.update(executor="dense", reason="not called with a tensor on the example inputs")
            decisions[name] = entry
            continue
        if mode == "auto":
            dense_ms, fast_ms = time_pair(module, fast, inputs[name], rounds)
            entry.update(dense_ms=round(dense_ms, 4), column_ms=round(fast_ms, 4))
            use = fast_ms < dense_ms
        else:
            use = True
        entry["executor"] = "column" if use else "dense"
        decisions[name] = entry
        if use:
            replace_module(model, name, fast)
    return decisions



__all__ = [
    "ColumnConv2d",
    "ColumnLinear",
    "apply_column_executors",
    "column_executor",
    "kept_columns",
    "time_pair",
]
