"""N:M semi-structured sparsity: in every run of ``m`` consecutive weights along a GEMM row, ``n`` stay.

The pattern of NVIDIA's sparse tensor cores (2:4, and 4:8): the GEMM matrix ``(rows, cols)`` is cut into runs of
``m`` columns inside each row (the reduction axis, so a run is ``m`` inputs of one output), and each run keeps
its ``n`` weights of largest magnitude. The constraint set is a product of one "at most n of m" set per run, so
that per-run top-n (ties to the lower index) is its exact Euclidean projection.

On CPU the speed-up does not exist: PyTorch's semi-structured kernels (``to_sparse_semi_structured``) are
CUDA-only, so an N:M model runs as a masked dense model here, and reports say so. Gradual pruning ramps the
kept share of every run down to ``n``: ``with_sparsity(s)`` keeps ``kept_count(m, s)`` per run (never fewer
than ``n``).

>>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 0.0, 0.2, 4.0]])
>>> NM(n=2, m=4).project(w)
tensor([[ 0., -3.,  2.,  0.,  1.,  0.,  0.,  4.]])
>>> NM(n=2, m=4).to_dict(), NM(n=2, m=4).target_sparsity
({'structure': 'nm', 'n': 2, 'm': 4}, 0.5)

In a plan: ``{type: Linear, exclude: [classifier], structure: nm, n: 2, m: 4}``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from admmcompress.structures import groups
from admmcompress.structures.base import register_structure
from admmcompress.structures.block import top_groups_per_block
from admmcompress.structures.scalars import plain_number
from admmcompress.structures.sparsity import GEMM_MODULES, SparsityStructure, unsupported_layer

# Only these two have hardware behind them; other n:m are accepted (the projection is the same) but named here.
HARDWARE_PATTERNS = ((2, 4), (4, 8))


@register_structure("nm", aliases=("n:m", "semi_structured"))
@dataclass(frozen=True)
class NM(SparsityStructure):
    """Keep ``n`` of every ``m`` consecutive weights of each GEMM row (2:4 by default).

    ``sparsity`` is ``1 - n/m`` unless given lower (gradual pruning's intermediate steps).
    """

    n: int = 2
    m: int = 4
    options: ClassVar[tuple[str, ...]] = ("n", "m")

    def __post_init__(self) -> None:
        name = type(self).__name__
        n, m = plain_number(self.n), plain_number(self.m)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 0 < n < m:
            raise ValueError(f"{name}: n={self.n!r}, m={self.m!r} must be integers with 0 < n < m, e.g. n: 2, m: 4")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        if self.sparsity is None and self.compression is None:
            object.__setattr__(self, "sparsity", 1.0 - n / m)
        super().__post_init__()
        if groups.kept_count(m, self.target_sparsity) < n:
            raise ValueError(
                f"{name}: sparsity {self.target_sparsity:g} would keep fewer than n={n} of every {m}; "
                f"leave sparsity out (it is 1 - n/m = {1 - n / m:g})"
            )

    @property
    def per_block(self) -> bool:
        """Every run of ``m`` keeps its own share (read by the registry's brute-force tests)."""
        return True

    def with_sparsity(self, sparsity: float) -> NM:
        return replace(self, sparsity=min(sparsity, 1.0 - self.n / self.m), compression=None)

    def check_module(self, module: torch.nn.Module, name: str) -> None:
        if not isinstance(module, GEMM_MODULES):
            raise ValueError(unsupported_layer(name, module, self.kind, ", ".join(t.__name__ for t in GEMM_MODULES)))
        cols = groups.as_matrix(module.weight).shape[1]
        if cols % self.m:
            raise ValueError(
                f"layer '{name}': its GEMM rows have {cols} weights, not a multiple of m={self.m}; "
                "exclude the layer from the rule (exclude: [...]) or choose m dividing it"
            )

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows, cols = groups.as_matrix(weight).shape
        return groups.element_ids(rows, cols, weight.device), rows * cols

    def partition(self, weight: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """``(entry ids, number of entries, run of every entry)``: each run of ``m`` is one block."""
        rows, cols = groups.as_matrix(weight).shape
        if cols % self.m:
            raise ValueError(f"nm: {cols} columns do not split into runs of m={self.m}")
        ids, n = self.group_ids(weight)
        owner = torch.arange(rows * cols, device=weight.device) // self.m
        return ids, n, owner

    def support(self, weight: torch.Tensor) -> torch.Tensor:
        ids, n, owner = self.partition(weight)
        scores = groups.as_matrix(weight).detach().reshape(-1).abs().to(torch.float64)
        return top_groups_per_block(scores, owner, self.target_sparsity).reshape(weight.shape)

    def kept_groups(self, weight: torch.Tensor) -> int:
        return groups.kept_count(self.m, self.target_sparsity) * (weight.numel() // self.m)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> NM:
        return cls(n=spec.get("n", 2), m=spec.get("m", 4), sparsity=spec.get("sparsity"),
                   compression=spec.get("compression"))

    @classmethod
    def example(cls) -> NM:
        return cls(n=2, m=4)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"structure": self.kind, "n": self.n, "m": self.m}
        if abs(self.target_sparsity - (1.0 - self.n / self.m)) > 1e-12:
            out["sparsity"] = self.target_sparsity
        return out

    @property
    def runs_on_hardware(self) -> bool:
        """Whether sparse tensor cores accelerate this pattern (on a CUDA device only)."""
        return (self.n, self.m) in HARDWARE_PATTERNS


__all__ = ["HARDWARE_PATTERNS", "NM"]
