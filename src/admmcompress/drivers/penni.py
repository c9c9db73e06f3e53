"""PENNI (SPEC 10): train shared basis kernels and sparse coefficients, then prune the coefficients.

Method ``penni`` drives the layers of its ``shared_kernels`` targets (``{structure: shared_kernels, bases: d}``,
k x k convs only) in two ways, depending on what the layers are when its phase starts:

- still plain ``Conv2d``: nothing special trains; ``finalize()`` decomposes each conv into ``d`` basis kernels
  and coefficients by PCA without the mean (a :class:`~admmcompress.drivers.factorize.FactorizeTransform`;
  give this phase ``epochs: 0``). Method ``admm`` on the same plan drives the weights to rank-d kernels first.
- already :class:`~admmcompress.executors.penni.SharedKernelConv` (an earlier stage decomposed them): the
  loss gets ``l1 * sum |coefs|``; every ``step()`` (the phase's cadence, e.g. ``update_every_epochs: 2``)
  swaps which of {coefficients, bases} trains; ``finalize()`` zeroes coefficients with
  ``|c| < prune_std * std(c)`` per tensor and returns their masks for the masked fine-tune. Quantization
  targets of the same layers quantize the kept coefficients (a ``QuantizedMaskSet`` on ``<layer>.coefs``).
  With ``pointwise: true`` the weights of every 1x1 conv of the model (PENNI skips them when sharing kernels)
  get the same L1 term and the same per-tensor std pruning, as PENNI's code does (SPEC 10.2).

Runs start a fresh optimizer per phase, so the decomposed parameters exist when the next phase's optimizer is
built; that is why decomposing and sparsifying are two stages (configs/resnet20_cifar_penni.yaml).
The cross-layer shrink and the two-stage executor are ``get_executor("penni")`` (executors/penni.py).

>>> import torch.nn as nn
>>> from admmcompress.plan import Plan
>>> from admmcompress.structures import SharedKernels
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3))
>>> targets = Plan({"0": SharedKernels(bases=9)}).resolve(model)
>>> Penni(model, targets).finalize().apply(model); type(model[0]).__name__
'SharedKernelConv'
>>> driver = Penni(model, targets, PenniConfig(prune_std=1.0))
>>> masks = driver.finalize(); float(masks.sparsity()["0.coefs"]) > 0
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from admmcompress.drivers.base import Driver, DriverContext, ModuleTransform, register_driver
from admmcompress.drivers.factorize import FactorizeTransform
from admmcompress.drivers.schedule import carry
from admmcompress.executors.penni import SharedKernelConv
from admmcompress.finalize import MaskSet, hard_quantize
from admmcompress.plan import PlanError, Target
from admmcompress.structures.scalars import plain_number

PARTS = ("coefs", "basis")


@dataclass(frozen=True)
class PenniConfig:
    """Options of method ``penni``.

    Attributes:
        l1: weight of ``sum |coefs|`` in the loss (PENNI's code: 1e-4).
        prune_std: coefficients with ``|c| < prune_std * std(c)`` (per tensor) are pruned at the end (PENNI: 1.0).
        start: which part trains first, "coefs" or "basis"; the other is frozen until the next ``step()``.
        pointwise: also put the L1 term on, and std-prune, the weights of every ungrouped 1x1 conv of the model.
    """

    l1: float = 1e-4
    prune_std: float = 1.0
    start: str = "coefs"
    pointwise: bool = False

    def __post_init__(self) -> None:
        for key in ("l1", "prune_std"):
            value = plain_number(getattr(self, key))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"penni: {key}={getattr(self, key)!r} must be a finite number >= 0")
            object.__setattr__(self, key, float(value))
        if self.start not in PARTS:
            raise ValueError(f"penni: start={self.start!r} must be one of {PARTS}")
        if not isinstance(self.pointwise, bool):
            raise ValueError(f"penni: pointwise={self.pointwise!r} must be true or false")


@register_driver("penni", PenniConfig)
class Penni(Driver):
    """PENNI: decompose k x k convs into shared basis kernels, or train and prune their coefficients."""

    # Each step() swaps which of coefficients / bases trains (requires_grad), which DDP's reducer does not follow.
    supports_distributed = False
    factorizes = True  # its first stage replaces the convs by shared kernels

    def __init__(self, model: nn.Module, targets: list[Target], config: PenniConfig | None = None,
                 frozen: MaskSet | None = None):
        self.accept_targets(targets)
        self.model, self.config, self.frozen = model, config or PenniConfig(), frozen
        self.shared = [t for t in targets if t.structure.factorizes]
        self.quantized = [t for t in targets if t.structure.quantizes]
        modules = dict(model.named_modules())
        kinds = {isinstance(modules[t.layer], SharedKernelConv) for t in self.shared}
        if len(kinds) > 1:
            raise PlanError("penni: some of the plan's layers are decomposed and some are not; decompose all first")
        self.decomposed = kinds == {True}
        if self.quantized and not self.decomposed:
            raise PlanError("penni: coefficients are quantized after decomposition; put the quantization rules "
                            "in the stage that trains the decomposed layers")
        self.layers = {t.layer: modules[t.layer] for t in self.shared}
        # 1x1 convs (never shared): PENNI's code regularizes and std-prunes their weights too.
        self.pointwise = {
            name: m for name, m in modules.items()
            if self.config.pointwise and type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.groups == 1
        } if self.decomposed else {}
        self.training = self.config.start
        self.history: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, model: nn.Module, targets: list, config: PenniConfig, context: DriverContext) -> Penni:
        return cls(model, targets, config, context.frozen)

    @classmethod
    def check_targets(cls, targets: list) -> None:
        shared = {t.layer for t in targets if t.structure.kind == "shared_kernels"}
        others = [t.key for t in targets if t.structure.kind != "shared_kernels"
                  and not (t.structure.quantizes and t.layer in shared)]
        if not shared or others:
            raise PlanError(
                "method 'penni' takes shared_kernels rules (e.g. {match: 'layer*.conv*', structure: shared_kernels, "
                f"bases: 5}}) and quantization rules on the same layers; not {others or 'a plan without them'}"
            )

    @classmethod
    def rebuild(cls, model: nn.Module, spec: dict[str, Any]) -> None:
        FactorizeTransform.rebuild(model, spec)

    # --- training -----------------------------------------------------------------------
    def _set_trainable(self, part: str | None) -> None:
        for module in self.layers.values():
            module.coefs.requires_grad_(part in (None, "coefs"))
            module.basis.requires_grad_(part in (None, "basis"))

    def prepare(self, model: nn.Module) -> None:
        if self.decomposed:
            self._set_trainable(self.training)

    def close(self) -> None:
        if self.decomposed:
            self._set_trainable(None)

    def _sparsified(self) -> dict[str, torch.Tensor]:
        """The tensors the L1 term and the std pruning act on: coefficients, and 1x1 weights with ``pointwise``."""
        found = {f"{name}.coefs": m.coefs for name, m in self.layers.items()}
        found.update({f"{name}.weight": m.weight for name, m in self.pointwise.items()})
        return found

    def penalty(self) -> torch.Tensor:
        """``l1 * sum |coefs|`` over the decomposed layers (and ``|W|`` of 1x1 convs with ``pointwise``)."""
        if not self.decomposed or not self.config.l1:
            return torch.zeros(())
        return self.config.l1 * sum(t.abs().sum() for t in self._sparsified().values())

    def step(self) -> dict[str, Any]:
        """Swap which of coefficients / bases trains (SPEC 10.2, ``cross_interval``)."""
        if self.decomposed:
            self.training = PARTS[1 - PARTS.index(self.training)]
            self._set_trainable(self.training)
        entry = {"update": len(self.history) + 1, "training": self.training}
        self.history.append(entry)
        return entry

    def progress(self) -> dict[str, Any]:
        if not self.decomposed:
            return {}
        nonzero = sum(int(m.coefs.count_nonzero()) for m in self.layers.values())
        total = sum(m.coefs.numel() for m in self.layers.values())
        l1 = sum(float(m.coefs.detach().abs().sum()) for m in self.layers.values())
        return {"training": self.training, "coefs_l1": l1,
                "coefs_nonzero": nonzero / max(total, 1)}

    # --- the end ------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> MaskSet | ModuleTransform:
        """Decompose (plain convs), or prune coefficients below ``prune_std * std`` and return their masks."""
        if not self.decomposed:
            return FactorizeTransform({t.layer: t.structure for t in self.shared}, self.frozen)
        masks = carry(self.frozen)  # an earlier stage's quantized values stay held
        for key, tensor in self._sparsified().items():
            masks.intersect(key, tensor.abs() >= self.config.prune_std * tensor.std())
        masks.apply(self.model)
        if self.quantized:  # quantize the kept coefficients (SPEC 10 + 2.1): one target per coefficient tensor
            coefs = [Target(t.layer, "coefs", t.structure, t.rule) for t in self.quantized]
            return hard_quantize(self.model, coefs, masks, self.frozen)
        return masks

    def summary(self) -> dict[str, Any]:
        if not self.decomposed:
            return {}
        found = {"penni_coefs_kept": {n: int(m.coefs.count_nonzero()) for n, m in self.layers.items()}}
        if self.pointwise:
            found["penni_pointwise_kept"] = {n: int(m.weight.count_nonzero()) for n, m in self.pointwise.items()}
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"training": self.training, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.training = str(state["training"])
        self.history = list(state["history"])


__all__ = ["Penni", "PenniConfig"]
