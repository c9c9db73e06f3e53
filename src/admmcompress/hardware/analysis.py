"""One model on the modelled hardware: crossbar tiles and cost, SOT-MRAM cost per bit width, and optionally
accuracy under device variation (Monte-Carlo) and under finite ADC resolution.

:func:`analyze` maps the model as it is (after pruning/quantization) and the unpruned full-precision
reference (``baseline_bits`` per weight, every weight kept) under the same spec and constants;
:func:`add_variation` and :func:`add_adc` add accuracy curves given an ``evaluate(model) -> accuracy``
callable (the CLI and benchmarks pass the library's test-set evaluation). Render it with
:func:`admmcompress.report.hardware.render_hardware`.

>>> model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
>>> with torch.no_grad(): _ = model[0].weight[:, 128:].zero_()                   # half the inputs pruned
>>> result = analyze(model, CrossbarSpec(), pim_bits=(2,))
>>> result.mapping.total("dense"), result.mapping.total("masked"), result.mapping.total("compact")
(9, 5, 5)
>>> round(result.ratios["tiles"], 2)                 # vs 18 tiles of the unpruned 16-bit mapping (8 outputs per tile)
3.6
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from admmcompress.hardware.adc import adc_quantization
from admmcompress.hardware.cost import CrossbarCost, baseline_mapping, crossbar_cost
from admmcompress.hardware.crossbar import CrossbarSpec, ModelMapping, map_model
from admmcompress.hardware.noise import DeviceNoise, MonteCarlo, device_noise, monte_carlo
from admmcompress.hardware.pim import PIMCost, PIMSpec, pim_baseline, pim_cost

Evaluate = Callable[[nn.Module], float]


@dataclass
class VariationPoint:
    """Accuracy under one noise setting, over seeded draws (modelled device, measured accuracy)."""

    noise: DeviceNoise
    accuracy: MonteCarlo
    label: str = ""


@dataclass
class HardwareAnalysis:
    """Everything the hardware report shows; every cost figure in it is modelled."""

    spec: CrossbarSpec
    mapping: ModelMapping
    baseline: ModelMapping
    baseline_bits: int
    act_bits: int
    costs: dict[str, CrossbarCost]
    baseline_cost: CrossbarCost
    pim: list[PIMCost] = field(default_factory=list)
    pim_baseline: PIMCost | None = None
    accuracy: float | None = None
    mapped_accuracy: float | None = None
    variation: list[VariationPoint] = field(default_factory=list)
    adc: list[tuple[int, float]] = field(default_factory=list)
    adc_exact: list[str] = field(default_factory=list)  # mapped layers the ADC model leaves exact (ADCModel.skipped)
    adc_uncalled: list[str] = field(default_factory=list)  # of those, Linear/Conv2d never called (ADCModel.uncalled)
    adc_calibration: int = 0  # inputs the ADC full scales were set on

    @property
    def ratios(self) -> dict[str, float]:
        """Compact (masked) mapping vs the unpruned full-precision one: times smaller, modelled."""
        return self.costs["compact"].ratios(self.baseline_cost)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modelled": True,
            "spec": self.spec.__dict__,
            "baseline_bits": self.baseline_bits,
            "act_bits": self.act_bits,
            "tiles": {kind: self.mapping.total(kind) for kind in ("dense", "masked", "compact")},
            "baseline_tiles": self.baseline.total("dense"),
            "costs": {kind: cost.to_dict() for kind, cost in self.costs.items()},
            "baseline_cost": self.baseline_cost.to_dict(),
            "ratios": self.ratios,
            "layers": [layer.to_dict() for layer in self.mapping.layers],
            "notes": self.mapping.notes,
            "pim": [
                {**cost.to_dict(), "ratios": cost.ratios(self.pim_baseline)} for cost in self.pim
            ] if self.pim_baseline is not None else [],
            "accuracy": self.accuracy,
            "mapped_accuracy": self.mapped_accuracy,
            "variation": [
                {**point.noise.__dict__, "label": point.label, "mean": point.accuracy.mean, "sd": point.accuracy.sd,
                 "values": list(point.accuracy.values)}
                for point in self.variation
            ],
            "adc": [{"bits": bits, "accuracy": acc} for bits, acc in self.adc],
            "adc_exact": list(self.adc_exact),
            "adc_uncalled": list(self.adc_uncalled),
            "adc_calibration": self.adc_calibration,
            "unmapped": dict(self.mapping.unmapped),
        }


def analyze(
    model: nn.Module,
    spec: CrossbarSpec,
    example: torch.Tensor | None = None,
    baseline_bits: int = 16,
    act_bits: int = 8,
    pim_bits: Sequence[int] = (1, 2, 3, 4),
    pim_subarray: tuple[int, int] = (256, 256),
) -> HardwareAnalysis:
    """Map ``model`` and cost it, modelled. ``example``: one input batch (batch-first, or sequence-first for a
    model whose recurrent layers say so), for the passes each layer makes per sample; None: one pass each."""
    if isinstance(baseline_bits, bool) or not isinstance(baseline_bits, int) or not 1 <= baseline_bits <= 16:
        raise ValueError(f"hardware: baseline_bits={baseline_bits!r} must be an integer in [1, 16], e.g. 16")
    mapping = map_model(model, spec, example)
    baseline = baseline_mapping(model, spec, baseline_bits, example)
    costs = {kind: crossbar_cost(mapping, kind, act_bits) for kind in ("dense", "masked", "compact")}
    result = HardwareAnalysis(
        spec, mapping, baseline, baseline_bits, act_bits, costs, crossbar_cost(baseline, "dense", act_bits)
    )
    if pim_bits:
        reference = PIMSpec(pim_subarray[0], pim_subarray[1], weight_bits=min(pim_bits), act_bits=act_bits)
        result.pim_baseline = pim_baseline(model, reference, baseline_bits, example)
        result.pim = [pim_cost(model, replace(reference, weight_bits=bits), example) for bits in pim_bits]
    return result


def add_variation(
    result: HardwareAnalysis,
    model: nn.Module,
    evaluate: Evaluate,
    noises: Sequence[DeviceNoise],
    draws: int = 5,
    seed: int = 0,
    label: str = "",
) -> HardwareAnalysis:
    """Clean accuracy, noise-free mapped accuracy, and Monte-Carlo accuracy at every noise setting."""
    if result.accuracy is None:
        result.accuracy = float(evaluate(model))
    if result.mapped_accuracy is None:
        with device_noise(model, result.spec, DeviceNoise()):
            result.mapped_accuracy = float(evaluate(model))
    for noise in noises:
        result.variation.append(VariationPoint(noise, monte_carlo(model, evaluate, result.spec, noise, draws, seed),
                                               label))
    return result


def add_adc(
    result: HardwareAnalysis, model: nn.Module, evaluate: Evaluate, bits: Sequence[int], calibration: torch.Tensor
) -> HardwareAnalysis:
    """Accuracy with each ADC resolution in ``bits`` (tile partial sums quantized, modelled ADC); the layers
    the ADC model cannot convert run exact and are kept in ``result.adc_exact`` for the report to name.
    ``calibration``: the inputs each tile's full scale is set on (a few hundred, not the evaluated ones: set on 8,
    even a 24-bit ADC clipped partial sums of other inputs and changed the accuracy, a review's finding)."""
    result.adc_calibration = int(calibration.shape[0])
    for b in bits:
        with adc_quantization(model, b, calibration, result.spec.inputs_per_tile) as adc:
            result.adc.append((b, float(evaluate(model))))
        result.adc_exact, result.adc_uncalled = list(adc.skipped), list(adc.uncalled)
    return result


__all__ = ["HardwareAnalysis", "VariationPoint", "add_adc", "add_variation", "analyze"]
