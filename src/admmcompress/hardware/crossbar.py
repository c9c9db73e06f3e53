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

What is mapped (:func:`gemm_weights`): every weight matrix :func:`~admmcompress.structures.groups.gemm_params`
names (the ones storage counts) of Linear, Conv, ConvTranspose and recurrent (RNN/GRU/LSTM and their cells)
layers. A recurrent layer gives one matrix per ``weight_ih_l*``/``weight_hh_l*`` (all its gates share the
inputs, so they are outputs of one matrix), run once per time step. A transposed conv is the direct conv it
equals (zeros inserted between its inputs). A conv with ``g`` groups is laid out block-diagonally: group ``i``'s
``(O/g, C_in/g*k)`` matrix on the diagonal of an ``(O, C_in*k)`` grid. A weight matrix of any other layer
(embeddings, attention in-projections, custom layers) is listed in :attr:`ModelMapping.unmapped`, so the
report can name what its totals leave out.

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
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.rnn import PackedSequence

from admmcompress.hardware.constants import DEVICE
from admmcompress.plan.graph import Hook, run_example
from admmcompress.structures.groups import gemm_params

SIGNED = ("differential", "offset")
# Reference columns per tile of each signed scheme: the offset scheme subtracts one column's current.
RESERVED_COLUMNS = {"differential": 0, "offset": 1}
# Largest tile side and ADC resolution accepted: real crossbars stay far below (64..1024 cells a side), and
# the mapping pads every layer to whole tiles, so a huge tile would allocate a huge padded grid.
MAX_TILE = 4096
MAX_ADC_BITS = 24
# Layers whose gemm_params() a crossbar computes as matrix-vector products (ConvTranspose subclasses _ConvNd).
GEMM_LAYERS = (nn.Linear, _ConvNd, nn.RNNBase, nn.RNNCellBase)


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
    def max_code(self) -> int:
        """Largest magnitude code ``|w| / q`` (symmetric, both schemes); at least 1, so a 1-bit weight keeps
        -q, 0 (pruned) and +q."""
        return max(1, 2 ** (self.weight_bits - 1) - 1)

    @property
    def offset_code(self) -> int:
        """What the offset scheme adds to a signed code ``-max_code..max_code`` so the cells hold it unsigned."""
        return 2 ** (self.weight_bits - 1)

    @property
    def magnitude_bits(self) -> int:
        """Bits the cells store per weight: differential, the magnitude (the sign picks the pair's cell);
        offset, the shifted code (``weight_bits``, but 2 for 1-bit weights: -1, 0 and +1 shift to 0..2)."""
        if self.signed == "differential":
            return self.weight_bits - 1
        return (self.offset_code + self.max_code).bit_length()

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
        return RESERVED_COLUMNS[self.signed]

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


@dataclass(frozen=True)
class GemmWeight:
    """One weight matrix a crossbar computes with, ``module.<param>``, and its GEMM blocks (one per conv group).

    >>> conv = nn.Conv2d(4, 6, 3, groups=2)                        # weight (6, 2, 3, 3)
    >>> gemm = GemmWeight("conv", conv)
    >>> tuple(gemm.blocks().shape), tuple(gemm.matrix().shape)     # 2 groups of 3 outputs x 18 inputs
    ((2, 3, 18), (6, 36))
    >>> torch.equal(gemm.weight_of(gemm.blocks()), conv.weight)
    True
    """

    layer: str
    module: nn.Module
    param: str = "weight"

    @property
    def name(self) -> str:
        """The layer's name; ``layer.param`` for one of the matrices of a recurrent layer."""
        if self.param == "weight":
            return self.layer
        return f"{self.layer}.{self.param}" if self.layer else self.param

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def groups(self) -> int:
        return self.module.groups if isinstance(self.module, _ConvNd) else 1

    def blocks(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(groups, outputs, inputs)`` GEMM blocks of ``weight`` (default: the module's), detached."""
        w = (self.weight if weight is None else weight).detach()
        g = self.groups
        if isinstance(self.module, _ConvTransposeNd):
            # Weight (C_in, C_out/g, *k): the direct conv it equals has C_out/g outputs x C_in/g * k inputs per
            # group. That conv flips the kernel, which only reorders a group's inputs: wordlines take any order.
            return w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(1, 2).reshape(g, w.shape[1], -1)
        return w.reshape(g, w.shape[0] // g, -1)

    def weight_of(self, blocks: torch.Tensor) -> torch.Tensor:
        """The weight tensor whose :meth:`blocks` are ``blocks`` (the inverse of :meth:`blocks`)."""
        shape = self.weight.shape
        if isinstance(self.module, _ConvTransposeNd):
            g, outputs = blocks.shape[0], blocks.shape[1]
            return blocks.reshape(g, outputs, shape[0] // g, -1).transpose(1, 2).reshape(shape)
        return blocks.reshape(shape)

    def matrix(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(outputs, inputs)`` matrix laid out on the crossbars: the blocks on the diagonal."""
        return block_diagonal(self.blocks(weight))

    def layout(self) -> torch.Tensor:
        """Ones where the layout has a weight (block-diagonal for a grouped conv): the unpruned mapping."""
        return block_diagonal(torch.ones_like(self.blocks()))


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """``(g, o, k)`` blocks as the ``(g*o, g*k)`` matrix with the blocks on its diagonal, zeros elsewhere.

    Why block-diagonal and not one set of tiles per group: the function is the same, and a group of a depthwise
    conv is one output x k inputs, so one tile per group would leave all but one column of it empty; on the
    diagonal, the groups share tiles and the empty off-diagonal tiles are never instantiated (masked mapping).

    >>> block_diagonal(torch.ones(2, 1, 2)).int()
    tensor([[1, 1, 0, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    return blocks[0] if blocks.shape[0] == 1 else torch.block_diag(*blocks.unbind(0))


def diagonal_blocks(matrix: torch.Tensor, groups: int) -> torch.Tensor:
    """The ``(groups, o, k)`` diagonal blocks of a block-diagonal ``matrix`` (the inverse of :func:`block_diagonal`)."""
    rows, cols = matrix.shape
    grid = matrix.reshape(groups, rows // groups, groups, cols // groups)
    return grid.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def gemm_weights(model: nn.Module) -> list[GemmWeight]:
    """Every weight matrix a crossbar computes: the ``gemm_params`` (what storage counts) of each Linear, Conv,
    ConvTranspose and recurrent layer."""
    return [
        GemmWeight(name, module, param)
        for name, module in model.named_modules()
        if isinstance(module, GEMM_LAYERS)
        for param in gemm_params(module)
    ]


def unmapped_weights(model: nn.Module) -> dict[str, int]:
    """``{"layer.param": weights}`` of every weight matrix or kernel no crossbar layer computes (embeddings,
    attention in-projections, custom layers): what the mapping's totals leave out.

    >>> unmapped_weights(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
    {'0.weight': 40}
    """
    mapped = {(id(gemm.module), gemm.param) for gemm in gemm_weights(model)}
    return {
        f"{name}.{param}" if name else param: value.numel()
        for name, module in model.named_modules()
        for param, value in module.named_parameters(recurse=False)
        if value.dim() >= 2 and (id(module), param) not in mapped
    }


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
    positions: int = 1  # passes over the tiles per sample: output positions (conv: H x W), time steps (RNN)
    note: str = ""
    groups: int = 1  # a grouped conv's matrix is block-diagonal: outputs x inputs holds weights / groups of them

    @property
    def weights(self) -> int:
        return self.outputs * self.inputs // self.groups

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def map_matrix(
    name: str, matrix: torch.Tensor, spec: TileLayout, positions: int = 1, groups: int = 1
) -> LayerMapping:
    """Tile counts of one GEMM matrix ``(outputs, inputs)`` under ``spec``; ``groups > 1``: the matrix is the
    block-diagonal layout of a grouped conv, and ``dense`` counts only the tiles its diagonal blocks touch."""
    matrix = matrix.detach()
    if groups > 1:
        return map_blocks(name, _checked_blocks(name, matrix, groups), spec, positions)
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
    return LayerMapping(
        name, rows, cols, int(kept_rows.sum()), int(kept_cols.sum()), int(nonzero.sum()), dense, masked,
        min(compact, masked), positions, _one_tile_note(name, rows, cols, spec),
    )


def _checked_blocks(name: str, matrix: torch.Tensor, groups: int) -> torch.Tensor:
    """The diagonal blocks of a grouped conv's layout ``matrix``; one-line ``ValueError`` if it is not one."""
    rows, cols = matrix.shape
    fix = "give the block-diagonal layout of a grouped conv (GemmWeight.matrix()) or groups=1"
    if rows % groups or cols % groups:
        raise ValueError(f"map_matrix: '{name}' ({rows}x{cols}) does not split into {groups} diagonal blocks; {fix}")
    blocks = diagonal_blocks(matrix, groups)
    # weights off the diagonal blocks would be dropped from the counts: refused, not ignored
    if int(torch.count_nonzero(blocks)) != int(torch.count_nonzero(matrix)):
        raise ValueError(f"map_matrix: '{name}' has nonzero weights off its {groups} diagonal blocks; {fix}")
    return blocks


def map_blocks(name: str, blocks: torch.Tensor, spec: TileLayout, positions: int = 1) -> LayerMapping:
    """:func:`map_matrix` of the block-diagonal layout of ``blocks`` ``(groups, outputs, inputs)`` (a grouped
    conv's, :meth:`GemmWeight.blocks`), counted from the blocks: the layout, ``groups`` times the weights, is
    never built (a 768-channel 7x7 depthwise conv's took 0.8 GB and seconds).

    >>> spec = CrossbarSpec(rows=4, cols=4, bits_per_cell=2, weight_bits=3)       # 2 outputs x 4 inputs a tile
    >>> layer = map_blocks("dw", torch.ones(6, 1, 3), spec)                      # 6 x 18 layout, 3 x 5 tiles
    >>> layer.dense, layer.masked, (layer.outputs, layer.inputs, layer.groups)
    (6, 6, (6, 18, 6))
    """
    blocks = blocks.detach()
    if blocks.dim() != 3:
        raise ValueError(
            f"map_blocks: '{name}' blocks of shape {tuple(blocks.shape)}; give (groups, outputs, inputs) blocks, "
            "e.g. GemmWeight.blocks()"
        )
    groups, outputs, inputs = blocks.shape
    if groups == 1:
        return map_matrix(name, blocks[0], spec, positions)
    out_t, in_t = spec.outputs_per_tile, spec.inputs_per_tile
    nonzero = blocks != 0
    kept_rows, kept_cols = nonzero.any(dim=2), nonzero.any(dim=1)  # (groups, outputs), (groups, inputs)
    on = torch.ones(1, 1, dtype=torch.bool)
    row_tiles, col_tiles = line_tiles(on.expand(groups, outputs), out_t), line_tiles(on.expand(groups, inputs), in_t)
    dense = block_tile_counts(on.view(1, 1, 1).expand(groups, outputs, inputs), row_tiles, col_tiles).numel()
    masked = block_tile_counts(nonzero, row_tiles, col_tiles).numel()
    # compacted: the kept lines close up across the groups, so the tile of a kept line is its rank among them
    compact = block_tile_counts(nonzero, line_tiles(kept_rows, out_t), line_tiles(kept_cols, in_t)).numel()
    rows, cols = groups * outputs, groups * inputs
    return LayerMapping(
        name, rows, cols, int(kept_rows.sum()), int(kept_cols.sum()), int(nonzero.sum()), dense, masked,
        min(compact, masked), positions, _one_tile_note(name, rows, cols, spec), groups,
    )


def line_tiles(kept: torch.Tensor, per_tile: int) -> torch.Tensor:
    """The tile index along one axis of a block-diagonal layout of each line (row or column) of its groups,
    ``kept`` ``(groups, lines)``: lines in group order, those not kept removed (a removed line gets its kept
    predecessor's tile, harmless: it holds no weight).

    >>> line_tiles(torch.tensor([[True, False, True], [True, True, False]]), 2).tolist()
    [[0, 0, 0], [1, 1, 1]]
    """
    rank = kept.reshape(-1).cumsum(0) - 1
    return (rank.clamp(min=0) // per_tile).view(kept.shape)


def block_tile_counts(nonzero: torch.Tensor, row_tiles: torch.Tensor, col_tiles: torch.Tensor) -> torch.Tensor:
    """Nonzero weights on each occupied tile (one entry per tile, in row-major tile order) of the block-diagonal
    layout of ``nonzero`` ``(groups, outputs, inputs)``, whose rows and columns lie on tiles ``row_tiles``
    ``(groups, outputs)`` and ``col_tiles`` ``(groups, inputs)`` (:func:`line_tiles`).

    Each group's lines lie on consecutive tiles, so a group's weights are summed into its own small grid of the
    tiles it spans, and groups sharing a tile are then merged by the tile's index: memory of the order of the
    weights, not of the layout.

    >>> on = torch.ones(3, 1, dtype=torch.bool)
    >>> block_tile_counts(torch.ones(3, 1, 2, dtype=torch.bool), line_tiles(on, 2),
    ...                   line_tiles(on.expand(3, 2), 4)).tolist()  # 3 x 6 layout, 2 x 4 tiles: groups 0, 1 share one
    [4, 2]
    """
    if nonzero.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    by_tile = group_tile_sums(nonzero, row_tiles, col_tiles)
    groups, n_rows, n_cols = by_tile.shape
    row_first, col_first = row_tiles[:, :1], col_tiles[:, :1]
    occupied = by_tile > 0
    width = int(col_tiles.max()) + 1
    tile_row = row_first.view(groups, 1, 1) + torch.arange(n_rows).view(1, n_rows, 1)
    tile_col = col_first.view(groups, 1, 1) + torch.arange(n_cols).view(1, 1, n_cols)
    tiles, where = torch.unique((tile_row * width + tile_col)[occupied], return_inverse=True)
    return torch.zeros(tiles.numel(), dtype=torch.int64).index_add_(0, where, by_tile[occupied].to(torch.int64))


def group_tile_sums(nonzero: torch.Tensor, row_tiles: torch.Tensor, col_tiles: torch.Tensor) -> torch.Tensor:
    """Nonzero weights of each group on each tile it spans, ``(groups, n_rows, n_cols)``: local tile ``(i, j)`` of
    group ``g`` is tile ``(row_tiles[g, 0] + i, col_tiles[g, 0] + j)`` of the layout (those past the group's last
    tile hold 0). Its lines lie on consecutive tiles, so summing its rows, then its columns, needs memory of the
    order of the weights, not of the block-diagonal layout.

    >>> on = torch.ones(2, 3, dtype=torch.bool)
    >>> group_tile_sums(torch.ones(2, 1, 3, dtype=torch.bool), line_tiles(on[:, :1], 2), line_tiles(on, 4)).tolist()
    [[[3, 0]], [[1, 2]]]
    """
    by_rows = group_row_sums(nonzero, row_tiles)
    groups, n_rows, inputs = by_rows.shape
    col_local = col_tiles - col_tiles[:, :1]  # from each group's first
    n_cols = int(col_local.max()) + 1
    group = torch.arange(groups).view(groups, 1)
    return torch.zeros(groups * n_cols, n_rows, dtype=torch.int32).index_add_(
        0, (col_local + group * n_cols).reshape(-1), by_rows.transpose(1, 2).reshape(groups * inputs, n_rows),
    ).view(groups, n_cols, n_rows).transpose(1, 2)


def group_row_sums(nonzero: torch.Tensor, row_tiles: torch.Tensor) -> torch.Tensor:
    """Nonzero weights of each group per tile row it spans and input, ``(groups, n_rows, inputs)``: the rows of
    ``nonzero`` ``(groups, outputs, inputs)`` summed by their tile row ``row_tiles`` ``(groups, outputs)``, counted
    from each group's first (int32: a tile holds far fewer than 2^31 weights; this copy is as large as the weights).

    >>> group_row_sums(torch.ones(2, 3, 1, dtype=torch.bool), line_tiles(torch.ones(2, 3, dtype=torch.bool), 2))
    ... # doctest: +NORMALIZE_WHITESPACE
    tensor([[[2], [1]], [[1], [2]]], dtype=torch.int32)
    """
    groups, outputs, inputs = nonzero.shape
    row_local = row_tiles - row_tiles[:, :1]
    n_rows = int(row_local.max()) + 1
    group = torch.arange(groups).view(groups, 1)
    return torch.zeros(groups * n_rows, inputs, dtype=torch.int32).index_add_(
        0, (row_local + group * n_rows).reshape(-1), nonzero.reshape(groups * outputs, inputs).to(torch.int32)
    ).view(groups, n_rows, inputs)


def _one_tile_note(name: str, rows: int, cols: int, spec: TileLayout) -> str:
    """The note on a layer that fits in one tile (an exact fit too: one tile either way); "" otherwise."""
    out_t, in_t = spec.outputs_per_tile, spec.inputs_per_tile
    if rows > out_t or cols > in_t:
        return ""
    used = 100.0 * rows * cols / (out_t * in_t)
    return (
        f"'{name}' ({rows}x{cols}) fits in one tile ({out_t} outputs x {in_t} inputs): "
        f"it uses 1 tile, {used:.1f}% of its cells; tile-level pruning cannot help it (use a smaller tile)"
    )


def gemm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's layers a crossbar computes (Linear, Conv, ConvTranspose, recurrent), by name."""
    seen = set()
    for gemm in gemm_weights(model):
        if id(gemm.module) not in seen:
            seen.add(id(gemm.module))
            yield gemm.layer, gemm.module


def _time_steps(module: nn.RNNBase, output: Any) -> int:
    """Time steps of a recurrent layer's output (its first element), batched, unbatched or packed."""
    out = output[0]
    if isinstance(out, PackedSequence):
        return len(out.batch_sizes)
    if out.dim() == 2:  # unbatched (L, D*H)
        return out.shape[0]
    return out.shape[1] if module.batch_first else out.shape[0]


def passes(module: nn.Module, output: Any, samples: int = 1) -> int:
    """Passes over a layer's tiles that one call makes per sample, the call having run on ``samples`` samples:
    output positions (conv: H x W), time steps (recurrent layer), vectors (Linear over a sequence); one for a
    recurrent cell's step."""
    if isinstance(module, nn.RNNBase):
        return _time_steps(module, output)
    if isinstance(module, nn.RNNCellBase):
        return 1
    channels = module.out_channels if isinstance(module, _ConvNd) else module.weight.shape[0]
    return max(1, output.numel() // channels // max(1, samples))


def output_positions(model: nn.Module, example: Any) -> dict[str, int]:
    """Passes per sample over each GEMM layer's tiles (1 for Linear), from one forward pass on ``example``;
    a layer called several times (a recurrent cell in a loop, a shared layer) adds up its calls.

    The whole example runs, not a slice of it: a sequence-first model's batch is not on dim 0, so cutting dim 0
    would cut time. How many samples it held is read off the layers that know their batch axis (recurrent layers
    and attention, by ``batch_first``) and a loop of recurrent cells over the example's dim 0, when they agree
    (``plan.graph.run_example``); otherwise the example is taken batch-first (dim 0).
    """
    layers = dict(gemm_layers(model))
    if example is None:
        return {name: 1 for name in layers}
    calls: dict[str, list[tuple[nn.Module, Any]]] = {}  # outputs kept (shapes only) until the batch is known
    hooks: list[tuple[nn.Module, Hook]] = []
    for name, module in layers.items():
        def record(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            calls.setdefault(name, []).append((mod, _shape_only(out)))

        hooks.append((module, record))
    steps: dict[str, int] = {}
    for name, module in model.named_modules():
        out_proj = f"{name}.out_proj" if name else "out_proj"
        if isinstance(module, nn.MultiheadAttention) and out_proj in layers:
            # its out_proj runs inside F.multi_head_attention_forward, never through its own forward (no hook
            # fires): one pass per output position of the attention, read off the attention's output
            def attend(mod: nn.MultiheadAttention, args: Any, out: Any, name: str = out_proj) -> None:
                result = out[0]
                positions = result.shape[0] if result.dim() == 2 else result.shape[1 if mod.batch_first else 0]
                steps[name] = steps.get(name, 0) + positions

            hooks.append((module, attend))
    samples = run_example(model, example, hooks)  # a tensor, or a tuple/dict of inputs as the plan takes them
    for name, made in calls.items():
        steps[name] = steps.get(name, 0) + sum(passes(mod, out, samples) for mod, out in made)
    return {name: steps.get(name, 1) for name in layers}


def _shape_only(output: Any) -> Any:
    """What :func:`passes` reads of an output, without holding on to its data: empty tensors of the same shapes
    (a recurrent layer's packed output kept as it is: its batch sizes are small)."""
    if isinstance(output, torch.Tensor):
        return torch.empty(output.shape, device="meta")
    if isinstance(output, tuple) and not isinstance(output, PackedSequence):
        return tuple(_shape_only(o) for o in output)
    return output


@dataclass
class ModelMapping:
    """Every GEMM layer's tiles under one spec, with totals and notes (layers smaller than a tile, weights not
    mapped)."""

    spec: CrossbarSpec
    layers: list[LayerMapping] = field(default_factory=list)
    unmapped: dict[str, int] = field(default_factory=dict)  # "layer.param" -> weights no crossbar computes

    def total(self, kind: str) -> int:
        """Sum of ``dense``, ``masked`` or ``compact`` tiles over the layers."""
        return sum(getattr(layer, kind) for layer in self.layers)

    @property
    def notes(self) -> list[str]:
        notes = [layer.note for layer in self.layers if layer.note]
        if self.unmapped:
            named = ", ".join(f"'{name}' ({count:,} weights)" for name, count in self.unmapped.items())
            notes.append(
                f"not mapped onto crossbar tiles (no Linear, Conv or recurrent layer computes them), so every tile, "
                f"area, power and energy figure leaves them out: {named}"
            )
        return notes


def gemm_blocks(
    model: nn.Module, example: torch.Tensor | None, dense: bool = False
) -> Iterator[tuple[GemmWeight, torch.Tensor, int]]:
    """``(weight, its (groups, outputs, inputs) blocks, passes per sample)`` of every mapped weight; ``dense``: the
    blocks' ones (the unpruned mapping). Blocks, not :meth:`GemmWeight.matrix`: a depthwise conv's block-diagonal
    layout is ``groups`` times its weights."""
    positions = output_positions(model, example)
    for gemm in gemm_weights(model):
        blocks = gemm.blocks()
        yield gemm, (torch.ones_like(blocks) if dense else blocks), positions[gemm.layer]


def map_model(
    model: nn.Module, spec: CrossbarSpec, example: torch.Tensor | None = None, dense: bool = False
) -> ModelMapping:
    """Map every Linear/Conv/recurrent weight matrix of ``model``; ``dense=True`` maps as if nothing were pruned.

    Raises ``ValueError`` if the model has no layer a crossbar computes.
    """
    mapping = ModelMapping(spec, unmapped=unmapped_weights(model))
    for gemm, blocks, positions in gemm_blocks(model, example, dense):
        mapping.layers.append(map_blocks(gemm.name, blocks, spec, positions))
    if not mapping.layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear, Conv or recurrent layer to map onto crossbar tiles; "
            "the crossbar model maps GEMM layers only (give a model with Linear/Conv/GRU/LSTM layers)"
        )
    return mapping


__all__ = [
    "MAX_ADC_BITS", "MAX_TILE", "RESERVED_COLUMNS", "SIGNED", "CrossbarSpec", "GemmWeight", "LayerMapping",
    "ModelMapping", "block_diagonal", "block_tile_counts", "diagonal_blocks", "gemm_blocks", "gemm_layers",
    "gemm_weights", "group_row_sums", "group_tile_sums", "line_tiles", "map_blocks", "map_matrix", "map_model",
    "TileLayout", "output_positions", "passes", "tile_grid", "unmapped_weights",
]
