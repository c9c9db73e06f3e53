"""Device non-idealities of a crossbar mapping: log-normal conductance variation and stuck-at faults, per cell.

Every weight is first written into cells as :class:`~admmcompress.hardware.crossbar.CrossbarSpec` says: its
magnitude code ``c = |w| / q`` (an integer up to ``2^magnitude_bits - 1``; ``q`` is the layer's weight per
conductance step) is split into ``slices`` digits of ``bits_per_cell`` bits, and digit ``d`` is the conductance
``G = G_min + d * dG`` with ``dG = (G_max - G_min) / (2^bits_per_cell - 1)``. A differential pair puts the digits
in the ``G+`` cells of a positive weight (its ``G-`` cells stay at ``G_min``) and vice versa; the offset scheme
stores ``c + 2^(weight_bits-1)`` in one set of cells and subtracts an ideal reference column.

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

from admmcompress.hardware.crossbar import CrossbarSpec, gemm_layers, tile_grid
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


@dataclass
class CellMapping:
    """One weight matrix written into cells: scale ``q``, per-slice digits, and which weights exist."""

    spec: CrossbarSpec
    shape: torch.Size
    q: float
    positive: torch.Tensor  # (slices, *matrix) digits of G+ (differential) or of the only cell set (offset)
    negative: torch.Tensor | None  # digits of G- (differential only)
    exists: torch.Tensor  # bool matrix: the weight's cells are on an instantiated tile
    dtype: torch.dtype = torch.float64  # of the conductances drawn (training uses float32: half the time)

    @classmethod
    def of(
        cls, weight: torch.Tensor, spec: CrossbarSpec, exact_grid: bool = True, dtype: torch.dtype = torch.float64
    ) -> CellMapping:
        """Write ``weight`` into cells; ``exact_grid`` looks for the grid quantized weights lie on."""
        matrix = as_matrix(weight.detach()).to(torch.float64)
        base = 2**spec.bits_per_cell
        nonzero = matrix != 0
        exists = nonzero.any(dim=1, keepdim=True) & nonzero.any(dim=0, keepdim=True)
        grid = tile_grid(matrix, spec.outputs_per_tile, spec.inputs_per_tile)
        exists &= grid.repeat_interleave(spec.outputs_per_tile, 0).repeat_interleave(spec.inputs_per_tile, 1)[
            : matrix.shape[0], : matrix.shape[1]
        ]
        if spec.signed == "differential":
            n_max = 2**spec.magnitude_bits - 1
        else:
            n_max = 2 ** (spec.weight_bits - 1) - 1
        n_max = max(1, n_max)
        magnitudes = matrix.abs()
        q = _grid_scale(magnitudes[nonzero], n_max, exact_grid) if bool(nonzero.any()) else 1.0
        codes = torch.clamp(torch.round(magnitudes / q), 0, n_max).to(torch.int64)
        if spec.signed == "differential":
            pos = torch.where(matrix > 0, codes, 0)
            neg = torch.where(matrix < 0, codes, 0)
            return cls(
                spec, weight.shape, q, _digits(pos, base, spec.slices), _digits(neg, base, spec.slices), exists, dtype
            )
        stored = torch.where(matrix < 0, -codes, codes) + 2 ** (spec.weight_bits - 1)
        return cls(spec, weight.shape, q, _digits(stored, base, spec.slices), None, exists, dtype)

    def read(self, noise: DeviceNoise, generator: torch.Generator | None = None) -> torch.Tensor:
        """The weight tensor read back after one draw of ``noise`` (``dtype``, the weight's shape)."""
        spec = self.spec
        step = (spec.g_max - spec.g_min) / (2**spec.bits_per_cell - 1)
        place = (2.0 ** (spec.bits_per_cell * torch.arange(spec.slices, dtype=self.dtype))).view(-1, 1, 1)

        def level(digits: torch.Tensor) -> torch.Tensor:
            g = spec.g_min + digits.to(self.dtype) * step
            g = perturb_conductance(g, noise, spec.g_min, spec.g_max, generator)
            return ((g - spec.g_min) / step * place.to(g.device)).sum(0)

        if self.negative is not None:
            codes = level(self.positive) - level(self.negative)
        else:
            codes = level(self.positive) - 2 ** (spec.weight_bits - 1)
        return (self.q * codes * self.exists).reshape(self.shape)


def _digits(codes: torch.Tensor, base: int, slices: int) -> torch.Tensor:
    return torch.stack([(codes // base**s) % base for s in range(slices)])


def _layers(model: nn.Module, layers: list[str] | None) -> list[tuple[str, nn.Module]]:
    found = list(gemm_layers(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer whose cells could vary")
    if layers is None:
        return found
    by_name = dict(found)
    missing = [name for name in layers if name not in by_name]
    if missing:
        raise ValueError(f"device noise: no Linear/Conv layer named {missing}; choose among {sorted(by_name)}")
    return [(name, by_name[name]) for name in layers]


@contextlib.contextmanager
def device_noise(
    model: nn.Module, spec: CrossbarSpec, noise: DeviceNoise, seed: int = 0, layers: list[str] | None = None
) -> Iterator[nn.Module]:
    """Inside the block the Linear/Conv weights are one seeded draw of the mapped, noisy device; restored after."""
    generator = torch.Generator().manual_seed(seed)
    saved = []
    try:
        with torch.no_grad():
            for _, module in _layers(model, layers):
                weight = module.weight
                saved.append((weight, weight.detach().clone()))
                read = CellMapping.of(weight, spec).read(noise, generator)
                weight.copy_(read.to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for weight, original in saved:
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
    """Variation-aware training: every forward pass of each Linear/Conv layer sees a fresh noisy read of
    its weight; gradients flow to the clean weight as if the noise were added (``w + (noisy - w).detach()``).

    The weight stays the same ``nn.Parameter`` (state dicts, optimizers and masks are untouched): a
    forward-pre-hook swaps the noisy tensor in for the call and a forward hook swaps the parameter back.
    """

    def __init__(
        self, spec: CrossbarSpec, noise: DeviceNoise, seed: int = 0, layers: list[str] | None = None
    ) -> None:
        self.spec, self.noise, self.layers = spec, noise, layers
        self.generator = torch.Generator().manual_seed(seed)
        self._handles: list[Any] = []
        self._saved: dict[int, nn.Parameter] = {}

    def install(self, model: nn.Module) -> NoiseInjector:
        if self._handles:
            raise RuntimeError("NoiseInjector is already installed; call remove() first")
        for _, module in _layers(model, self.layers):
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
        weight = module._parameters["weight"]
        with torch.no_grad():
            noisy = CellMapping.of(weight, self.spec, exact_grid=False, dtype=torch.float32).read(
                self.noise, self.generator
            )
        self._saved[id(module)] = weight
        module._parameters["weight"] = weight + (noisy.to(weight.dtype) - weight.detach())

    def _swap_out(self, module: nn.Module, args: Any, output: Any) -> None:
        weight = self._saved.pop(id(module), None)
        if weight is not None:
            module._parameters["weight"] = weight

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


__all__ = ["CellMapping", "DeviceNoise", "MonteCarlo", "NoiseInjector", "device_noise", "monte_carlo",
           "perturb_conductance"]
