"""Low-rank structures: a conv weight that factorizes, Tucker-2 (TDC, SPEC 11) or shared kernels (PENNI, SPEC 10).

Unlike pruning and quantization, these sets are not support patterns: every entry may stay nonzero, but the
weight must factor into smaller tensors. ``factorizes`` is True on them; ``support`` is all True. After the
driving phase the weight is replaced by its factors (``admmcompress.executors.tucker`` / ``.penni``).

- :class:`Tucker2` ``(ranks=(r_o, r_i))``: multilinear ranks of modes 0 (output) and 1 (input) at most
  ``(r_o, r_i)``. The projection is the truncated HOSVD of those two modes, computed with TensorLy's
  ``partial_tucker`` stopped before any HOOI sweep. Truncated HOSVD is *quasi-optimal*: its error is at most
  ``sqrt(2)`` times the error of the nearest point of the set, not always the nearest point itself.
- :class:`SharedKernels` ``(bases=d)``: every k x k kernel is a combination of the same ``d`` basis kernels,
  i.e. the ``(O*I, k*k)`` matrix of kernels has rank at most ``d``. The decomposition here is PCA of that matrix
  without the mean, which is the truncated SVD: the exact Euclidean projection (Eckart-Young), and at
  ``d = k*k`` the weight itself. PENNI's released code runs scikit-learn's PCA, which centres the kernels first
  and drops the mean, so its starting weight is about ``W - mean`` and its bases differ; the uncentred form is
  kept on purpose (the network's function is preserved at full rank).

>>> w = torch.randn(8, 6, 3, 3)
>>> z = Tucker2(ranks=(4, 3)).project(w)
>>> [int(torch.linalg.matrix_rank(z.movedim(m, 0).reshape(z.shape[m], -1))) for m in (0, 1)]
[4, 3]
>>> coefs, basis = shared_kernel_factors(w, 5)
>>> coefs.shape, basis.shape
(torch.Size([8, 6, 5]), torch.Size([5, 3, 3]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from admmcompress.structures.base import Structure, register_structure
from admmcompress.structures.scalars import plain_number


def _require_tensorly():
    try:
        import tensorly
        from tensorly.decomposition import partial_tucker
    except ImportError:  # an optional extra: say how to get it
        raise ImportError("the tucker2 structure needs TensorLy: pip install 'admmcompress[lowrank]'") from None
    return tensorly, partial_tucker


def _no_rate(kind: str, spec: Mapping[str, Any], example: str) -> None:
    """A low-rank rule takes no sparsity/compression (it would be dropped): say so, as quantization rules do."""
    given = sorted(k for k in ("sparsity", "compression") if spec.get(k) is not None)
    if given:
        raise ValueError(f"structure '{kind}' takes no {given[0]} (it sets {example}); prune the layer with a separate "
                         "rule of its own structure")


def _conv_dims(module: torch.nn.Module, name: str, kind: str) -> tuple[int, int, tuple[int, ...]]:
    if not isinstance(module, torch.nn.Conv2d):
        raise ValueError(
            f"layer '{name}' is {type(module).__name__}; structure '{kind}' factorizes Conv2d weights only. "
            "Narrow the rule (e.g. type: Conv2d)"
        )
    if module.groups != 1:
        raise ValueError(
            f"layer '{name}' is a grouped conv (groups={module.groups}); structure '{kind}' needs groups=1. "
            "Narrow the rule's pattern to ungrouped convs"
        )
    return module.out_channels, module.in_channels, tuple(module.kernel_size)


@register_structure("tucker2")
@dataclass(frozen=True)
class Tucker2(Structure):
    """Tucker-2 ranks ``(r_o, r_i)`` of modes 0 and 1 of a conv weight (or ``rank_ratio`` of each dimension).

    Give ``ranks`` (two positive integers) or ``rank_ratio`` (in (0, 1]; ranks ``ceil(ratio * O)``,
    ``ceil(ratio * I)``, fixed per layer when a plan binds the structure to it).
    """

    ranks: tuple[int, int] | None = None
    rank_ratio: float | None = None
    quantizes: ClassVar[bool] = False
    factorizes: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ("ranks", "rank_ratio")

    def __post_init__(self) -> None:
        if (self.ranks is None) == (self.rank_ratio is None):
            raise ValueError("Tucker2: give exactly one of ranks=[r_out, r_in] or rank_ratio=... (in (0, 1])")
        if self.ranks is not None:
            ranks = tuple(plain_number(r) for r in self.ranks) if isinstance(self.ranks, (list, tuple)) else None
            if ranks is None or len(ranks) != 2 or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks
            ):
                raise ValueError(f"Tucker2: ranks={self.ranks!r} must be two positive integers [r_out, r_in]")
            object.__setattr__(self, "ranks", ranks)
        else:
            ratio = plain_number(self.rank_ratio)
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"Tucker2: rank_ratio={self.rank_ratio!r} must be in (0, 1], e.g. 0.5 for half rank")
            object.__setattr__(self, "rank_ratio", float(ratio))

    def ranks_for(self, weight_shape: tuple[int, ...], name: str = "the weight") -> tuple[int, int]:
        """The concrete ``(r_o, r_i)`` for a weight of this shape; raises if they exceed its dimensions."""
        out_dim, in_dim = int(weight_shape[0]), int(weight_shape[1])
        if self.ranks is None:
            return max(1, math.ceil(self.rank_ratio * out_dim)), max(1, math.ceil(self.rank_ratio * in_dim))
        r_o, r_i = self.ranks
        if r_o > out_dim or r_i > in_dim:
            raise ValueError(
                f"Tucker2 ranks ({r_o}, {r_i}) exceed {name}'s dimensions (out={out_dim}, in={in_dim}); "
                f"give ranks <= ({out_dim}, {in_dim})"
            )
        return r_o, r_i

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Truncated HOSVD of modes 0 and 1 (quasi-optimal, see the module docstring)."""
        core, u_out, u_in = tucker2_factors(weight, self.ranks_for(tuple(weight.shape)))
        return tucker2_weight(core, u_out, u_in)

    def support(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(weight, dtype=torch.bool)

    def check_module(self, module: torch.nn.Module, name: str) -> None:
        out_dim, in_dim, _ = _conv_dims(module, name, self.kind)
        self.ranks_for((out_dim, in_dim), f"layer '{name}'")

    def params(self, module: torch.nn.Module) -> list[str]:
        return ["weight"]

    def bind(self, module: torch.nn.Module, param: str) -> Tucker2:
        """Concrete ranks for this layer (a ``rank_ratio`` becomes ``ranks``)."""
        return Tucker2(ranks=self.ranks_for(tuple(module.weight.shape)))

    def to_dict(self) -> dict[str, Any]:
        if self.ranks is not None:
            return {"structure": self.kind, "ranks": list(self.ranks)}
        return {"structure": self.kind, "rank_ratio": self.rank_ratio}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Tucker2:
        _no_rate(cls.kind, spec, "ranks: [4, 8]")
        return cls(ranks=spec.get("ranks"), rank_ratio=spec.get("rank_ratio"))

    @classmethod
    def example(cls) -> Tucker2:
        return cls(ranks=(2, 2))


@register_structure("shared_kernels", aliases=("penni",))
@dataclass(frozen=True)
class SharedKernels(Structure):
    """Every k x k kernel of a conv is a combination of ``bases`` shared basis kernels (PENNI, SPEC 10.1)."""

    bases: int = 5
    quantizes: ClassVar[bool] = False
    factorizes: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ("bases",)

    def __post_init__(self) -> None:
        bases = plain_number(self.bases)
        if isinstance(bases, bool) or not isinstance(bases, int) or bases < 1:
            raise ValueError(f"SharedKernels: bases={self.bases!r} must be a positive integer, e.g. 5 for 3x3 kernels")
        object.__setattr__(self, "bases", bases)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """The nearest weight whose kernels span at most ``bases`` dimensions (truncated SVD, exact)."""
        coefs, basis = shared_kernel_factors(weight, min(self.bases, _kernel_matrix(weight).shape[1]))
        return shared_kernel_weight(coefs, basis).reshape(weight.shape)

    def support(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(weight, dtype=torch.bool)

    def check_module(self, module: torch.nn.Module, name: str) -> None:
        _, _, kernel = _conv_dims(module, name, self.kind)
        reason = shared_kernel_blocker(module)
        if reason is not None:  # refused now, not when finalize builds the shared-kernel conv after training
            raise ValueError(f"layer '{name}': {reason}")
        positions = math.prod(kernel)
        if positions == 1:
            raise ValueError(
                f"layer '{name}' is a 1x1 conv; PENNI shares k x k kernels and skips 1x1 convs. "
                "Narrow the rule's pattern to the k x k convs"
            )
        if self.bases > positions:
            raise ValueError(
                f"bases={self.bases} exceeds the {positions} positions of layer '{name}''s "
                f"{kernel[0]}x{kernel[1]} kernels; give bases <= {positions}"
            )

    def params(self, module: torch.nn.Module) -> list[str]:
        return ["weight"]

    def bind(self, module: torch.nn.Module, param: str) -> SharedKernels:
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"structure": self.kind, "bases": self.bases}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> SharedKernels:
        _no_rate(cls.kind, spec, "bases: 5")
        return cls(bases=spec.get("bases", 5))

    @classmethod
    def example(cls) -> SharedKernels:
        return cls(bases=1)


# --- the factorizations (used by the projections and by the executors) ------------------------------------


def shared_kernel_blocker(conv: torch.nn.Conv2d) -> str | None:
    """Why ``conv`` cannot become a shared-kernel (two-stage) conv, or None: the two-stage form is an ungrouped
    depthwise + 1x1 pair with numeric zero padding.

    >>> shared_kernel_blocker(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")) is not None
    True
    """
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return (f"only ungrouped convs with numeric zero padding share kernels (got groups={conv.groups}, "
                f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}); narrow the plan to such convs")
    return None


def tucker2_factors(weight: torch.Tensor, ranks: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated HOSVD of modes 0 and 1: ``core (r_o, r_i, ...)``, ``U_out (O, r_o)``, ``U_in (I, r_i)``.

    TensorLy's ``partial_tucker`` with ``n_iter_max=0`` stops after its SVD initialisation, which is exactly
    the truncated HOSVD (no HOOI sweeps: the projection stays a fixed, deterministic map).
    """
    tensorly, partial_tucker = _require_tensorly()
    if weight.dim() < 2:
        raise ValueError(f"Tucker2 needs a weight with at least 2 dimensions, got shape {tuple(weight.shape)}")
    r_o, r_i = ranks
    if r_o > weight.shape[0] or r_i > weight.shape[1]:
        raise ValueError(
            f"Tucker2 ranks ({r_o}, {r_i}) exceed the weight's dimensions (out={weight.shape[0]}, "
            f"in={weight.shape[1]}); give ranks <= ({weight.shape[0]}, {weight.shape[1]})"
        )
    with tensorly.backend_context("pytorch"):
        (core, (u_out, u_in)), _ = partial_tucker(
            weight.detach(), rank=[r_o, r_i], modes=[0, 1], n_iter_max=0, init="svd"
        )
    return core.contiguous(), u_out.contiguous(), u_in.contiguous()


def tucker2_weight(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """``core x_0 U_out x_1 U_in``: the full weight back from its Tucker-2 factors."""
    return torch.einsum("ab...,oa,ib->oi...", core, u_out, u_in)


def _kernel_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``(O*I, k*k)``: one row per kernel (a 2-D weight is ``O*I`` kernels of one position)."""
    return weight.reshape(weight.shape[0] * weight.shape[1], -1)


def shared_kernel_factors(weight: torch.Tensor, bases: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of the kernels without the mean (SPEC 10.1): ``coefs (O, I, d)`` and ``basis (d, *kernel)``.

    ``coefs @ basis`` is the rank-``d`` truncated SVD of the ``(O*I, k*k)`` kernel matrix; at
    ``d = k*k`` it is the weight itself. Signs are fixed (largest entry of each basis kernel positive) so the
    factors are deterministic. A layer with fewer kernels than ``d`` (LeNet-5's conv1: 20 kernels of 25
    positions) has rank at most ``O*I``: the basis is completed to ``d`` orthonormal kernels, with zero
    coefficients, so the factors stay exact and the layer keeps the ``d`` bases asked for.

    >>> coefs, basis = shared_kernel_factors(torch.randn(2, 1, 3, 3), bases=4)   # 2 kernels, 4 bases
    >>> tuple(coefs.shape), tuple(basis.shape), bool(coefs[..., 2:].eq(0).all())
    ((2, 1, 4), (4, 3, 3), True)
    """
    matrix = _kernel_matrix(weight.detach())
    if not 1 <= bases <= matrix.shape[1]:
        raise ValueError(
            f"bases={bases} must be in 1..{matrix.shape[1]} (the kernel's positions) for a weight of shape "
            f"{tuple(weight.shape)}"
        )
    kernels = matrix.shape[0]
    rank = min(bases, kernels)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=bases > kernels)  # full: vh spans every position
    basis = vh[:bases]
    coefs = torch.zeros(kernels, bases, dtype=torch.float64, device=matrix.device)
    coefs[:, :rank] = u[:, :rank] * s[:rank]
    flip = torch.sign(basis.gather(1, basis.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    flip[flip == 0] = 1
    basis, coefs = basis * flip[:, None], coefs * flip[None, :]
    kernel = tuple(weight.shape[2:]) or (1,)
    return (coefs.to(weight.dtype).reshape(weight.shape[0], weight.shape[1], bases),
            basis.to(weight.dtype).reshape(bases, *kernel))


def shared_kernel_weight(coefs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``W[o, i] = sum_j coefs[o, i, j] * basis[j]``: the full weight back from the shared kernels."""
    return torch.einsum("oij,j...->oi...", coefs, basis)


__all__ = [
    "SharedKernels",
    "shared_kernel_blocker",
    "Tucker2",
    "shared_kernel_factors",
    "shared_kernel_weight",
    "tucker2_factors",
    "tucker2_weight",
]
