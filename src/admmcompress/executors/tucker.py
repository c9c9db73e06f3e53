"""Tucker-2 convolutions: a k x k conv as 1x1 (I -> r_i), k x k (r_i -> r_o), 1x1 (r_o -> O) (SPEC 11).

``W ~= core x_0 U_out x_1 U_in``: the first 1x1 conv holds ``U_in^T``, the middle conv the core (with the
original stride, padding and dilation), the last 1x1 conv ``U_out`` and the original bias. At full rank the
factorized conv reproduces the original; at lower ranks it computes the conv of the truncated-HOSVD weight
(:class:`admmcompress.structures.lowrank.Tucker2`), which is what ADMM drives the weight to.

Executor ``tucker`` (``convert``): ``get_executor("tucker").convert(model, ranks={"layer1.0.conv1": (8, 8)})``
returns a copy with those convs factorized; ``factorize_tucker2(model, ranks)`` does it in place.

>>> conv = torch.nn.Conv2d(6, 8, 3, padding=1)
>>> block = Tucker2Conv.from_conv(conv, (8, 6))       # full rank: the same function
>>> x = torch.randn(2, 6, 5, 5)
>>> bool(torch.allclose(block(x), conv(x), atol=1e-5))
True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from admmcompress.executors.base import Executor, ExecutorError, register_executor
from admmcompress.module_swap import replace_module
from admmcompress.structures.lowrank import Tucker2, tucker2_factors, tucker2_weight


class Tucker2Conv(nn.Module):
    """Three convs in sequence: ``first`` (1x1, I -> r_i), ``core`` (k x k, r_i -> r_o), ``last`` (1x1, r_o -> O).

    ``factor_params`` names the factors' weights (what reports and storage count for this layer, against the
    dense conv's weights that :attr:`weight` rebuilds; ``structures.groups.factor_params``).
    """

    factor_params: ClassVar[tuple[str, ...]] = ("first.weight", "core.weight", "last.weight")

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int, int]):
        super().__init__()
        r_o, r_i = ranks
        if conv.groups != 1:
            raise ValueError(f"Tucker2Conv: grouped convs (groups={conv.groups}) are not factorized; use groups=1")
        if not (1 <= r_o <= conv.out_channels and 1 <= r_i <= conv.in_channels):
            raise ValueError(
                f"Tucker2Conv: ranks ({r_o}, {r_i}) must be within the conv's (out={conv.out_channels}, "
                f"in={conv.in_channels}); give ranks <= ({conv.out_channels}, {conv.in_channels})"
            )
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.first = nn.Conv2d(conv.in_channels, r_i, 1, bias=False, **kw)
        self.core = nn.Conv2d(r_i, r_o, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                              padding_mode=conv.padding_mode, **kw)
        self.last = nn.Conv2d(r_o, conv.out_channels, 1, bias=conv.bias is not None, **kw)

    @classmethod
    def from_shapes(cls, in_channels: int, out_channels: int, ranks: tuple[int, int], kernel_size, stride, padding,
                    dilation, bias: bool, padding_mode: str = "zeros", first_bias: bool = False,
                    core_bias: bool = False, device: Any = None) -> Tucker2Conv:
        """The module for saved shapes (a manifest's): compaction may leave ranks above the widths it removed, which
        the constructor (made for factorizing a conv) refuses; weights uninitialized, to be loaded."""
        block = nn.Module.__new__(cls)
        nn.Module.__init__(block)
        r_o, r_i = ranks
        kw = {"device": device}
        block.first = nn.Conv2d(in_channels, r_i, 1, bias=first_bias, **kw)
        block.core = nn.Conv2d(r_i, r_o, kernel_size, stride, padding, dilation, bias=core_bias,
                               padding_mode=padding_mode, **kw)
        block.last = nn.Conv2d(r_o, out_channels, 1, bias=bias, **kw)
        return block

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int]) -> Tucker2Conv:
        """Factor ``conv.weight`` by truncated HOSVD at ``ranks`` (exact when the weight already has them)."""
        block = cls(conv, ranks)
        core, u_out, u_in = tucker2_factors(conv.weight, ranks)
        block.first.weight.copy_(u_in.t()[:, :, None, None])
        block.core.weight.copy_(core)
        block.last.weight.copy_(u_out[:, :, None, None])
        if conv.bias is not None:
            block.last.bias.copy_(conv.bias)
        return block

    @property
    def ranks(self) -> tuple[int, int]:
        return self.core.out_channels, self.core.in_channels

    @property
    def factorization(self) -> str:
        """How the layer is factorized, in words (report.md's row of the layer)."""
        return f"Tucker-2, ranks {self.ranks[0]}x{self.ranks[1]}"

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent dense weight, of the conv's shape (the factors in ``factor_params`` are the parameters)."""
        u_out, u_in = self.last.weight[:, :, 0, 0], self.first.weight[:, :, 0, 0].t()
        return tucker2_weight(self.core.weight, u_out, u_in).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))



def factorize_tucker2(model: nn.Module, ranks: Mapping[str, tuple[int, int]], weights: bool = True) -> nn.Module:
    """Replace the named convs of ``model`` (in place) by :class:`Tucker2Conv` at the given ranks.

    ``weights=False`` only builds the modules (shapes for loading a saved state dict).
    """
    modules = dict(model.named_modules())
    for name, pair in ranks.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            found = "no such layer" if conv is None else type(conv).__name__
            raise ExecutorError(f"tucker: layer '{name}' is {found}; name Conv2d layers (ranks={{layer: (r_o, r_i)}})")
        if hasattr(pair, "tolist") and getattr(pair, "ndim", 0) == 1:  # a numpy array or tensor of two ranks
            pair = pair.tolist()
        try:  # the structure's own check: two positive integers, never truncated
            pair = Tucker2(ranks=pair).ranks
        except ValueError as error:
            raise ExecutorError(f"tucker: layer '{name}': {error}") from None
        replace_module(model, name, Tucker2Conv.from_conv(conv, pair) if weights else Tucker2Conv(conv, pair))
    return model


@register_executor("tucker")
class TuckerExecutor(Executor):
    """Tucker-2 factorization of named convs: ``convert(model, ranks={layer: (r_o, r_i)})``."""

    summary = "Tucker-2 factorized convs (1x1 -> k x k -> 1x1)"
    hints = {
        "save": "save the factorized model with get_executor('compact').save (its manifest records the Tucker-2 "
                "convs) or get_executor('packed').save",
        "load": "load it with get_executor('compact').load or get_executor('packed').load",
        "export": "export the run with --compact, --packed or --onnx",
    }

    def convert(self, model: nn.Module, masks: Any = None, example: Any = None, **options: Any) -> nn.Module:
        ranks = options.pop("ranks", None)
        if options:
            raise ExecutorError(f"tucker: unknown option(s) {sorted(options)}; it takes ranks={{layer: (r_o, r_i)}}")
        if not isinstance(ranks, Mapping) or not ranks:
            raise ExecutorError("tucker: give ranks={layer: (r_o, r_i)} naming the convs to factorize")
        work = copy.deepcopy(model)
        if masks is not None:
            masks.apply(work)
        return factorize_tucker2(work, ranks)


__all__ = ["TuckerExecutor", "Tucker2Conv", "factorize_tucker2"]
