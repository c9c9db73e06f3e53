"""SOT-MRAM processing-in-memory cost model (SPEC 13): sub-array mapping, bit-serial cycles, energy, area.

Weights of ``weight_bits`` (1-4: the engine computes bit-wise) are stored as bit planes: one weight takes
``weight_bits`` cells on neighbouring bitlines of a ``rows x cols`` sub-array, inputs on the rows, so a
sub-array holds ``rows`` inputs x ``cols // weight_bits`` outputs. A *row operation* activates one row
(one input) against every bitline of the sub-array; computing it bit-serially takes
``weight_bits x act_bits`` cycles (one bit-wise AND + bit count per weight-bit/input-bit pair). Weights are
written once (inference only), so the write energy is reported separately, not per inference.

Per layer, with the mapping's instantiated sub-arrays (all-pruned ones are not written, zero outputs and
inputs removed first, as for crossbars):

- area = sub-arrays x (rows x cols x cell area + cols x column periphery);
- row operations per inference = output positions x sum over instantiated sub-arrays of their occupied rows;
- energy per inference = row operations x ``weight_bits x act_bits`` cycles x ``cols // weight_bits`` bitlines
  sensed per cycle (one weight bit plane against one input bit) x (AND + count energy), so a row operation costs
  ``act_bits x cols`` bit operations whatever the weight width (it charged every bitline in every cycle, the
  weight bits twice: energy grew with their square, a review's finding);
- latency = sum over layers of positions x (rows of its fullest sub-array) x cycles x cycle time (the
  sub-arrays of a layer work in parallel, layers in sequence);
- power = energy / latency.

All figures are modelled from :data:`admmcompress.hardware.constants.PIM` ([M] values) and reported as ratios
to the unpruned mapping at ``baseline_bits`` under the same constants.

>>> spec = PIMSpec(rows=4, cols=4, weight_bits=2, act_bits=2)        # 2 outputs x 4 inputs per sub-array
>>> m = torch.zeros(4, 8); m[0, :3] = 1.0                              # one sub-array, 3 occupied rows
>>> cost = pim_matrix_cost("fc", m, spec)
>>> cost.subarrays, cost.row_ops, cost.cycles_per_row_op
(1, 3, 4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from admmcompress.hardware.constants import PIM, PIMConstants
from admmcompress.hardware.crossbar import block_tile_counts, gemm_blocks, group_row_sums, line_tiles


@dataclass(frozen=True)
class PIMSpec:
    """SOT-MRAM sub-array size and the bit widths of weights and activations."""

    rows: int = 256
    cols: int = 256
    weight_bits: int = 4
    act_bits: int = 8

    def __post_init__(self) -> None:
        for key in ("rows", "cols", "weight_bits", "act_bits"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sot-mram: {key}={value!r} must be a positive integer")
        if self.weight_bits > self.cols:
            raise ValueError(f"sot-mram: {self.weight_bits}-bit weights do not fit {self.cols} columns")

    @property
    def outputs_per_tile(self) -> int:
        return self.cols // self.weight_bits

    @property
    def inputs_per_tile(self) -> int:
        return self.rows

    @property
    def cycles_per_row_op(self) -> int:
        return self.weight_bits * self.act_bits


@dataclass
class PIMLayerCost:
    """One layer on SOT-MRAM sub-arrays: how many, how many row operations, cycles; modelled."""

    name: str
    subarrays: int
    row_ops: int  # per output position
    max_rows: int  # occupied rows of the fullest sub-array (the layer's latency per position)
    positions: int
    cycles_per_row_op: int
    stored_bits: int


def pim_matrix_cost(name: str, matrix: torch.Tensor, spec: PIMSpec, positions: int = 1) -> PIMLayerCost:
    """Sub-arrays and row operations of one GEMM matrix (zero outputs/inputs removed, empty sub-arrays dropped)."""
    nonzero = matrix.detach() != 0
    kept = nonzero[nonzero.any(dim=1)][:, nonzero.any(dim=0)]
    out_t, in_t = spec.outputs_per_tile, spec.inputs_per_tile
    rows, cols = kept.shape
    n_out, n_in = math.ceil(rows / out_t), math.ceil(cols / in_t)
    padded = torch.zeros(max(n_out, 1) * out_t, max(n_in, 1) * in_t, dtype=torch.bool)
    padded[:rows, :cols] = kept
    blocks = padded.view(max(n_out, 1), out_t, max(n_in, 1), in_t)
    occupied_rows = blocks.any(dim=1).sum(dim=2)  # (out blocks, in blocks): rows used in each sub-array
    return PIMLayerCost(
        name, int((occupied_rows > 0).sum()), int(occupied_rows.sum()), int(occupied_rows.max()) if kept.numel() else 0,
        positions, spec.cycles_per_row_op, int(nonzero.sum()) * spec.weight_bits,
    )


def pim_blocks_cost(name: str, blocks: torch.Tensor, spec: PIMSpec, positions: int = 1) -> PIMLayerCost:
    """:func:`pim_matrix_cost` of the block-diagonal layout of ``blocks`` ``(groups, outputs, inputs)`` (a grouped
    conv's, :meth:`~admmcompress.hardware.crossbar.GemmWeight.blocks`), counted from the blocks: the layout,
    ``groups`` times the weights, is never built (a 4096-channel 7x7 depthwise conv's would take GBs).

    >>> spec = PIMSpec(rows=4, cols=4, weight_bits=2, act_bits=2)        # 2 outputs x 4 inputs per sub-array
    >>> cost = pim_blocks_cost("dw", torch.ones(3, 1, 3), spec)          # 3 x 9 layout, rows 4 + 2 and 2 + 1
    >>> cost.subarrays, cost.row_ops, cost.max_rows
    (4, 9, 4)
    """
    blocks = blocks.detach()
    if blocks.dim() != 3:
        raise ValueError(
            f"pim_blocks_cost: '{name}' blocks of shape {tuple(blocks.shape)}; give (groups, outputs, inputs) "
            "blocks, e.g. GemmWeight.blocks()"
        )
    if blocks.shape[0] == 1:
        return pim_matrix_cost(name, blocks[0], spec, positions)
    nonzero = blocks != 0
    rows = subarray_rows(nonzero, spec)
    return PIMLayerCost(
        name, rows.numel(), int(rows.sum()), int(rows.max()) if rows.numel() else 0, positions,
        spec.cycles_per_row_op, int(nonzero.sum()) * spec.weight_bits,
    )


def subarray_rows(nonzero: torch.Tensor, spec: PIMSpec) -> torch.Tensor:
    """Occupied rows of each instantiated sub-array (one entry per sub-array, row-major order) of the compacted
    block-diagonal layout of ``nonzero`` ``(groups, outputs, inputs)``: zero outputs and inputs removed, a row
    (an input) occupied in a sub-array when one of the sub-array's outputs has a weight on it.

    >>> spec = PIMSpec(rows=4, cols=4, weight_bits=2)                 # 2 outputs x 4 inputs per sub-array
    >>> subarray_rows(torch.ones(3, 1, 3, dtype=torch.bool), spec).tolist()   # outputs 0-1: inputs 0-3, 4-5
    [4, 2, 2, 1]
    """
    if not bool(nonzero.any()):
        return torch.zeros(0, dtype=torch.int64)
    # compacted as the dense path compacts: the kept lines close up across the groups (crossbar.map_blocks)
    row_tiles = line_tiles(nonzero.any(dim=2), spec.outputs_per_tile)
    col_tiles = line_tiles(nonzero.any(dim=1), spec.inputs_per_tile)
    # a group's outputs merged per sub-array row: (group, sub-array row, input) holds whether that input is used
    used = group_row_sums(nonzero, row_tiles) > 0
    n_rows = used.shape[1]
    # one "output" per sub-array row: block_tile_counts then counts used inputs, i.e. occupied rows, per sub-array
    used_tiles = row_tiles[:, :1] + torch.arange(n_rows).view(1, n_rows)
    return block_tile_counts(used, used_tiles, col_tiles)


@dataclass
class PIMCost:
    """Modelled totals: sub-arrays, area (um^2), energy per inference (nJ), latency (us), power (mW)."""

    spec: PIMSpec
    layers: list[PIMLayerCost] = field(default_factory=list)
    constants: PIMConstants = PIM

    @property
    def subarrays(self) -> int:
        return sum(layer.subarrays for layer in self.layers)

    @property
    def area_um2(self) -> float:
        c, s = self.constants, self.spec
        per = s.rows * s.cols * c.cell_area.value + s.cols * c.column_periphery_area.value
        return self.subarrays * per

    @property
    def energy_nj(self) -> float:
        c, s = self.constants, self.spec
        per_cycle_pj = s.outputs_per_tile * (c.row_op_energy.value + c.count_energy.value)  # one bit plane
        cycles = sum(layer.positions * layer.row_ops * layer.cycles_per_row_op for layer in self.layers)
        return cycles * per_cycle_pj / 1000.0

    @property
    def latency_us(self) -> float:
        cycles = sum(layer.positions * layer.max_rows * layer.cycles_per_row_op for layer in self.layers)
        return cycles * self.constants.cycle_time.value / 1000.0

    @property
    def power_mw(self) -> float:
        latency = self.latency_us
        return self.energy_nj / latency if latency > 0 else 0.0  # nJ / us = mW

    @property
    def write_energy_nj(self) -> float:
        return sum(layer.stored_bits for layer in self.layers) * self.constants.write_energy.value / 1000.0

    def ratios(self, baseline: PIMCost) -> dict[str, float]:
        """``baseline / this`` for sub-arrays, area, energy, latency and power (modelled)."""

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else float("inf")

        return {
            "subarrays": ratio(baseline.subarrays, self.subarrays),
            "area": ratio(baseline.area_um2, self.area_um2),
            "energy": ratio(baseline.energy_nj, self.energy_nj),
            "latency": ratio(baseline.latency_us, self.latency_us),
            "power": ratio(baseline.power_mw, self.power_mw),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "subarrays": self.subarrays, "area_um2": self.area_um2, "energy_nj": self.energy_nj,
            "latency_us": self.latency_us, "power_mw": self.power_mw, "write_energy_nj": self.write_energy_nj,
            "weight_bits": self.spec.weight_bits, "act_bits": self.spec.act_bits, "modelled": True,
        }


def pim_cost(
    model: nn.Module, spec: PIMSpec, example: torch.Tensor | None = None, dense: bool = False,
    constants: PIMConstants = PIM,
) -> PIMCost:
    """Modelled SOT-MRAM cost of every weight matrix the crossbar mapping covers (the same GEMM blocks and
    passes as :func:`~admmcompress.hardware.crossbar.map_model`); ``dense=True`` ignores pruning."""
    cost = PIMCost(spec, constants=constants)
    for gemm, blocks, positions in gemm_blocks(model, example, dense):
        cost.layers.append(pim_blocks_cost(gemm.name, blocks, spec, positions))
    if not cost.layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear, Conv or recurrent layer to map onto SOT-MRAM sub-arrays; "
            "give a model with Linear/Conv/GRU/LSTM layers"
        )
    return cost


def pim_baseline(model: nn.Module, spec: PIMSpec, baseline_bits: int = 16, example: Any = None) -> PIMCost:
    """The unpruned reference at ``baseline_bits`` per weight, same sub-arrays and activation bits."""
    if baseline_bits > spec.cols:  # one line about the reference, not about the user's own weight bits
        raise ValueError(
            f"hardware: the unpruned {baseline_bits}-bit SOT-MRAM reference (--baseline-bits {baseline_bits}) "
            f"takes {baseline_bits} columns per weight, more than the {spec.cols} of a sub-array; lower "
            "--baseline-bits or use wider sub-arrays"
        )
    return pim_cost(model, replace(spec, weight_bits=baseline_bits), example, dense=True)


__all__ = [
    "PIMCost", "PIMLayerCost", "PIMSpec", "pim_baseline", "pim_blocks_cost", "pim_cost", "pim_matrix_cost",
    "subarray_rows",
]
