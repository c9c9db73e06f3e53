"""Variation-aware ADMM: method ``variation_admm``, ADMM whose training forward passes see device noise.

The driver is :class:`~admmcompress.drivers.ADMM` plus a :class:`~admmcompress.hardware.noise.NoiseInjector`
installed in ``prepare()`` and removed in ``close()`` (the driver protocol's hook for methods that act
through the forward pass): every training forward of every mapped layer (Linear, Conv, recurrent) reads its
weights through the crossbar model with a fresh log-normal / stuck-at draw, so ADMM converges to weights that
tolerate it.
Evaluation (``model.eval()``) sees the clean weights. The noise generator's state is part of the driver's
state, so ``--resume`` continues the same draws.

A run config loads it as a plugin (the built-in drivers do not import the hardware package)::

    plugins: [admmcompress.hardware.variation]
    stages:
      - plan: {rules: [{match: "layer*", structure: crossbar_tile, sparsity: 0.5, tile: [128, 128]}]}
        method: variation_admm
        options: {rho: 1.0e-2, sigma: 0.1, bits_per_cell: 2, weight_bits: 8}

Only the driver's own phase (the ADMM phase) is noisy: the runner's masked retraining has no driver, so
variation-aware *retraining* is done with :class:`NoiseInjector` in your own loop (the benchmark does this).

>>> VariationADMMConfig(sigma=0.1).crossbar().outputs_per_tile
16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from admmcompress.drivers.admm import ADMM, ADMMConfig
from admmcompress.drivers.base import DriverContext, register_driver
from admmcompress.hardware.crossbar import CrossbarSpec
from admmcompress.hardware.noise import DeviceNoise, NoiseInjector


@dataclass(frozen=True)
class VariationADMMConfig:
    """Options of ``variation_admm``: ADMM's rho schedule, the device noise and the crossbar mapping."""

    rho: float = 1e-3
    rho_growth: float = 1.3
    rho_max: float = 1.0
    sigma: float = 0.1
    stuck_on: float = 0.0
    stuck_off: float = 0.0
    rows: int = 128
    cols: int = 128
    bits_per_cell: int = 2
    weight_bits: int = 8
    signed: str = "differential"
    seed: int = 0

    def __post_init__(self) -> None:
        self.admm()  # each part validates itself with its own one-line errors
        self.noise()
        self.crossbar()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"variation_admm: seed={self.seed!r} must be an integer")

    def admm(self) -> ADMMConfig:
        return ADMMConfig(self.rho, self.rho_growth, self.rho_max)

    def noise(self) -> DeviceNoise:
        return DeviceNoise(self.sigma, self.stuck_on, self.stuck_off)

    def crossbar(self) -> CrossbarSpec:
        return CrossbarSpec(self.rows, self.cols, self.bits_per_cell, self.weight_bits, self.signed)


@register_driver("variation_admm", VariationADMMConfig)
class VariationADMM(ADMM):
    """ADMM with device noise injected into every training forward pass (variation-aware training)."""

    injector: NoiseInjector

    @classmethod
    def from_config(
        cls, model: nn.Module, targets: list, config: VariationADMMConfig, context: DriverContext
    ) -> VariationADMM:
        driver = cls(model, targets, rho=config.admm().schedule(), frozen=context.frozen)
        driver.injector = NoiseInjector(config.crossbar(), config.noise(), config.seed)
        return driver

    def prepare(self, model: nn.Module) -> None:
        self.injector.install(model)

    def close(self) -> None:
        self.injector.remove()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "noise": self.injector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "noise" in state:
            self.injector.load_state_dict(state["noise"])


__all__ = ["VariationADMM", "VariationADMMConfig"]
