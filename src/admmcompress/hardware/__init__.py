"""Modelled hardware: memristor crossbars (SPEC 12) and SOT-MRAM processing-in-memory (SPEC 13).

Nothing here runs on the hardware it describes; every figure is modelled from the constants in
:mod:`admmcompress.hardware.constants` and is labelled "modelled" wherever it is shown.

- :mod:`~admmcompress.hardware.crossbar`: ``CrossbarSpec`` and the tile mapping (dense, masked, compacted);
- :mod:`~admmcompress.hardware.cost`: area / power / energy of a mapping, ratios to the unpruned full-precision one;
- :mod:`~admmcompress.hardware.noise`: per-cell log-normal variation and stuck-at faults, Monte-Carlo evaluation,
  ``NoiseInjector`` for variation-aware training;
- :mod:`~admmcompress.hardware.adc`: finite ADC resolution on tile partial sums;
- :mod:`~admmcompress.hardware.pim`: SOT-MRAM sub-arrays, bit-serial cycles, energy and area;
- :mod:`~admmcompress.hardware.variation`: method ``variation_admm`` (load it with ``plugins:``);
- :mod:`~admmcompress.hardware.analysis`: one call that gathers all of it for the report.

The crossbar-aligned structures (``crossbar_row``, ``crossbar_column``, ``crossbar_tile``, ``conductance``) live
with the other structures in :mod:`admmcompress.structures.crossbar`.
"""

from admmcompress.hardware.analysis import HardwareAnalysis, add_adc, add_variation, analyze
from admmcompress.hardware.cost import CrossbarCost, baseline_mapping, crossbar_cost
from admmcompress.hardware.crossbar import CrossbarSpec, LayerMapping, ModelMapping, map_matrix, map_model
from admmcompress.hardware.noise import DeviceNoise, MonteCarlo, NoiseInjector, device_noise, monte_carlo
from admmcompress.hardware.pim import PIMCost, PIMSpec, pim_cost

__all__ = [
    "CrossbarCost", "CrossbarSpec", "DeviceNoise", "HardwareAnalysis", "LayerMapping", "ModelMapping",
    "MonteCarlo", "NoiseInjector", "PIMCost", "PIMSpec", "add_adc", "add_variation", "analyze",
    "baseline_mapping", "crossbar_cost", "device_noise", "map_matrix", "map_model", "monte_carlo", "pim_cost",
]
