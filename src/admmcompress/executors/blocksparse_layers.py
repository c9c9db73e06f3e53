"""Block-sparse replacements for ``nn.Linear`` and ``nn.Conv2d`` (inference; same outputs as dense).

``BlockSparseLinear.from_dense(linear)`` packs the (pruned) weight into a
:class:`~admmcompress.executors.blockmatrix.BlockSparseMatrix`; ``BlockSparseConv2d`` runs the
convolution as im2col (``F.unfold``) followed by the same block-sparse GEMM, whose columns are
the conv's GEMM-view columns ``(channel, ky, kx)``.

>>> conv = nn.Conv2d(3, 8, 3, padding=1)
>>> fast = BlockSparseConv2d.from_dense(conv, block_rows=4)
>>> x = torch.randn(2, 3, 5, 5)
>>> torch.allclose(fast(x), conv(x), atol=1e-5)
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from admmcompress.executors.base import image_batch
from admmcompress.executors.blockmatrix import BlockSparseMatrix, InferenceOnly

_TORCH_MODULE = torch.nn.modules.module


def _global_hooks() -> bool:
    """Whether ``register_module_forward_(pre_)hook`` hooks exist (torch keeps them in module-level dicts)."""
    module = _TORCH_MODULE
    return bool(getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None))


class BlockSparseLinear(InferenceOnly):
    """``y = x @ W.T + b`` with a block-sparse ``W`` (bias inside the matrix); input ``(..., I)``."""

    def __init__(self, matrix: BlockSparseMatrix):
        super().__init__()
        self.matrix = matrix
        self.in_features, self.out_features = matrix.in_features, matrix.out_features

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_rows: int = 16, **kwargs) -> BlockSparseLinear:
        return cls(BlockSparseMatrix(linear.weight, block_rows, bias=linear.bias, **kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matrix = self._modules["matrix"]  # not self.matrix: nn.Module.__getattr__ costs a few tenths of a us
        # The matrix's forward without a second module call when no hook would see the matrix: at batch 1 a
        # 10x-sparse 768x3072 product takes ~20 us, and the extra call cost ~4 us of it (cold caches, 2026-12).
        hooked = matrix._forward_hooks or matrix._forward_pre_hooks or _global_hooks()
        run = matrix if hooked else matrix.forward
        if x.dim() == 2:  # the common case, without the reshapes (they cost as much as a small product)
            return run(x)
        return run(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)


def conv_blockers(conv: nn.Conv2d) -> tuple[list[str], tuple[int, ...]]:
    """Why ``conv`` cannot run block-sparse (empty when it can), and its padding as numbers: ``(ph, pw)`` on both
    sides, or for ``padding='same'`` with an even span ``(ph, pw, bottom, right)``, the extra row and column torch
    pads on the bottom and right only."""
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (only 1 is supported)")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r} (only 'zeros')")
    padding = conv.padding
    if padding == "valid":
        return problems, (0, 0)
    if padding == "same":  # stride 1 (torch refuses 'same' otherwise); total d*(k-1), the odd one bottom/right
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        sides = tuple(t // 2 for t in totals)
        extra = tuple(t % 2 for t in totals)
        return problems, sides + extra if any(extra) else sides
    return problems, tuple(padding)


class BlockSparseConv2d(InferenceOnly):
    """A 2-D convolution (``groups=1``, zero padding, 'same' included) as im2col + block-sparse GEMM."""

    def __init__(
        self,
        matrix: BlockSparseMatrix,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ):
        super().__init__()
        self.matrix = matrix
        # (ph, pw) on both sides, then the extra bottom row / right column of padding='same' with an even span
        self.padding, self.extra_padding = tuple(padding[:2]), tuple(padding[2:]) or (0, 0)
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.out_channels = matrix.out_features
        self.in_channels = matrix.in_features // (kernel_size[0] * kernel_size[1])

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, block_rows: int = 16, name: str = "conv", **kwargs
    ) -> BlockSparseConv2d:
        problems, padding = conv_blockers(conv)
        if problems:
            raise ValueError(
                f"layer '{name}' (Conv2d): cannot run block-sparse with {', '.join(problems)}; "
                "leave it dense (pass layers=... without it)"
            )
        weight = conv.weight.reshape(conv.out_channels, -1)
        matrix = BlockSparseMatrix(weight, block_rows, bias=conv.bias, **kwargs)
        return cls(matrix, conv.kernel_size, conv.stride, tuple(padding), conv.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # checked: else the product's own check counts im2col columns, not channels
        x, batched = image_batch(x, "BlockSparseConv2d", self.in_channels)
        if any(self.extra_padding):
            x = F.pad(x, (0, self.extra_padding[1], 0, self.extra_padding[0]))
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, L)
        out_h = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[
            0
        ] + 1
        out_w = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[
            1
        ] + 1
        # im2col gives the GEMM inputs column by column, (C*kh*kw, L) per image: hand them over that way
        xt = cols[0] if n == 1 else cols.transpose(0, 1).reshape(cols.shape[1], -1)
        y = self.matrix.forward_transposed(xt)  # (N*L, O), bias included
        y = (
            y.view(n, out_h * out_w, self.out_channels)
            .transpose(1, 2)
            .reshape(n, self.out_channels, out_h, out_w)
        )
        return y if batched else y.squeeze(0)

    def extra_repr(self) -> str:
        extra = f", extra_padding={self.extra_padding}" if any(self.extra_padding) else ""
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}{extra}"


__all__ = ["BlockSparseConv2d", "BlockSparseLinear"]
