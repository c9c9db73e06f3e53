"""Sparsity structures: what a pruned layer may look like, with exact projections.

Each structure is a small validated dataclass naming a partition of the GEMM matrix
(see :mod:`admmcompress.structures.groups`) and how many groups must go. Give either
``sparsity`` (fraction of groups removed, in (0, 1)) or ``compression`` (groups before /
groups after, > 1); the other is derived.

>>> s = Unstructured(compression=5)
>>> s.target_sparsity
0.8
>>> w = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
>>> Unstructured(sparsity=0.5).project(w)
tensor([[3., -0.],
        [0., 2.]])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from admmcompress.models.conv1d import is_conv1d
from admmcompress.structures import groups
from admmcompress.structures.base import Structure, register_structure
from admmcompress.structures.scalars import plain_number

# Module types whose weight has a GEMM view that filter/column/channel structures understand.
GEMM_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def unsupported_layer(name: str, module: torch.nn.Module, kind: str, allowed: str) -> str:
    """The one-line refusal of a layer type a structure does not support, with the fix."""
    if is_conv1d(module):
        return (
            f"layer '{name}' is a GPT-style Conv1D (weight stored (in, out)); convert the model's Conv1D layers "
            "to the equal nn.Linear first: admmcompress.models.conv1d.linear_from_conv1d(model)"
        )
    return (
        f"layer '{name}' is {type(module).__name__}; structure '{kind}' supports {allowed}. "
        "Narrow the rule's pattern or type so it matches only those layers"
    )



def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

@dataclass(frozen=True)
class SparsityStructure(Structure):
    """Base class: keep the k groups of largest L2 norm of a partition of the GEMM matrix."""

    sparsity: float | None = None
    compression: float | None = None
    quantizes: ClassVar[bool] = False
    _resolved: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("sparsity", "compression"):  # np.float32(0.9) or a 0-d tensor is the number it holds
            object.__setattr__(self, key, plain_number(getattr(self, key)))
        if (self.sparsity is None) == (self.compression is None):
            raise ValueError(f"{name}: give exactly one of sparsity=... (in (0,1)) or compression=... (> 1)")
        for key in ("sparsity", "compression"):
            value = getattr(self, key)
            if isinstance(value, str) or isinstance(value, bool):  # '0.8' quoted in YAML, or yes/no
                example = "0.8" if key == "sparsity" else "10"
                if isinstance(value, str) and "e" in value.lower() and "." not in value and _is_number(value):
                    fix = f"YAML reads an exponent without a dot as text: write it with a dot, e.g. {float(value):.1e}"
                else:
                    fix = f"write it as a number, e.g. {example} (no quotes)"
                raise ValueError(f"{name}: {key}={value!r} is {type(value).__name__}, not a number: {fix}")
        if self.sparsity is not None:
            if not isinstance(self.sparsity, (int, float)) or not 0.0 < float(self.sparsity) < 1.0:
                raise ValueError(
                    f"{name}: sparsity={self.sparsity!r} is outside (0, 1); "
                    "it is the fraction of weights removed, e.g. 0.9 for 10x compression"
                )
            resolved = float(self.sparsity)
        else:
            if not isinstance(self.compression, (int, float)) or not float(self.compression) > 1.0:
                raise ValueError(
                    f"{name}: compression={self.compression!r} must be > 1 (total / kept), e.g. 10 for 90% sparsity"
                )
            resolved = 1.0 - 1.0 / float(self.compression)
            if not resolved < 1.0:  # inf, or so large that 1 - 1/c rounds to 1: nothing could be kept
                raise ValueError(
                    f"{name}: compression={self.compression!r} is too large to keep any weight; "
                    "give a finite ratio such as 10 (or sparsity=...)"
                )
        if not math.isfinite(resolved):
            raise ValueError(f"{name}: target must be a finite number")
        object.__setattr__(self, "_resolved", resolved)

    @property
    def target_sparsity(self) -> float:
        """The fraction of groups removed, whichever way the target was given."""
        return self._resolved

    def with_sparsity(self, sparsity: float) -> SparsityStructure:
        """The same structure at another sparsity (used by gradual schedules)."""
        return replace(self, sparsity=sparsity, compression=None)

    # --- the partition -------------------------------------------------------------
    def check_module(self, module: torch.nn.Module, name: str) -> None:
        """Raise if this structure cannot apply to ``module`` (overridden where needed)."""
        if not isinstance(module, GEMM_MODULES):
            raise ValueError(unsupported_layer(name, module, self.kind, ", ".join(t.__name__ for t in GEMM_MODULES)))

    def params(self, module: torch.nn.Module) -> list[str]:
        """Names of ``module``'s parameters this structure constrains, one target each.

        ``["weight"]`` for Linear/Conv; ``weight_ih_l{k}``/``weight_hh_l{k}`` for GRU/LSTM.
        """
        return groups.gemm_params(module)

    def bind(self, module: torch.nn.Module, param: str) -> SparsityStructure:
        """This structure specialised to ``module.<param>`` (e.g. its gate count); default: itself."""
        return self

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def n_groups(self, weight: torch.Tensor) -> int:
        return self.group_ids(weight)[1]

    def kept_groups(self, weight: torch.Tensor) -> int:
        return groups.kept_count(self.n_groups(weight), self.target_sparsity)

    # --- the projection ------------------------------------------------------------
    def support(self, weight: torch.Tensor) -> torch.Tensor:
        """Boolean mask (weight's shape) of the entries the projection keeps."""
        ids, n = self.group_ids(weight)
        k = groups.kept_count(n, self.target_sparsity)
        mask = groups.project_groups(groups.as_matrix(weight), ids, n, k)
        return mask.reshape(weight.shape)

    @torch.no_grad()
    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest point (Euclidean) of the constraint set to ``weight``; a new tensor."""
        return weight * self.support(weight)

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"structure": self.kind}
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity
        else:
            out["compression"] = self.compression
        return out

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> SparsityStructure:
        """From ``{"sparsity"|"compression": value}`` and the class's ``options`` (other keys are ignored)."""
        extra = {key: spec[key] for key in cls.options if key in spec}
        return cls(sparsity=spec.get("sparsity"), compression=spec.get("compression"), **extra)

    @classmethod
    def example(cls) -> SparsityStructure:
        return cls(sparsity=0.5)


@register_structure("unstructured", aliases=("irregular", "non-structured"))
@dataclass(frozen=True)
class Unstructured(SparsityStructure):
    """Keep the k individual weights of largest magnitude (any parameter tensor)."""

    def check_module(self, module: torch.nn.Module, name: str) -> None:
        if not groups.gemm_params(module):  # a 'weight' tensor, or GRU/LSTM weight_ih/hh matrices
            raise ValueError(
                f"layer '{name}' ({type(module).__name__}) has no 'weight' tensor to prune; "
                "narrow the rule so it matches layers with weights"
            )

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows, cols = groups.as_matrix(weight).shape
        return groups.element_ids(rows, cols, weight.device), rows * cols

    def support(self, weight: torch.Tensor) -> torch.Tensor:
        # Same result as the generic path, without materialising one id per element.
        k = groups.kept_count(weight.numel(), self.target_sparsity)
        keep = groups.top_groups(weight.detach().reshape(-1).abs().to(torch.float64), k)
        return keep.reshape(weight.shape)


@register_structure("filter", aliases=("row",))
@dataclass(frozen=True)
class Filter(SparsityStructure):
    """Keep the k rows (output filters / neurons) of largest L2 norm."""

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows, cols = groups.as_matrix(weight).shape
        return groups.row_ids(rows, cols, weight.device), rows


@register_structure("column", aliases=("shape",))
@dataclass(frozen=True)
class Column(SparsityStructure):
    """Keep the k columns ("shapes": input channel x kernel position) of largest L2 norm."""

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows, cols = groups.as_matrix(weight).shape
        return groups.column_ids(rows, cols, weight.device), cols


@register_structure("channel")
@dataclass(frozen=True)
class Channel(SparsityStructure):
    """Keep the k input channels (all kernel positions of one channel) of largest L2 norm."""

    def group_ids(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows, cols = groups.as_matrix(weight).shape
        kpos = groups.kernel_positions(weight)
        return groups.channel_ids(rows, cols, kpos, weight.device), cols // kpos


__all__ = ["GEMM_MODULES", "Channel", "Column", "Filter", "SparsityStructure", "Unstructured"]
