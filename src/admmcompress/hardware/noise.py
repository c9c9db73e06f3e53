"""Device non-idealities of a crossbar mapping: log-normal conductance variation and stuck-at faults, per cell.

Every weight is first written into cells as :class:`~admmcompress.hardware.crossbar.CrossbarSpec` says: its
magnitude code ``c = |w| / q`` (an integer up to ``max_code = 2^(weight_bits-1) - 1``; ``q`` is the layer's weight per
conductance step) is split into ``slices`` digits of ``bits_per_cell`` bits, and digit ``d`` is the conductance
``G = G_min + d * dG`` with ``dG = (G_max - G_min) / (2^bits_per_cell - 1)``. A differential pair puts the digits
in the ``G+`` cells of a positive weight (its ``G-`` cells stay at ``G_min``) and vice versa; the offset scheme
stores the signed code plus ``2^(weight_bits-1)`` in one set of cells and subtracts an ideal reference column.
Every weight matrix the crossbar mapping covers varies (:func:`~admmcompress.hardware.crossbar.gemm_weights`:
Linear, Conv, ConvTranspose, recurrent), in its layout (a grouped conv's blocks on the diagonal).

The device then changes each cell independently:

- variation: ``G' = G * exp(sigma * z)``, ``z ~ N(0, 1)`` (log-normal, median-preserving: ``ln(G'/G)`` has mean 0
  and standard deviation ``sigma``, so ``E[G'/G] = exp(sigma^2 / 2)``);
- stuck-at faults: with probability ``stuck_off`` a cell reads ``G_min``, with ``stuck_on`` it reads ``G_max``.

The weight read back is ``q * sum_s 2^(bits_per_cell*s) (G+'_s - G-'_s) / dG`` (differential), exactly ``w``
when there is no noise and ``w`` lies on the grid. Cells of removed outputs/inputs and of tiles that are not
instantiated (all weights pruned) do not exist and read 0; pruned weights inside an instantiated tile keep
their off-state cells, which vary too.

In evaluation :func:`device_noise` writes one seeded draw into the weights and restores them on exit;
:func:`monte_carlo` repeats that for ``N`` seeds and reports mean and sd. In training,
:class:`NoiseInjector` draws fresh noise at every forward pass through a forward-pre-hook (the gradient is
taken at the noisy weights and applied to the clean ones: variation-aware training), removed by ``remove()``.

>>> from admmcompress.hardware.crossbar import CrossbarSpec
>>> model = torch.nn.Linear(4, 2, bias=False)
>>> with torch.no_grad(): _ = model.weight.copy_(torch.tensor([[0.5, -0.75, 0.0, 0.25], [0.75, 0.25, -0.5, 0.0]]))
>>> spec = CrossbarSpec(bits_per_cell=1, weight_bits=3)                          # 2 slices of 1 bit per polarity
>>> with device_noise(model, spec, DeviceNoise()):                               # no noise: exact on the grid
...     print(model.weight)
Parameter containing:
tensor([[ 0.5000, -0.7500,  0.0000,  0.2500],
        [ 0.7500,  0.2500, -0.5000,  0.0000]], requires_grad=True)
>>> clean = model.weight.detach().clone()
>>> with device_noise(model, spec, DeviceNoise(sigma=0.1), seed=0):
...     changed = not torch.equal(model.weight.detach(), clean)
>>> changed, model.weight[0, 0].item()                                           # restored on exit
(True, 0.5)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from admmcompress.hardware.crossbar import (
    CrossbarSpec,
    GemmWeight,
    gemm_weights,
    group_tile_sums,
    line_tiles,
)
from admmcompress.structures.groups import as_matrix

MAX_SIGMA = 3.0  # exp(3 z) spans five orders of magnitude: beyond any device model


@dataclass(frozen=True)
class DeviceNoise:
    """Per-cell non-idealities: log-normal ``sigma`` of ``ln G``, stuck-at-on/off probabilities."""

    sigma: float = 0.0
    stuck_on: float = 0.0
    stuck_off: float = 0.0

    def __post_init__(self) -> None:
        for key in ("sigma", "stuck_on", "stuck_off"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"device noise: {key}={value!r} must be a finite number >= 0, e.g. 0.1")
        if self.sigma > MAX_SIGMA:
            raise ValueError(
                f"device noise: sigma={self.sigma!r} is above {MAX_SIGMA}; it is the standard deviation of ln G "
                "(0.1 = about 10% variation)"
            )
        if self.stuck_on + self.stuck_off > 1:
            raise ValueError(
                f"device noise: stuck_on + stuck_off = {self.stuck_on + self.stuck_off} is above 1; "
                "they are per-cell probabilities"
            )

    @property
    def is_ideal(self) -> bool:
        return self.sigma == 0 and self.stuck_on == 0 and self.stuck_off == 0


def perturb_conductance(
    g: torch.Tensor, noise: DeviceNoise, g_min: float, g_max: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw of the device model applied to conductances ``g`` (a new tensor)."""
    out = g
    if noise.sigma > 0:
        # Drawn on the generator's device (the CPU) and moved: a CPU generator cannot draw CUDA tensors.
        z = torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device)
        out = g * torch.exp(noise.sigma * z)
    if noise.stuck_on > 0 or noise.stuck_off > 0:
        u = torch.rand(g.shape, generator=generator, dtype=g.dtype).to(g.device)
        out = torch.where(u < noise.stuck_off, torch.full_like(out, g_min), out)
        stuck_on = (u >= noise.stuck_off) & (u < noise.stuck_off + noise.stuck_on)
        out = torch.where(stuck_on, torch.full_like(out, g_max), out)
    return out


def _grid_scale(magnitudes: torch.Tensor, n_max: int, exact_grid: bool) -> float:
    """The weight per conductance step ``q``: the coarsest ``max|w| / k`` (k <= n_max) that puts every
    magnitude on an integer code (weights already on a level grid map exactly), else ``max|w| / n_max``."""
    top = float(magnitudes.max())
    values = torch.unique(magnitudes).to(torch.float64) if exact_grid else magnitudes[:0]
    if exact_grid and values.numel() <= n_max:  # more distinct magnitudes than codes: no grid can hold them
        for k in range(1, n_max + 1):
            codes = values * k / top
            # float32 rounding of s * c, in code units: a fixed fraction, so a fine grid never admits any weights
            if bool(torch.all((codes - torch.round(codes)).abs() <= min(1e-6 * k, 0.01))):
                return top / k
    return top / n_max


def cells_exist(nonzero: torch.Tensor, spec: CrossbarSpec) -> torch.Tensor:
    """Bool ``(groups, outputs, inputs)``: which weights of the blocks ``nonzero`` have cells, in the
    block-diagonal layout: not on a removed output or input, and on a tile that holds a nonzero weight.

    Worked out per group on the tiles it spans, never on the layout (``groups`` times the weights).

    >>> spec = CrossbarSpec(rows=4, cols=4, bits_per_cell=2, weight_bits=3)   # 2 outputs x 4 inputs a tile
    >>> nonzero = torch.tensor([[[True, False, True]], [[False, True, False]]])  # 2 x 6 layout, 1 x 2 tiles
    >>> cells_exist(nonzero, spec).int().tolist()            # group 0's input 1 is removed (no weight on it)
    [[[1, 0, 1]], [[0, 1, 0]]]
    """
    groups, outputs, inputs = nonzero.shape
    kept = nonzero.any(dim=2, keepdim=True) & nonzero.any(dim=1, keepdim=True)
    if not bool(nonzero.any()):
        return kept
    on = torch.ones(1, 1, dtype=torch.bool)  # every line: tiles of the layout as written, before compaction
    row_tiles = line_tiles(on.expand(groups, outputs), spec.outputs_per_tile)
    col_tiles = line_tiles(on.expand(groups, inputs), spec.inputs_per_tile)
    row_local, col_local = row_tiles - row_tiles[:, :1], col_tiles - col_tiles[:, :1]
    held = group_tile_sums(nonzero, row_tiles, col_tiles) > 0  # (groups, n_rows, n_cols): each group's own tiles
    n_rows, n_cols = held.shape[1:]
    # a tile shared by groups is instantiated when any of them holds a weight on it: merged by the tile's index
    # (width leaves room for the local tiles past a group's last one, so no two tiles share an index)
    width = int(col_tiles.max()) + n_cols
    tile_row = row_tiles[:, :1].view(groups, 1, 1) + torch.arange(n_rows).view(1, n_rows, 1)
    tile_col = col_tiles[:, :1].view(groups, 1, 1) + torch.arange(n_cols).view(1, 1, n_cols)
    tile = tile_row * width + tile_col
    instantiated = torch.isin(tile, tile[held])
    # back onto the weights: each input's tile column, then each output's tile row
    by_input = instantiated.gather(2, col_local.unsqueeze(1).expand(groups, n_rows, inputs))
    return kept & by_input.gather(1, row_local.unsqueeze(2).expand(groups, outputs, inputs))


@dataclass
class CellMapping:
    """One weight written into cells: scale ``q``, per-slice digits, and which weights exist, all on the
    ``(groups, outputs, inputs)`` GEMM blocks of the weight (one group unless it is a grouped conv)."""

    spec: CrossbarSpec
    shape: torch.Size
    q: float
    positive: torch.Tensor  # (slices, *blocks) digits of G+ (differential) or of the only cell set (offset)
    negative: torch.Tensor | None  # digits of G- (differential only)
    exists: torch.Tensor  # bool blocks: the weight's cells are on an instantiated tile
    dtype: torch.dtype = torch.float64  # of the conductances drawn (training uses float32: half the time)
    layout: GemmWeight | None = None  # how the weight splits into blocks; None: its GEMM view, one block

    @classmethod
    def of(
        cls, weight: torch.Tensor, spec: CrossbarSpec, exact_grid: bool = True, dtype: torch.dtype = torch.float64,
        layout: GemmWeight | None = None,
    ) -> CellMapping:
        """Write ``weight`` into cells; ``exact_grid`` looks for the grid quantized weights lie on; ``layout``:
        the mapped weight it is (a grouped or transposed conv's blocks), else its GEMM view is one block."""
        blocks = layout.blocks(weight) if layout is not None else as_matrix(weight.detach()).unsqueeze(0)
        blocks = blocks.to(torch.float64)
        base = 2**spec.bits_per_cell
        nonzero = blocks != 0
        exists = cells_exist(nonzero, spec)
        n_max = spec.max_code
        magnitudes = blocks.abs()
        # One q per weight tensor (every group): the layer's quantization grid is shared by its groups.
        q = _grid_scale(magnitudes[nonzero], n_max, exact_grid) if bool(nonzero.any()) else 1.0
        codes = torch.clamp(torch.round(magnitudes / q), 0, n_max).to(torch.int64)
        if spec.signed == "differential":
            pos = torch.where(blocks > 0, codes, 0)
            neg = torch.where(blocks < 0, codes, 0)
            return cls(
                spec, weight.shape, q, _digits(pos, base, spec.slices), _digits(neg, base, spec.slices), exists,
                dtype, layout,
            )
        stored = torch.where(blocks < 0, -codes, codes) + spec.offset_code
        return cls(spec, weight.shape, q, _digits(stored, base, spec.slices), None, exists, dtype, layout)

    def read(self, noise: DeviceNoise, generator: torch.Generator | None = None) -> torch.Tensor:
        """The weight tensor read back after one draw of ``noise`` (``dtype``, the weight's shape)."""
        spec = self.spec
        step = (spec.g_max - spec.g_min) / (2**spec.bits_per_cell - 1)
        place = (2.0 ** (spec.bits_per_cell * torch.arange(spec.slices, dtype=self.dtype)))
        place = place.view(-1, *[1] * self.exists.dim())

        def level(digits: torch.Tensor) -> torch.Tensor:
            g = spec.g_min + digits.to(self.dtype) * step
            g = perturb_conductance(g, noise, spec.g_min, spec.g_max, generator)
            return ((g - spec.g_min) / step * place.to(g.device)).sum(0)

        if self.negative is not None:
            codes = level(self.positive) - level(self.negative)
        else:
            codes = level(self.positive) - spec.offset_code
        blocks = self.q * codes * self.exists
        return self.layout.weight_of(blocks) if self.layout is not None else blocks.reshape(self.shape)


def _digits(codes: torch.Tensor, base: int, slices: int) -> torch.Tensor:
    return torch.stack([(codes // base**s) % base for s in range(slices)])


def _layers(model: nn.Module, layers: list[str] | None) -> list[GemmWeight]:
    """The mapped weights to vary: all, or those ``layers`` names (a layer name takes all its matrices)."""
    found = gemm_weights(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no Linear, Conv or recurrent layer whose cells could vary")
    if layers is None:
        return found
    names = {gemm.name for gemm in found} | {gemm.layer for gemm in found}
    missing = [name for name in layers if name not in names]
    if missing:
        raise ValueError(f"device noise: no mapped layer named {missing}; choose among {sorted(names)}")
    return [gemm for gemm in found if gemm.name in layers or gemm.layer in layers]


@contextlib.contextmanager
def device_noise(
    model: nn.Module, spec: CrossbarSpec, noise: DeviceNoise, seed: int = 0, layers: list[str] | None = None
) -> Iterator[nn.Module]:
    """Inside the block the mapped weights are one seeded draw of the noisy device; restored after."""
    generator = torch.Generator().manual_seed(seed)
    saved = []
    try:
        with torch.no_grad():
            seen: set[int] = set()
            for gemm in _layers(model, layers):
                weight = gemm.weight
                if id(weight) in seen:  # a tied weight is one set of cells: drawn once (twice, the restore wrote
                    continue  # the first draw back and the noise stayed in the model, a review's finding)
                seen.add(id(weight))
                saved.append((weight, weight.detach().clone()))
                read = CellMapping.of(weight, spec, layout=gemm).read(noise, generator)
                weight.copy_(read.to(weight.dtype))  # in place: a recurrent layer's flat weights see it too
        yield model
    finally:
        with torch.no_grad():
            for weight, original in reversed(saved):
                weight.copy_(original)


@dataclass(frozen=True)
class MonteCarlo:
    """Accuracy (or any figure) over seeded draws: mean, sample standard deviation and every value."""

    mean: float
    sd: float
    values: tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.mean:.2f} +- {self.sd:.2f} (N={len(self.values)})"


def monte_carlo(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    spec: CrossbarSpec,
    noise: DeviceNoise,
    draws: int = 5,
    seed: int = 0,
) -> MonteCarlo:
    """``evaluate(model)`` under ``draws`` seeded noise draws (seeds ``seed .. seed+draws-1``)."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"monte_carlo: draws={draws!r} must be a positive integer, e.g. 5")
    values = []
    for i in range(draws):
        with device_noise(model, spec, noise, seed + i):
            values.append(float(evaluate(model)))
    t = torch.tensor(values, dtype=torch.float64)
    sd = float(t.std()) if draws > 1 else 0.0
    return MonteCarlo(float(t.mean()), sd, tuple(values))


class NoiseInjector:
    """Variation-aware training: every forward pass of each mapped layer (Linear, Conv, ConvTranspose,
    recurrent) sees a fresh noisy read of its weight matrices; gradients flow to the clean weights as if the
    noise were added (``w + (noisy - w).detach()``).

    The weights stay the same ``nn.Parameter`` objects (state dicts, optimizers and masks are untouched): a
    forward-pre-hook swaps the noisy tensors in for the call and a forward hook swaps the parameters back.
    """

    def __init__(
        self, spec: CrossbarSpec, noise: DeviceNoise, seed: int = 0, layers: list[str] | None = None
    ) -> None:
        self.spec, self.noise, self.layers = spec, noise, layers
        self.generator = torch.Generator().manual_seed(seed)
        self._handles: list[Any] = []
        self._weights: dict[int, list[GemmWeight]] = {}
        self._saved: dict[int, dict[str, nn.Parameter]] = {}

    def install(self, model: nn.Module) -> NoiseInjector:
        if self._handles:
            raise RuntimeError("NoiseInjector is already installed; call remove() first")
        self._weights = {}
        for gemm in _layers(model, self.layers):
            self._weights.setdefault(id(gemm.module), []).append(gemm)
        for module in (weights[0].module for weights in self._weights.values()):
            self._handles.append(module.register_forward_pre_hook(self._swap_in))
            self._handles.append(module.register_forward_hook(self._swap_out, always_call=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _swap_in(self, module: nn.Module, args: Any) -> None:
        if not module.training:  # evaluation sees the clean weights; device_noise() is for noisy evaluation
            return
        saved = {}
        for gemm in self._weights[id(module)]:
            weight = module._parameters[gemm.param]
            with torch.no_grad():
                noisy = CellMapping.of(weight, self.spec, exact_grid=False, dtype=torch.float32, layout=gemm).read(
                    self.noise, self.generator
                )
            saved[gemm.param] = weight
            _set_weight(module, gemm.param, weight + (noisy.to(weight.dtype) - weight.detach()))
        self._saved[id(module)] = saved

    def _swap_out(self, module: nn.Module, args: Any, output: Any) -> None:
        for param, weight in self._saved.pop(id(module), {}).items():
            _set_weight(module, param, weight)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _set_weight(module: nn.Module, param: str, value: torch.Tensor) -> None:
    """Put ``value`` in for ``module.<param>`` without re-registering it; a recurrent layer's forward reads
    its ``_flat_weights`` list, not the attribute, so that entry is swapped too."""
    module._parameters[param] = value  # type: ignore[assignment]  # a non-leaf tensor for one call
    if isinstance(module, nn.RNNBase):
        module._flat_weights[module._flat_weights_names.index(param)] = value


__all__ = ["CellMapping", "cells_exist", "DeviceNoise", "MonteCarlo", "NoiseInjector", "device_noise", "monte_carlo",
           "perturb_conductance"]
