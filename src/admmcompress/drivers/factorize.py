"""The module transform of low-rank targets: convs replaced by their factors at the end of a driving phase.

A driver whose plan holds ``factorizes`` structures (``tucker2``, ``shared_kernels``; see
:mod:`admmcompress.structures.lowrank`) ends in a :class:`FactorizeTransform`: each such layer's current
weight ``W`` is factored (truncated HOSVD / PCA without the mean, i.e. the structure's projection of ``W``
itself, SPEC P4) and the conv is replaced by a :class:`~admmcompress.executors.tucker.Tucker2Conv` or a
:class:`~admmcompress.executors.penni.SharedKernelConv`. Masks of the other targets (pruning, quantization)
hold afterwards; masks an earlier stage put on a factorized weight are dropped with that weight.

>>> import torch.nn as nn
>>> from admmcompress.structures import Tucker2
>>> model = nn.Sequential(nn.Conv2d(4, 8, 3))
>>> t = FactorizeTransform({"0": Tucker2(ranks=(4, 2))})
>>> t.apply(model); type(model[0]).__name__, model[0].ranks
('Tucker2Conv', (4, 2))
>>> t.spec()
{'factorized': {'0': {'structure': 'tucker2', 'ranks': [4, 2]}}}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from admmcompress.drivers.base import DriverError, ModuleTransform
from admmcompress.executors.penni import decompose_shared_kernels
from admmcompress.executors.tucker import factorize_tucker2
from admmcompress.finalize import MaskSet, QuantizedMaskSet
from admmcompress.plan import PlanError
from admmcompress.structures.base import Structure
from admmcompress.structures.registry import structure_from_dict


def _tucker2(model: nn.Module, name: str, structure: Any, weights: bool) -> None:
    factorize_tucker2(model, {name: structure.ranks}, weights=weights)


def _shared(model: nn.Module, name: str, structure: Any, weights: bool) -> None:
    decompose_shared_kernels(model, {name: structure.bases}, weights=weights)


# Structure kind -> how a conv carrying it is replaced by its factors (weights=False: shapes only).
FACTORIZERS: dict[str, Callable[[nn.Module, str, Any, bool], None]] = {
    "tucker2": _tucker2,
    "shared_kernels": _shared,
}


class FactorizeTransform(ModuleTransform):
    """Replace each named conv by its factors; ``masks`` (of the other targets) hold afterwards."""

    def __init__(self, layers: Mapping[str, Structure], masks: MaskSet | None = None):
        unknown = sorted({s.kind for s in layers.values()} - set(FACTORIZERS))
        if unknown:
            raise DriverError(f"no factorization is known for structure(s) {unknown}; known: {sorted(FACTORIZERS)}")
        self.layers = dict(layers)
        gone = {f"{name}.weight" for name in self.layers}
        kept = masks if masks is not None else MaskSet()
        if any(n in gone for n in kept.masks):  # an earlier stage's masks on a weight that is now factored
            held = kept.held if isinstance(kept, QuantizedMaskSet) else None
            masks_left = {n: m for n, m in kept.masks.items() if n not in gone}
            kept = (QuantizedMaskSet(masks_left, {n: h for n, h in held.items() if n not in gone})
                    if held is not None else MaskSet(masks_left))
        self.masks = kept

    def apply(self, model: nn.Module) -> None:
        for name, structure in self.layers.items():
            FACTORIZERS[structure.kind](model, name, structure, True)

    def spec(self) -> dict[str, Any]:
        return {"factorized": {name: s.to_dict() for name, s in self.layers.items()}}

    @staticmethod
    def rebuild(model: nn.Module, spec: Mapping[str, Any]) -> None:
        """The factored modules of a recorded ``spec()``, without weights (a state dict is loaded next)."""
        for name, entry in spec.get("factorized", {}).items():
            structure = structure_from_dict(entry, f"factorized layer '{name}'")
            FACTORIZERS[structure.kind](model, name, structure, False)


def check_factorized_targets(targets: list) -> None:
    """A factorized layer takes no other target (its weight is replaced); coupled targets cannot factorize."""
    factored = {t.layer for t in targets if getattr(t, "layer", None) is not None and t.structure.factorizes}
    clashes = sorted({t.param_name for t in targets if getattr(t, "layer", None) in factored
                      and not t.structure.factorizes})
    if clashes:
        raise PlanError(
            f"layers {sorted(factored & {c.rsplit('.', 1)[0] for c in clashes})} are factorized (tucker2/"
            f"shared_kernels) and also carry other targets {clashes}; give those layers one low-rank rule only"
        )


__all__ = ["FACTORIZERS", "FactorizeTransform", "check_factorized_targets"]
