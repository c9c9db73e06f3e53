"""Tucker-2 ranks chosen by measured latency (SPEC 11, TDC), or by FLOPs for comparison.

1. :func:`layer_shapes` records each conv's input size on an example batch.
2. :func:`latency_table` times, per layer, the dense conv and the three-conv Tucker-2 block at every candidate
   rank pair (random weights: the time depends on shapes only), interleaved through
   :func:`admmcompress.timing.time_interleaved` and cached per machine and shape in a
   :class:`~admmcompress.timing.LatencyCache`, so each shape is timed once per machine.
3. :func:`choose_ranks` picks one candidate per layer with the least total reconstruction loss
   (:func:`reconstruction_losses`, ``||W - HOSVD_r(W)||^2 / ||W||^2``) whose summed cost meets the budget: an
   exact multiple-choice knapsack over costs rounded *up* to ``quantum``, so the budget always holds. Given the
   same table it always returns the same ranks. With a FLOP table (:func:`flop_table`) the same call gives the
   FLOP-driven choice.

``None`` as a layer's choice keeps the dense conv.

>>> table = {"a": {None: 4.0, (2, 2): 1.0, (4, 4): 3.0}, "b": {None: 2.0, (1, 1): 0.5}}
>>> losses = {"a": {None: 0.0, (2, 2): 0.3, (4, 4): 0.1}, "b": {None: 0.0, (1, 1): 0.1}}
>>> choose_ranks(table, losses, budget=4.0)
{'a': (4, 4), 'b': (1, 1)}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from admmcompress.executors.tucker import Tucker2Conv
from admmcompress.structures.lowrank import tucker2_weight
from admmcompress.timing import LatencyCache, time_interleaved

Ranks = tuple[int, int] | None  # None: the dense conv
FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0)


@dataclass(frozen=True)
class LayerShape:
    """What a conv's latency depends on: its geometry and the input it sees (batch, H, W)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str  # "same" kept as the conv says it ("valid" is (0, 0))
    dilation: tuple[int, int]
    bias: bool
    height: int
    width: int
    padding_mode: str = "zeros"  # reflect/circular padding costs differently and must not share a cache entry

    @classmethod
    def of(cls, conv: nn.Conv2d, height: int, width: int) -> LayerShape:
        padding = conv.padding
        padding = (0, 0) if padding == "valid" else padding if isinstance(padding, str) else tuple(padding)
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   padding, tuple(conv.dilation), conv.bias is not None, height, width, conv.padding_mode)

    def conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias, padding_mode=self.padding_mode)

    def out_hw(self) -> tuple[int, int]:
        if self.padding == "same":  # torch allows it at stride 1 only: the input size
            return self.height, self.width

        def size(n: int, i: int) -> int:
            k = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            return (n + 2 * self.padding[i] - k) // self.stride[i] + 1

        return size(self.height, 0), size(self.width, 1)

    def key(self, ranks: Ranks, batch: int) -> str:
        """The cache key of one timing (shape, candidate, batch)."""
        geometry = (f"{self.in_channels}x{self.out_channels} k{self.kernel_size} s{self.stride} p{self.padding} "
                    f"d{self.dilation} b{int(self.bias)} in{self.height}x{self.width}")
        if self.padding_mode != "zeros":  # zero-padded keys stay as cached before this field existed
            geometry += f" {self.padding_mode}"
        return f"{geometry} | {'dense' if ranks is None else f'tucker{ranks[0]}x{ranks[1]}'} | batch {batch}"

    def macs(self, ranks: Ranks) -> int:
        """Multiply-accumulates of one sample: the dense conv, or 1x1 + core + 1x1 of the Tucker block."""
        hw_in, hw_out = self.height * self.width, math.prod(self.out_hw())
        kernel = math.prod(self.kernel_size)
        if ranks is None:
            return hw_out * self.out_channels * self.in_channels * kernel
        r_o, r_i = ranks
        return hw_in * self.in_channels * r_i + hw_out * (r_i * r_o * kernel + r_o * self.out_channels)


def layer_shapes(model: nn.Module, example: torch.Tensor, layers: Iterable[str]) -> dict[str, LayerShape]:
    """Each named conv's :class:`LayerShape`, from one forward pass on ``example`` (eval mode, no grad)."""
    modules = dict(model.named_modules())
    shapes: dict[str, LayerShape] = {}
    handles = []
    for name in layers:
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ValueError(f"rank search: layer '{name}' is not an ungrouped Conv2d; name such layers only")

        def hook(module, inputs, _output, name=name):
            shapes[name] = LayerShape.of(module, inputs[0].shape[-2], inputs[0].shape[-1])

        handles.append(conv.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for handle in handles:
            handle.remove()
    return shapes


def candidates(shape: LayerShape, fractions: Sequence[float] = FRACTIONS) -> list[Ranks]:
    """The dense conv and ``(ceil(f O), ceil(f I))`` for each fraction ``f`` (duplicates dropped, order kept)."""
    out: list[Ranks] = [None]
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"rank search: fraction {f!r} must be in (0, 1]")
        pair = (max(1, math.ceil(f * shape.out_channels)), max(1, math.ceil(f * shape.in_channels)))
        if pair not in out:
            out.append(pair)
    return out


def _block(shape: LayerShape, ranks: Ranks, device: str) -> nn.Module:
    conv = shape.conv()
    module = conv if ranks is None else Tucker2Conv(conv, ranks)
    return module.to(device).eval()


def _timed_call(block: nn.Module, x: torch.Tensor, device: str):
    """A zero-argument call of ``block(x)`` that waits for the device (CUDA runs asynchronously)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def call() -> None:
        block(x)
        sync()

    return call


def latency_table(
    shapes: Mapping[str, LayerShape],
    batch: int = 1,
    fractions: Sequence[float] = FRACTIONS,
    cache: LatencyCache | None = None,
    rounds: int = 9,
    device: str = "cpu",
) -> dict[str, dict[Ranks, float]]:
    """Measured milliseconds of every candidate of every layer (cached; only missing entries are timed)."""
    cache = cache if cache is not None else LatencyCache("tucker2", device=device)
    table: dict[str, dict[Ranks, float]] = {}
    for name, shape in shapes.items():
        options = candidates(shape, fractions)
        missing = [r for r in options if cache.get(shape.key(r, batch)) is None]
        if missing:
            x = torch.randn(batch, shape.in_channels, shape.height, shape.width, device=device)
            calls = {shape.key(r, batch): _timed_call(_block(shape, r, device), x, device) for r in missing}
            times = time_interleaved(calls, rounds)
            for key, ms in times.items():
                cache.put(key, ms)
        table[name] = {r: cache.get(shape.key(r, batch)) for r in options}
    return table


def flop_table(
    shapes: Mapping[str, LayerShape], fractions: Sequence[float] = FRACTIONS
) -> dict[str, dict[Ranks, float]]:
    """Per layer and candidate, multiply-accumulates of one sample (the FLOP-driven cost)."""
    return {name: {r: float(shape.macs(r)) for r in candidates(shape, fractions)} for name, shape in shapes.items()}


@torch.no_grad()
def reconstruction_losses(
    model: nn.Module, table: Mapping[str, Mapping[Ranks, float]]
) -> dict[str, dict[Ranks, float]]:
    """``||W - HOSVD_r(W)||^2 / ||W||^2`` of each layer's weight at each candidate of ``table`` (dense: 0)."""
    modules = dict(model.named_modules())
    out: dict[str, dict[Ranks, float]] = {}
    for name, options in table.items():
        weight = modules[name].weight.detach().double()
        norm = float(weight.pow(2).sum()) or 1.0
        # The truncated HOSVD at ranks (r_o, r_i) projects modes 0 and 1 onto the leading r_o / r_i left singular
        # vectors of their unfoldings: one SVD per mode serves every candidate (tucker2_factors, which goes
        # through TensorLy, would redo both per candidate).
        u_out = torch.linalg.svd(weight.reshape(weight.shape[0], -1), full_matrices=False)[0]
        u_in = torch.linalg.svd(weight.transpose(0, 1).reshape(weight.shape[1], -1), full_matrices=False)[0]
        out[name] = {}
        for ranks in options:
            if ranks is None:
                out[name][ranks] = 0.0
                continue
            r_o, r_i = ranks
            if not (1 <= r_o <= weight.shape[0] and 1 <= r_i <= weight.shape[1]):
                raise ValueError(
                    f"layer '{name}': Tucker2 ranks {ranks} must be within 1..({weight.shape[0]}, {weight.shape[1]}) "
                    f"for its weight of shape {tuple(weight.shape)}"
                )
            # A mode's unfolding may have fewer singular vectors than the rank (an expanding 1x1 conv): the
            # projection onto all of them is already exact there.
            p_out, p_in = u_out[:, :min(r_o, u_out.shape[1])], u_in[:, :min(r_i, u_in.shape[1])]
            core = torch.einsum("oi...,oa,ib->ab...", weight, p_out, p_in)
            approx = tucker2_weight(core, p_out, p_in)
            out[name][ranks] = float((weight - approx).pow(2).sum()) / norm
    return out


def choose_ranks(
    costs: Mapping[str, Mapping[Ranks, float]],
    losses: Mapping[str, Mapping[Ranks, float]],
    budget: float,
    quantum: float | None = None,
) -> dict[str, Ranks]:
    """One candidate per layer: least summed loss with summed cost <= ``budget`` (exact on rounded-up costs).

    ``quantum`` is the cost resolution (default ``budget / 2000``); costs are rounded up to it, so the
    chosen set's true cost never exceeds the budget. Ties go to the candidate listed first (deterministic).
    """
    if not costs:
        raise ValueError("choose_ranks: no layers to choose for")
    if not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"choose_ranks: budget={budget!r} must be a finite number > 0 (same unit as the cost "
                         "table); to keep every layer dense, do not search")
    quantum = quantum or budget / 2000
    slots = int(math.floor(budget / quantum + 1e-9))
    names = list(costs)
    for name in names:
        if not costs[name]:
            raise ValueError(f"choose_ranks: layer '{name}' has no candidate; give it at least the dense conv (None)")
        if set(costs[name]) - set(losses.get(name, {})):
            raise ValueError(f"choose_ranks: layer '{name}' has candidates without a loss; give losses for all")
    cheapest = sum(min(math.ceil(c / quantum - 1e-9) for c in costs[n].values()) for n in names)
    if cheapest > slots:
        least = sum(min(costs[n].values()) for n in names)
        raise ValueError(
            f"choose_ranks: budget {budget:g} is below the cheapest choice ({least:g}); raise the budget or add "
            "smaller candidate ranks"
        )
    inf = math.inf
    best = [0.0] + [inf] * slots  # best[c]: least loss of the layers so far at total rounded cost c
    picks: list[list[Ranks | None]] = []
    for name in names:
        new, pick = [inf] * (slots + 1), [None] * (slots + 1)
        for ranks, cost in costs[name].items():
            units, loss = math.ceil(cost / quantum - 1e-9), losses[name][ranks]
            for c in range(units, slots + 1):
                value = best[c - units] + loss
                if value < new[c]:
                    new[c], pick[c] = value, (ranks, c - units)
        best = new
        picks.append(pick)
    end = min(range(slots + 1), key=lambda c: (best[c], c))
    chosen: dict[str, Ranks] = {}
    for name, pick in zip(reversed(names), reversed(picks), strict=True):
        ranks, end = pick[end]
        chosen[name] = ranks
    return {name: chosen[name] for name in names}


def total(costs: Mapping[str, Mapping[Ranks, float]], chosen: Mapping[str, Ranks]) -> float:
    """The summed cost of a choice."""
    return sum(costs[name][ranks] for name, ranks in chosen.items())


__all__ = [
    "FRACTIONS",
    "LayerShape",
    "candidates",
    "choose_ranks",
    "flop_table",
    "latency_table",
    "layer_shapes",
    "reconstruction_losses",
    "total",
]
