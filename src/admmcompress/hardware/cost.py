"""Modelled area, power and energy of a crossbar mapping (SPEC 12.3), relative to the unpruned full-precision one.

Every figure here is *modelled*: it is the tile count of a mapping times per-tile figures from
:mod:`admmcompress.hardware.constants` (ISAAC's table, [M]), never a measurement. Per instantiated tile:

- area  = array x (rows*cols / 128^2) + ADC x 2^(adc_bits-8) x cols/128 + DAC x rows + S&H x cols + shift-add
  + registers (the ADC converts ``cols`` columns per cycle, 128 in the reference)
- power = the same sum with the power entries (all tiles active: peak power of the chip)
- energy per inference = sum over layers of tiles x output positions x ``act_bits`` read cycles (1-bit DACs
  feed the input bit-serially) x tile power x cycle time.

Reductions are ratios to :func:`baseline_mapping` (every weight kept, ``baseline_bits`` per weight) under the
same constants and tile size.

>>> from admmcompress.hardware.crossbar import CrossbarSpec, ModelMapping, LayerMapping
>>> spec = CrossbarSpec()
>>> mapping = ModelMapping(spec, [LayerMapping("fc", 16, 128, 16, 128, 2048, 1, 1, 1, positions=1)])
>>> cost = crossbar_cost(mapping, act_bits=8)
>>> round(cost.area_um2, 3), round(cost.power_mw, 6)            # area: 25+1200+21.248+4.992+30+358.75
(1639.99, 3.009454)
>>> round(cost.energy_nj, 6)                                    # 8 cycles x 100 ns x 3.009454 mW
2.407564
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from admmcompress.hardware.constants import CROSSBAR, CrossbarConstants
from admmcompress.hardware.crossbar import MAX_TILE, CrossbarSpec, ModelMapping, map_model

COMPONENTS = ("array", "adc", "dac", "sample_hold", "shift_add", "registers")
KINDS = ("dense", "masked", "compact")


def tile_figures(spec: CrossbarSpec, constants: CrossbarConstants = CROSSBAR) -> tuple[dict, dict]:
    """Per-tile ``(area in um^2, power in mW)`` by component for ``spec``'s tile size and ADC resolution."""
    c = constants
    cells = spec.rows * spec.cols / (c.reference_rows.value * c.reference_cols.value)
    # ISAAC's ADC converts its 128 columns per 100 ns cycle; a tile of other width needs that throughput in
    # proportion at the same cycle (one ADC per tile whatever its width made 512x512 tiles 12.5x smaller than
    # 128x128 ones, a review's finding), and 2x per extra bit of resolution
    adc = 2.0 ** (spec.adc_bits - c.reference_adc_bits.value) * spec.cols / c.reference_cols.value
    area = {
        "array": c.array_area.value * cells,
        "adc": c.adc_area.value * adc,
        "dac": c.dac_area.value * spec.rows,
        "sample_hold": c.sample_hold_area.value * spec.cols,
        "shift_add": c.shift_add_area.value,
        "registers": c.registers_area.value,
    }
    power = {
        "array": c.array_power.value * cells,
        "adc": c.adc_power.value * adc,
        "dac": c.dac_power.value * spec.rows,
        "sample_hold": c.sample_hold_power.value * spec.cols,
        "shift_add": c.shift_add_power.value,
        "registers": c.registers_power.value,
    }
    return area, power


@dataclass
class CrossbarCost:
    """Modelled totals of one mapping: tiles, area (um^2), power (mW), energy per inference (nJ), by component."""

    kind: str
    tiles: int
    area: dict[str, float] = field(default_factory=dict)
    power: dict[str, float] = field(default_factory=dict)
    energy_nj: float = 0.0
    layer_energy_nj: dict[str, float] = field(default_factory=dict)

    @property
    def area_um2(self) -> float:
        return sum(self.area.values())

    @property
    def power_mw(self) -> float:
        return sum(self.power.values())

    def ratios(self, baseline: CrossbarCost) -> dict[str, float]:
        """``baseline / this`` for tiles, area, power and energy (how many times smaller; modelled)."""

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else float("inf")

        return {
            "tiles": ratio(baseline.tiles, self.tiles),
            "area": ratio(baseline.area_um2, self.area_um2),
            "power": ratio(baseline.power_mw, self.power_mw),
            "energy": ratio(baseline.energy_nj, self.energy_nj),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "tiles": self.tiles, "area_um2": self.area_um2, "power_mw": self.power_mw,
            "energy_nj": self.energy_nj, "area": dict(self.area), "power": dict(self.power),
            "layer_energy_nj": dict(self.layer_energy_nj), "modelled": True,
        }


def crossbar_cost(
    mapping: ModelMapping, kind: str = "compact", act_bits: int = 8, constants: CrossbarConstants = CROSSBAR
) -> CrossbarCost:
    """Modelled area/power/energy of ``mapping`` counting its ``kind`` tiles (dense, masked or compact)."""
    if kind not in KINDS:
        raise ValueError(f"crossbar_cost: kind={kind!r}; choose one of {KINDS}")
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or act_bits < 1:
        raise ValueError(f"crossbar_cost: act_bits={act_bits!r} must be a positive integer, e.g. 8")
    area, power = tile_figures(mapping.spec, constants)
    tiles = mapping.total(kind)
    cost = CrossbarCost(kind, tiles, {k: v * tiles for k, v in area.items()}, {k: v * tiles for k, v in power.items()})
    tile_power = sum(power.values())
    cycle_ns = constants.cycle_time.value
    for layer in mapping.layers:
        # mW x ns = pJ; / 1000 -> nJ
        energy = getattr(layer, kind) * layer.positions * act_bits * tile_power * cycle_ns / 1000.0
        cost.layer_energy_nj[layer.name] = energy
        cost.energy_nj += energy
    return cost


def _columns(spec: CrossbarSpec, bits: int) -> int:
    """Columns one ``bits``-bit weight takes under ``spec``, reference column included (any tile width)."""
    wide = replace(spec, weight_bits=bits, cols=MAX_TILE)
    return wide.columns_per_weight + wide.reserved_columns


def baseline_spec(spec: CrossbarSpec, baseline_bits: int) -> CrossbarSpec:
    """``spec`` at ``baseline_bits`` per weight: the reference's cells. A tile too narrow for the reference is
    refused in one line about the reference and ``--baseline-bits``, not about the user's own weights."""
    try:
        return replace(spec, weight_bits=baseline_bits)
    except ValueError:
        if not 1 <= baseline_bits <= 16 or _columns(spec, baseline_bits) <= spec.cols:
            raise  # not the tile width: CrossbarSpec's own message names it
    fits = max((b for b in range(1, baseline_bits) if _columns(spec, b) <= spec.cols), default=spec.weight_bits)
    raise ValueError(
        f"hardware: the unpruned {baseline_bits}-bit reference (--baseline-bits {baseline_bits}) takes "
        f"{_columns(spec, baseline_bits)} columns per weight, more than the {spec.cols} of a tile; "
        f"lower --baseline-bits (at most {fits} fits) or use wider tiles"
    ) from None


def baseline_mapping(
    model: nn.Module, spec: CrossbarSpec, baseline_bits: int = 16, example: Any = None
) -> ModelMapping:
    """The unpruned full-precision reference: every weight mapped at ``baseline_bits``, same tiles and cells."""
    return map_model(model, baseline_spec(spec, baseline_bits), example, dense=True)


__all__ = ["COMPONENTS", "KINDS", "CrossbarCost", "baseline_mapping", "baseline_spec", "crossbar_cost", "tile_figures"]
