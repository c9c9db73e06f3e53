"""PENNI shared-kernel convs: training form, two-stage inference form, and the cross-layer shrink (SPEC 10).

- :class:`SharedKernelConv` (training): parameters ``basis (d, k, k)`` and ``coefs (O, I, d)``; the forward pass
  is an ordinary conv with ``W[o, i] = sum_j coefs[o, i, j] basis[j]`` (SPEC 10.1).
- :class:`TwoStageConv` (inference, SPEC 10.3): stage 1 convolves every kept input channel with each of its
  used basis kernels (one depthwise conv, ``I*d`` maps); stage 2 is a 1x1 conv with the coefficient matrix
  ``(O, I*d)``. Input channels and maps whose coefficients are all zero are left out (a gather of the
  input channels first when some are dead), so pruned coefficients save stage-1 work too.
- :func:`shrink`: dead input/output channels removed across layers (residual groups keep the union of their
  members' channels), through :func:`admmcompress.executors.compact.compact` on the equivalent plain model.

Executor ``penni`` (``convert``): a model with shared-kernel convs (or plain convs and ``bases=d``) becomes
the two-stage model; ``shrink=True`` (with ``example``) also removes dead channels across layers.

>>> conv = torch.nn.Conv2d(4, 6, 3, padding=1)
>>> shared = SharedKernelConv.from_conv(conv, bases=9)         # d = k*k: exact
>>> x = torch.randn(2, 4, 7, 7)
>>> bool(torch.allclose(TwoStageConv.from_shared(shared)(x), conv(x), atol=1e-5))
True
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from admmcompress.executors.base import Executor, ExecutorError, register_executor
from admmcompress.module_swap import replace_module
from admmcompress.structures.lowrank import (
    SharedKernels,
    shared_kernel_blocker,
    shared_kernel_factors,
    shared_kernel_weight,
)
from admmcompress.structures.scalars import plain_number


def _check_conv(conv: nn.Conv2d, what: str) -> None:
    reason = shared_kernel_blocker(conv)
    if reason is not None:
        raise ValueError(f"{what}: {reason}")


def _bases(name: str, d: Any) -> int:
    """``d`` as a positive int (the structure's own check): 8.9 bases is an error, not 8."""
    try:
        return SharedKernels(bases=d).bases
    except ValueError as error:
        raise ExecutorError(f"penni: layer '{name}': {error}") from None


class SharedKernelConv(nn.Module):
    """A conv whose kernels share ``d`` basis kernels; trains ``basis`` and ``coefs`` (PENNI's training form).

    ``factor_params`` names the factors' weights (what reports and storage count for this layer, against the
    dense conv's weights that :attr:`weight` rebuilds; ``structures.groups.factor_params``).
    """

    factor_params: ClassVar[tuple[str, ...]] = ("basis", "coefs")

    def __init__(self, conv: nn.Conv2d, bases: int):
        super().__init__()
        _check_conv(conv, "SharedKernelConv")
        kh, kw = conv.kernel_size
        if not 1 <= bases <= kh * kw:
            raise ValueError(f"SharedKernelConv: bases={bases} must be in 1..{kh * kw} for {kh}x{kw} kernels")
        kw_ = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.basis = nn.Parameter(torch.zeros(bases, kh, kw, **kw_))
        self.coefs = nn.Parameter(torch.zeros(conv.out_channels, conv.in_channels, bases, **kw_))
        self.bias = nn.Parameter(torch.zeros(conv.out_channels, **kw_)) if conv.bias is not None else None
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, (kh, kw)
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, bases: int) -> SharedKernelConv:
        """PCA of the conv's kernels without the mean (SPEC 10.1): exact at ``bases = k*k``."""
        module = cls(conv, bases)
        coefs, basis = shared_kernel_factors(conv.weight, bases)
        module.coefs.copy_(coefs)
        module.basis.copy_(basis)
        if conv.bias is not None:
            module.bias.copy_(conv.bias)
        return module

    @property
    def factorization(self) -> str:
        """How the layer is factorized, in words (report.md's row of the layer)."""
        return f"{self.basis.shape[0]} shared kernels"

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed conv weight ``(O, I, k, k)``, the dense conv's shape (``factor_params`` are the
        parameters)."""
        return shared_kernel_weight(self.coefs, self.basis).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bases={self.basis.shape[0]}"


class TwoStageConv(nn.Module):
    """Stage 1: depthwise conv of the kept input channels with their used basis kernels; stage 2: 1x1 conv.

    ``index`` (a buffer, or None when every input channel is used once per basis kernel in order) selects the
    input channel of each stage-1 map.
    """

    def __init__(self, maps: list[tuple[int, int]], in_channels: int, out_channels: int, bases: int,
                 kernel_size: tuple[int, int], stride, padding, dilation, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if not maps:
            raise ValueError("TwoStageConv: no map is used (every coefficient is zero); keep at least one")
        channels = [i for i, _ in maps]
        self.maps = list(maps)
        self.in_channels, self.out_channels = in_channels, out_channels
        grid = [(i, j) for i in range(in_channels) for j in range(bases)]
        if maps == grid:  # every map of every channel: a plain depthwise conv with channel multiplier d
            self.index = None
            self.stage1 = nn.Conv2d(in_channels, len(maps), kernel_size, stride, padding, dilation,
                                    groups=in_channels, bias=False, dtype=dtype, device=device)
        else:
            self.register_buffer("index", torch.tensor(channels, dtype=torch.long, device=device))
            self.stage1 = nn.Conv2d(len(maps), len(maps), kernel_size, stride, padding, dilation,
                                    groups=len(maps), bias=False, dtype=dtype, device=device)
        self.stage2 = nn.Conv2d(len(maps), out_channels, 1, bias=bias, dtype=dtype, device=device)

    @classmethod
    @torch.no_grad()
    def from_shared(cls, module: SharedKernelConv, drop_dead: bool = True) -> TwoStageConv:
        """The inference form of ``module``; ``drop_dead`` leaves out maps whose coefficients are all zero."""
        coefs, basis = module.coefs.detach(), module.basis.detach()
        used = coefs.ne(0).any(dim=0) if drop_dead else torch.ones(coefs.shape[1:], dtype=torch.bool)
        if not bool(used.any()):
            used[0, 0] = True  # an all-zero layer still needs one (zero) map to give its output shape
        maps = [(int(i), int(j)) for i, j in used.nonzero().tolist()]
        out = cls(maps, module.in_channels, module.out_channels, basis.shape[0], module.kernel_size, module.stride,
                  module.padding, module.dilation, module.bias is not None, dtype=coefs.dtype, device=coefs.device)
        rows, cols = torch.tensor([i for i, _ in maps]), torch.tensor([j for _, j in maps])
        out.stage1.weight.copy_(basis[cols].unsqueeze(1))
        out.stage2.weight.copy_(coefs[:, rows, cols][:, :, None, None])
        if module.bias is not None:
            out.stage2.bias.copy_(module.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            x = x.index_select(1, self.index)
        return self.stage2(self.stage1(x))

    def macs(self, out_hw: tuple[int, int]) -> int:
        """Multiply-accumulates of one sample at output size ``out_hw``: ``H'W' (M k^2 + nnz(stage 2))``."""
        positions = math.prod(out_hw)
        kernel = math.prod(self.stage1.kernel_size)
        return positions * (len(self.maps) * kernel + int(self.stage2.weight.count_nonzero()))



def decompose_shared_kernels(model: nn.Module, bases: Mapping[str, int], weights: bool = True) -> nn.Module:
    """Replace the named convs (in place) by :class:`SharedKernelConv` with ``bases[name]`` basis kernels.

    ``weights=False`` only builds the modules (the shapes a saved state dict is loaded into).
    """
    modules = dict(model.named_modules())
    for name, d in bases.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            found = "no such layer" if conv is None else type(conv).__name__
            raise ExecutorError(f"penni: layer '{name}' is {found}; name Conv2d layers (bases={{layer: d}})")
        d = _bases(name, d)
        shared = SharedKernelConv.from_conv(conv, d) if weights else SharedKernelConv(conv, d)
        replace_module(model, name, shared)
    return model


def shared_layers(model: nn.Module) -> list[str]:
    """Names of the :class:`SharedKernelConv` modules of ``model``, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, SharedKernelConv)]


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """A copy whose shared-kernel convs are plain ``Conv2d`` with the reconstructed weights (same function)."""
    work = copy.deepcopy(model)
    for name in shared_layers(work):
        module = work.get_submodule(name)
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                         module.dilation, bias=module.bias is not None, dtype=module.coefs.dtype,
                         device=module.coefs.device)
        conv.weight.copy_(module.weight)
        if module.bias is not None:
            conv.bias.copy_(module.bias)
        replace_module(work, name, conv)
    return work


@torch.no_grad()
def to_two_stage(model: nn.Module, drop_dead: bool = True) -> nn.Module:
    """A copy with every :class:`SharedKernelConv` in its two-stage form (the input model is unchanged; a
    :class:`SharedKernelConv` given alone comes back as one :class:`TwoStageConv`)."""
    if isinstance(model, SharedKernelConv):
        return TwoStageConv.from_shared(model, drop_dead)
    work = copy.deepcopy(model)
    for name in shared_layers(work):
        replace_module(work, name, TwoStageConv.from_shared(work.get_submodule(name), drop_dead))
    return work


@torch.no_grad()
def compact_shared(model: nn.Module, example: Any, masks: Any = None, config: Any = None) -> Any:
    """:func:`~admmcompress.executors.compact.compact` for a model holding :class:`SharedKernelConv` layers.

    Torch-Pruning cannot follow channels through a shared-kernel conv (its kernels are computed, not a layer's
    weight), so the plain equivalent model (:func:`materialize`) is compacted, which removes a filter whose
    coefficients are all zero (and whose BN shift is zero or foldable) and an input channel no layer reads, and
    keeps the union of channels across residual adds. Each shrunk layer keeps its basis; its coefficients are
    solved back from the shrunk kernels (least squares on the same basis: exact up to rounding, entries below
    ``1e-6`` of the layer's largest set to zero). Column executors (``config.columns``) go on the plain convs
    only. Returns the ``CompactionResult``, its ``max_abs_diff`` that of the shared-kernel result on ``example``.
    """
    from admmcompress.executors.compact import CompactConfig, _max_diff, _reference_outputs, compact, count_params

    config = config or CompactConfig()
    work = copy.deepcopy(model)
    if masks is not None:
        masks.apply(work)
    names = shared_layers(work)
    result = compact(materialize(work), example, config=dataclasses.replace(config, columns="off"))
    small = result.model
    for name in names:
        original, conv = work.get_submodule(name), small.get_submodule(name)
        shared = SharedKernelConv(conv, original.basis.shape[0])
        basis = original.basis.detach().reshape(shared.basis.shape[0], -1)
        kernels = conv.weight.detach().reshape(conv.out_channels * conv.in_channels, -1)
        coefs = torch.linalg.lstsq(basis.t().double(), kernels.t().double()).solution.t()
        coefs[coefs.abs() <= 1e-6 * coefs.abs().max().clamp_min(1e-30)] = 0
        if int(coefs.count_nonzero()) > int(original.coefs.count_nonzero()):  # lstsq filled a pruned zero back in
            raise ExecutorError(
                f"penni shrink: layer '{name}' has {int(coefs.count_nonzero())} nonzero coefficients after shrinking, "
                f"more than the {int(original.coefs.count_nonzero())} it had (its basis is near rank-deficient); "
                "decompose with fewer bases"
            )
        shared.basis.copy_(original.basis)
        shared.coefs.copy_(coefs.reshape(shared.coefs.shape))
        if conv.bias is not None:
            shared.bias.copy_(conv.bias)
        shared.basis.requires_grad_(original.basis.requires_grad)
        shared.coefs.requires_grad_(original.coefs.requires_grad)
        replace_module(small, name, shared)
    if config.columns != "off":
        from admmcompress.executors.column import apply_column_executors

        result.columns = apply_column_executors(small, example, mode=config.columns, min_sparsity=0.0)
    work.eval()
    small.eval()
    outputs = _reference_outputs(work, example), _reference_outputs(small, example)
    result.max_abs_diff = max(result.max_abs_diff, _max_diff(*outputs))  # compact()'s own comparison
    result.params_before, result.params_after = count_params(work), count_params(small)
    if not result.max_abs_diff <= config.atol:
        from admmcompress.executors.compact import CompactionError

        raise CompactionError(f"the compacted shared-kernel model differs from the input model by "
                              f"{result.max_abs_diff:.3g} (> atol={config.atol:g}); report the model")
    return result


@torch.no_grad()
def shrink(model: nn.Module, example: Any, atol: float = 1e-5) -> nn.Module:
    """Remove dead input/output channels across layers, then the two-stage form (SPEC 10.2 "shrink").

    :func:`compact_shared` with ``strict=False`` (PENNI keeps the union of channels across residual adds); the
    result is checked against ``model`` on ``example`` (eval mode, ``atol``).
    """
    from admmcompress.executors.compact import CompactConfig

    with warnings.catch_warnings():  # channels a residual partner still writes stay: PENNI keeps the union
        warnings.filterwarnings("ignore", message="compact: ", category=RuntimeWarning)
        small = compact_shared(model, example, config=CompactConfig(strict=False, atol=atol)).model
    result = to_two_stage(small)
    was = model.training
    model.eval()
    result.eval()
    inputs = example if isinstance(example, tuple) else (example,)
    diff = (model(*inputs) - result(*inputs)).abs().max().item()
    model.train(was)
    if not diff <= atol:
        raise ExecutorError(f"penni shrink: the shrunk model differs from the input model by {diff:.3g} (> {atol:g})")
    return result


@register_executor("penni")
class PenniExecutor(Executor):
    """Two-stage shared-kernel convs: ``convert(model, example=x, shrink=False, bases=None)``.

    ``bases`` (``{layer: d}`` or one ``d`` for every k x k conv) decomposes plain convs first.
    """

    summary = "PENNI two-stage convs (depthwise basis conv + 1x1 coefficient conv)"
    hints = {
        "save": "save the shared-kernel model with get_executor('compact').save (its manifest records them) and "
                "convert after loading it, or write the two-stage model with get_executor('onnx')",
        "load": "load the shared-kernel model with get_executor('compact').load, then convert it",
        "export": "export the run with --compact (shared-kernel convs kept) or --onnx (two-stage form)",
    }

    def convert(self, model: nn.Module, masks: Any = None, example: Any = None, **options: Any) -> nn.Module:
        bases = options.pop("bases", None)
        do_shrink = bool(options.pop("shrink", False))
        if options:
            raise ExecutorError(f"penni: unknown option(s) {sorted(options)}; it takes bases=, shrink=")
        work = copy.deepcopy(model)
        if masks is not None:
            masks.apply(work)
        if bases is not None:
            if not isinstance(bases, Mapping):
                d = _bases("every k x k conv", plain_number(bases))
                # every conv the two-stage form can express (1x1, grouped and non-zero-padded convs stay)
                bases = {n: d for n, m in work.named_modules()
                         if isinstance(m, nn.Conv2d) and math.prod(m.kernel_size) > 1
                         and shared_kernel_blocker(m) is None}
            decompose_shared_kernels(work, bases)
        if not shared_layers(work):
            raise ExecutorError("penni: the model has no shared-kernel conv; pass bases=d to decompose its convs")
        if do_shrink:
            if example is None:
                raise ExecutorError("penni: shrink=True needs example= (an input batch) to trace channel groups")
            return shrink(work, example)
        return to_two_stage(work)


__all__ = [
    "PenniExecutor",
    "SharedKernelConv",
    "TwoStageConv",
    "compact_shared",
    "decompose_shared_kernels",
    "materialize",
    "shared_layers",
    "shrink",
    "to_two_stage",
]
