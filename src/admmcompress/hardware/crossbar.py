"""Mapping a model's GEMM matrices onto memristor crossbar tiles (SPEC 12.1), before and after pruning.

Convention: inputs go on the wordlines (rows), outputs on the bitlines (columns), so a layer's GEMM matrix
``(outputs O, inputs K)`` is laid out transposed on the crossbars. A signed weight takes a *differential
pair* (two cells, ``G+ - G-``) or one cell plus an *offset* (reference) column per tile; a weight with more
magnitude bits than one cell holds is split into ``slices`` cells of ``bits_per_cell`` bits on neighbouring
bitlines. One tile of ``rows x cols`` cells therefore holds ``rows`` inputs x ``outputs_per_tile`` outputs.

Three tile counts per layer:

- ``dense``: the whole matrix, every tile instantiated (the unpruned mapping);
- ``masked``: the same layout, but a tile whose weights are all pruned is not instantiated (masked mapping);
- ``compact``: zero outputs and zero inputs removed first (structured pruning shrinks the matrix), then masked.

>>> spec = CrossbarSpec(rows=4, cols=4, bits_per_cell=2, weight_bits=3)    # 1 slice x 2 cells per weight
>>> spec.columns_per_weight, spec.outputs_per_tile
(2, 2)
>>> m = torch.zeros(4, 8); m[0, 0] = 1.0; m[3, 7] = 1.0                  # 2 x 2 tile blocks of 2 out x 4 in
>>> layer = map_matrix("fc", m, spec)
>>> layer.dense, layer.masked, layer.compact
(4, 2, 1)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from admmcompress.hardware.constants import DEVICE
from admmcompress.structures.groups import as_matrix

SIGNED = ("differential", "offset")
# Largest tile side and ADC resolution accepted: real crossbars stay far below (64..1024 cells a side), and
# the mapping pads every layer to whole tiles, so a huge tile would allocate a huge padded grid.
MAX_TILE = 4096
MAX_ADC_BITS = 24
GEMM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class CrossbarSpec:
    """How weights become cells: tile size, bits per cell, weight bits, signed scheme, conductance range.

    Args:
        rows, cols: cells per tile (wordlines, bitlines); 128 x 128 by default.
        bits_per_cell: bits one cell stores (``2^bits`` conductance levels).
        weight_bits: bits of a weight, sign included.
        signed: ``"differential"`` (two cells per weight) or ``"offset"`` (one cell, a reference column per tile).
        g_min, g_max: conductance range in uS (defaults from :data:`admmcompress.hardware.constants.DEVICE`).
        adc_bits: resolution of the column ADCs.
    """

    rows: int = 128
    cols: int = 128
    bits_per_cell: int = 2
    weight_bits: int = 8
    signed: str = "differential"
    g_min: float = DEVICE.g_min.value
    g_max: float = DEVICE.g_max.value
    adc_bits: int = 8

    def __post_init__(self) -> None:
        for key, example in (("rows", 128), ("cols", 128), ("bits_per_cell", 2), ("weight_bits", 8), ("adc_bits", 8)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"crossbar: {key}={value!r} must be a positive integer, e.g. {example}")
        if max(self.rows, self.cols) > MAX_TILE:
            raise ValueError(
                f"crossbar: tile {self.rows}x{self.cols} is too large; rows and cols must be in [1, {MAX_TILE}], "
                "e.g. 128x128"
            )
        if self.adc_bits > MAX_ADC_BITS:
            raise ValueError(f"crossbar: adc_bits={self.adc_bits} must be in [1, {MAX_ADC_BITS}], e.g. 8")
        if self.weight_bits > 16 or self.bits_per_cell > 8:
            raise ValueError(
                f"crossbar: weight_bits={self.weight_bits}, bits_per_cell={self.bits_per_cell}; "
                "use at most 16 weight bits and 8 bits per cell"
            )
        if self.signed not in SIGNED:
            raise ValueError(f"crossbar: signed={self.signed!r}; choose 'differential' or 'offset'")
        if not 0 < self.g_min < self.g_max:
            raise ValueError(f"crossbar: need 0 < g_min < g_max (uS), got g_min={self.g_min}, g_max={self.g_max}")
        if self.outputs_per_tile < 1:
            raise ValueError(
                f"crossbar: one weight takes {self.columns_per_weight} columns (+{self.reserved_columns} reference), "
                f"more than the {self.cols} of a tile; use wider tiles, more bits per cell or fewer weight bits"
            )

    @property
    def magnitude_bits(self) -> int:
        """Bits the cells store per weight: the sign is the pair's choice of cell, or the offset's."""
        return self.weight_bits - 1 if self.signed == "differential" else self.weight_bits

    @property
    def slices(self) -> int:
        """Cells per weight per polarity (bit slicing when a cell holds fewer bits than the weight)."""
        return max(1, math.ceil(self.magnitude_bits / self.bits_per_cell))

    @property
    def columns_per_weight(self) -> int:
        return self.slices * (2 if self.signed == "differential" else 1)

    @property
    def reserved_columns(self) -> int:
        """Reference columns per tile (the offset scheme subtracts one column's current)."""
        return 1 if self.signed == "offset" else 0

    @property
    def outputs_per_tile(self) -> int:
        return (self.cols - self.reserved_columns) // self.columns_per_weight

    @property
    def inputs_per_tile(self) -> int:
        return self.rows

    def structure_options(self) -> dict[str, Any]:
        """The ``tile`` / ``columns_per_weight`` options of the crossbar_* structures for this spec."""
        return {"tile": [self.rows, self.cols - self.reserved_columns], "columns_per_weight": self.columns_per_weight}

    def describe(self) -> str:
        return (
            f"{self.rows}x{self.cols} tiles, {self.bits_per_cell} bit(s)/cell, {self.weight_bits}-bit weights "
            f"({self.signed}, {self.slices} slice(s), {self.columns_per_weight} column(s)/weight, "
            f"{self.outputs_per_tile} outputs x {self.inputs_per_tile} inputs per tile), "
            f"G in [{self.g_min:g}, {self.g_max:g}] uS, {self.adc_bits}-bit ADC"
        )


class TileLayout(Protocol):
    """What :func:`map_matrix` needs of a spec: the GEMM block one tile (or sub-array) holds."""

    @property
    def outputs_per_tile(self) -> int: ...

    @property
    def inputs_per_tile(self) -> int: ...


def tile_grid(matrix: torch.Tensor, outputs_per_tile: int, inputs_per_tile: int) -> torch.Tensor:
    """Bool ``(output blocks, input blocks)``: which tiles hold at least one nonzero weight.

    >>> tile_grid(torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 2.0]]), 2, 2).int()
    tensor([[1, 0],
            [0, 1]], dtype=torch.int32)
    """
    rows, cols = matrix.shape
    n_out, n_in = math.ceil(rows / outputs_per_tile), math.ceil(cols / inputs_per_tile)
    padded = matrix.new_zeros(n_out * outputs_per_tile, n_in * inputs_per_tile, dtype=torch.bool)
    padded[:rows, :cols] = matrix != 0
    return padded.view(n_out, outputs_per_tile, n_in, inputs_per_tile).any(dim=3).any(dim=1)


@dataclass
class LayerMapping:
    """Tiles of one layer: dense, masked (all-pruned tiles dropped) and compacted + masked."""

    name: str
    outputs: int
    inputs: int
    kept_outputs: int
    kept_inputs: int
    nonzero: int
    dense: int
    masked: int
    compact: int
    positions: int = 1  # output positions per sample (conv: H x W); each needs one pass over the tiles
    note: str = ""

    @property
    def weights(self) -> int:
        return self.outputs * self.inputs

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def map_matrix(name: str, matrix: torch.Tensor, spec: TileLayout, positions: int = 1) -> LayerMapping:
    """Tile counts of one GEMM matrix ``(outputs, inputs)`` under ``spec``."""
    matrix = matrix.detach()
    out_t, in_t = spec.outputs_per_tile, spec.inputs_per_tile
    rows, cols = matrix.shape
    nonzero = matrix != 0
    kept_rows, kept_cols = nonzero.any(dim=1), nonzero.any(dim=0)
    dense = math.ceil(rows / out_t) * math.ceil(cols / in_t)
    masked = int(tile_grid(matrix, out_t, in_t).sum())
    compacted = matrix[kept_rows][:, kept_cols]
    compact = int(tile_grid(compacted, out_t, in_t).sum()) if compacted.numel() else 0
    # Removing zero rows/columns shifts the others across tile borders, which can fill more tiles than the
    # masked layout; a mapper keeps whichever layout needs fewer.
    compact = min(compact, masked)
    note = ""
    if rows < out_t and cols < in_t:
        used = 100.0 * rows * cols / (out_t * in_t)
        note = (
            f"'{name}' ({rows}x{cols}) is smaller than one tile ({out_t} outputs x {in_t} inputs): "
            f"it uses 1 tile, {used:.1f}% of its cells; tile-level pruning cannot help it (use a smaller tile)"
        )
    return LayerMapping(
        name, rows, cols, int(kept_rows.sum()), int(kept_cols.sum()), int(nonzero.sum()), dense, masked, compact,
        positions, note,
    )


def gemm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's Linear/Conv layers (the ones a crossbar computes), by name."""
    for name, module in model.named_modules():
        if isinstance(module, GEMM_LAYERS) and isinstance(getattr(module, "weight", None), torch.Tensor):
            yield name, module


def output_positions(model: nn.Module, example: torch.Tensor | None) -> dict[str, int]:
    """Output positions per sample of each GEMM layer (1 for Linear), from one forward pass on ``example``."""
    layers = dict(gemm_layers(model))
    if example is None:
        return {name: 1 for name in layers}
    found: dict[str, int] = {}
    handles = []
    for name, module in layers.items():
        def record(mod: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
            found[name] = max(1, out[0].numel() // mod.weight.shape[0])  # conv: H x W; linear: 1

        handles.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: found.get(name, 1) for name in layers}


@dataclass
class ModelMapping:
    """Every GEMM layer's tiles under one spec, with totals and notes (layers smaller than a tile)."""

    spec: CrossbarSpec
    layers: list[LayerMapping] = field(default_factory=list)

    def total(self, kind: str) -> int:
        """Sum of ``dense``, ``masked`` or ``compact`` tiles over the layers."""
        return sum(getattr(layer, kind) for layer in self.layers)

    @property
    def notes(self) -> list[str]:
        return [layer.note for layer in self.layers if layer.note]


def gemm_matrices(
    model: nn.Module, example: torch.Tensor | None, dense: bool = False
) -> Iterator[tuple[str, torch.Tensor, int]]:
    """``(name, GEMM matrix, output positions per sample)`` of every mapped layer; ``dense``: all ones (the
    unpruned mapping under the same layout)."""
    positions = output_positions(model, example)
    for name, module in gemm_layers(model):
        matrix = as_matrix(module.weight.detach())
        yield name, (torch.ones_like(matrix) if dense else matrix), positions[name]


def map_model(
    model: nn.Module, spec: CrossbarSpec, example: torch.Tensor | None = None, dense: bool = False
) -> ModelMapping:
    """Map every Linear/Conv layer of ``model``; ``dense=True`` maps as if nothing were pruned.

    Raises ``ValueError`` if the model has no layer a crossbar computes.
    """
    mapping = ModelMapping(spec)
    for name, matrix, positions in gemm_matrices(model, example, dense):
        mapping.layers.append(map_matrix(name, matrix, spec, positions))
    if not mapping.layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear or Conv layer to map onto crossbar tiles; "
            "the crossbar model maps GEMM layers only (give a model with Linear/Conv layers)"
        )
    return mapping


__all__ = [
    "MAX_ADC_BITS", "MAX_TILE", "CrossbarSpec", "LayerMapping", "ModelMapping", "gemm_layers", "gemm_matrices",
    "map_matrix", "map_model", "TileLayout", "output_positions", "tile_grid",
]
