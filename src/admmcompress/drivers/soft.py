"""SS-Auto (SPEC 9): row + column group lasso by a primal-proximal split; per-layer rates emerge from one strength.

The driver solves ``min f(W) + lambda * sum_l (sum_rows w_r ||W_l[r,:]|| + sum_cols w_c ||W_l[:,c]||)`` with an
auxiliary copy ``Z`` and a scaled dual ``U`` per parameter:

(a) the optimizer trains ``W`` on ``loss + rho/2 ||W - Z + U||^2`` (:meth:`SoftThreshold.penalty`), so weights
    are only pulled toward ``Z``: important weights are not shrunk directly;
(b) ``step()``: ``Z = prox(W + U)``, the exact group soft-threshold ``Z_g = max(0, 1 - t_g / ||V_g||) V_g``
    with ``t_g = lambda * w_g / rho``, applied to every row target (filters; coupled channel groups) and then
    to every column target (columns / channels) -- the sequential prox SPEC 9 states for the overlapping sum;
(c) ``U += W - Z``.

Groups whose ``Z`` is exactly zero are pruned by ``finalize()``; which groups, and so every layer's rate,
follows from the one strength ``lambda``. ``w_g = sqrt(|g|)`` (the classic group-lasso weight); with
``weighting: cost`` also times the mean cost of one of the group's weights in the budget's unit relative to all
targeted weights (a MAC budget then makes a conv on a large feature map costlier to keep; on ResNet-20 it strips
the first stage to its bounds, so it is not the default).

With a ``budget`` (:class:`~admmcompress.drivers.budget.Budget`: parameters, MACs or measured latency) the
strength is adapted at every update: the smallest ``lambda`` whose ``Z`` meets the update's budget is found by
bisection (with coupled targets the cost is not monotone in ``lambda``: smaller strengths below the bisection's
are then tried down a geometric grid); the budget tightens from the model's cost when the stage begins (dense,
unless an earlier stage pruned it) to the target over the first ``ramp`` share of the updates (cubic, as gradual
pruning). Layers outside the targets are counted as they are: the zeros an earlier stage left count as removed.
If the last ``Z`` still misses the budget (a phase cut short), ``finalize()`` cuts further groups by the same
weighted soft threshold on ``W``; ``summary()`` reports how many groups the soft threshold zeroed and how many
the final cut removed (a budget met mostly by the cut is magnitude pruning in disguise). ``finalize()`` also
masks the producer rows of channels nobody reads, as the budget counts them and compaction removes them.

The plan says what may be pruned: a layer without a rule is excluded; a rule's ``sparsity`` is the most
its groups may lose (a bound: where the strength would zero more, the layer is thresholded at the largest
strength that keeps its bound, every kept group shrunk by it); ``pin: {glob: sparsity}``
fixes a layer's rate (its ``Z`` is the exact top-k projection, as in ADMM). Coupled targets
(``coupling: strict``) are row groups spanning every member, so the result compacts physically. ``heads``
targets are row groups too: one group per attention head (with grouped-query attention, per key/value head and
the query heads reading it) over its query, key and value rows and its output projection's columns, so a
transformer's head counts and FFN widths come out of the same threshold. Budgets count Linear/Conv layers
only: the attention products (``QK^T``, scores x ``V``) are not in a MAC budget.

Three lines in your own loop::

    soft = SoftThreshold(model, plan, SoftConfig(budget={"kind": "macs", "reduction": 4}), example=x[:2])
    for epoch in range(epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y) + soft.penalty()
            opt.zero_grad(); loss.backward(); opt.step()
        soft.step()                                   # Z = prox(W + U) at the adapted strength, U += W - Z
    masks = soft.finalize()                           # groups with Z == 0 pruned (budget met)

>>> import torch.nn as nn
>>> from admmcompress.plan import Plan, Rule
>>> from admmcompress.structures import Column, Filter
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> plan = Plan([Rule(Filter(sparsity=0.9), match="0"), Rule(Column(sparsity=0.9), match="2")])
>>> soft = SoftThreshold(model, plan, SoftConfig(budget={"kind": "params", "reduction": 2}), example=torch.zeros(1, 16))
>>> _ = soft.step()
>>> masks = soft.finalize()
>>> soft.final_cost <= soft.target_cost
True
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from admmcompress.drivers.admm import RhoSchedule
from admmcompress.drivers.base import Driver, DriverContext, register_driver
from admmcompress.drivers.budget import (
    Budget,
    BudgetError,
    LatencyTable,
    budget_shapes,
    check_costed,
    drop_unread_channels,
    entry_costs,
    kept_rows_cols,
    rows_per_group,
    structured_cost,
)
from admmcompress.drivers.schedule import carry
from admmcompress.finalize import MaskSet
from admmcompress.plan import Plan, PlanError, Target, resolve_targets
from admmcompress.plan.coupled import CoupledTarget
from admmcompress.structures.block import BlockFilter
from admmcompress.structures.groups import kept_count, top_groups
from admmcompress.structures.scalars import plain_number

ROW_KINDS = ("filter", "heads")  # heads: coupled rows of q/k/v and columns of the output projection
COLUMN_KINDS = ("column", "channel")
WEIGHTINGS = ("cost", "sqrt", "none")
_PRECISION = 1e-5  # the bisection stops when the strength is known to this relative precision
# Coupled targets make the cost bumpy in the strength (see _step_down): below the bisection's answer, strengths
# down by this factor are tried until this many in a row miss the budget (about 0.6x below the last that met it).
_STEP_DOWN = 0.97
_STEP_DOWN_MISSES = 16
FILL_TOLERANCE = 0.002  # finalize restores groups while the cost is more than this share below the budget
_FILL_TRIES = 400


def _number(value: Any, name: str, low: float, strict: bool) -> float:
    value = plain_number(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        hint = " (YAML read it as text: write it with a dot, e.g. 1.0e-3)" if isinstance(value, str) else ""
        raise ValueError(f"soft {name}={value!r} must be a finite number {bound}{hint}")
    return float(value)


@dataclass(frozen=True)
class SoftConfig:
    """Options of method ``soft`` (SS-Auto).

    Args:
        strength: lambda, the group-lasso strength, used as given when there is no budget.
        rho: weight of ``rho/2 ||W - Z + U||^2`` (the pull of W toward Z); the threshold is ``lambda w_g / rho``.
        rho_growth, rho_max: rho is multiplied by ``rho_growth`` after each update, up to ``rho_max`` (default
            ``max(1, rho)``), as ADMM's schedule (``RhoSchedule``). With plain SGD a
            constant small rho may pull W too weakly to reach Z within the phase (hard pruning then loses what
            W had); a growing rho closes that gap as it does for ADMM.
        rescale_dual: rescale U by ``rho_old / rho_new`` as rho grows (``RhoSchedule``; off by default, as ADMM).
        budget: ``{kind: params|macs|latency, value|fraction|reduction: ...}``; None: fixed strength.
        ramp: share of the phase's updates over which the budget tightens from dense to the target (0: at once).
        weighting: "sqrt" (sqrt(group size), classic group lasso; default), "cost" (that x the group's cost per
            weight relative to the mean: prunes the costliest layers first, far more aggressively) or "none".
        pin: ``{layer glob: sparsity}``: fixed rates (exact top-k projection) for the matching targets, each at
            most its rule's sparsity.

    >>> SoftConfig(budget={"kind": "macs", "reduction": 4}).budget
    {'kind': 'macs', 'reduction': 4.0}
    """

    strength: float = 1e-4
    rho: float = 1e-2
    rho_growth: float = 1.0
    rho_max: float | None = None
    rescale_dual: bool = False
    budget: dict[str, Any] | None = None
    ramp: float = 0.5
    weighting: str = "sqrt"
    pin: dict[str, float] = field(default_factory=dict)

    @property
    def schedule(self) -> RhoSchedule:
        """rho's schedule (ADMM's class: one place validates and steps it)."""
        return RhoSchedule(self.rho, self.rho_growth, self.rho_max, self.rescale_dual)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", _number(self.strength, "strength", 0.0, strict=False))
        object.__setattr__(self, "rho", _number(self.rho, "rho", 0.0, strict=True))
        schedule = self.schedule  # validates growth and cap
        object.__setattr__(self, "rho_growth", schedule.growth)
        object.__setattr__(self, "rho_max", schedule.maximum)
        ramp = _number(self.ramp, "ramp", 0.0, strict=False)
        if ramp > 1:
            raise ValueError(f"soft ramp={ramp!r} must be in [0, 1] (share of the updates)")
        object.__setattr__(self, "ramp", ramp)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"soft weighting={self.weighting!r}; choose one of {WEIGHTINGS}")
        if self.budget is not None:
            try:
                object.__setattr__(self, "budget", Budget.from_any(self.budget).to_dict())
            except BudgetError as err:
                raise ValueError(str(err)) from None
        if not isinstance(self.pin, dict):
            raise ValueError(f"soft pin={self.pin!r} must map layer globs to sparsities, e.g. {{conv1: 0.5}}")
        # YAML reads `pin: {0: 0.5}` (an nn.Sequential layer) with an int key; layer names are text
        object.__setattr__(self, "pin", {str(pattern): rate for pattern, rate in self.pin.items()})
        for pattern, rate in self.pin.items():
            rate = plain_number(rate)
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
                raise ValueError(f"soft pin {pattern!r}: sparsity={rate!r} must be in [0, 1)")


def _layers_of(t: Target) -> list[str]:
    """The layers whose rules made ``t`` (a coupled target: every source layer)."""
    if isinstance(t, CoupledTarget):
        return [key.rsplit(":", 1)[0].rsplit(".", 1)[0] for key in t.sources]
    return [t.layer]


@register_driver("soft", SoftConfig)
class SoftThreshold(Driver):
    """SS-Auto soft-constraint driver over a plan's filter/column/channel targets (see the module docstring).

    Args:
        model: the model being trained (start from a trained model: ``Z = W``, ``U = 0``).
        plan: a ``Plan`` or resolved targets (``Plan.resolve_coupled`` for coupled row groups).
        config: a ``SoftConfig``.
        example: one input batch, as the plan takes it (a tensor, a tuple of inputs or a dict of keyword inputs);
            needed for MAC and latency budgets (output positions per layer).
        frozen: masks from an earlier stage; merged into ``finalize()``.
        updates: how many ``step()`` calls the phase makes (the budget ramp's length).
        latency: a ready :class:`LatencyTable` (built, and cached per machine, when a latency budget needs one).
    """

    supports_coupling = True

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan | list[Target],
        config: SoftConfig | None = None,
        example: Any | None = None,
        frozen: MaskSet | None = None,
        updates: int = 1,
        latency: LatencyTable | None = None,
    ):
        self.model, self.config, self.frozen = model, config or SoftConfig(), frozen
        targets = resolve_targets(model, plan, type(self).__name__)
        self.accept_targets(targets)
        # Rows first, then columns: the order of the sequential prox (SPEC 9).
        self.targets = [t for t in targets if _is_row(t)] + [t for t in targets if not _is_row(t)]
        self.updates = max(1, int(updates))
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self._params = dict(model.named_parameters())
        self.names = list(dict.fromkeys(n for t in self.targets for n in t.param_names))
        self.pins = {t.key: self._pin(t) for t in self.targets}
        over = [f"{t.key} (pin {self.pins[t.key]:g} > {t.structure.target_sparsity:g})" for t in self.targets
                if self.pins[t.key] is not None and self.pins[t.key] > t.structure.target_sparsity + 1e-12]
        if over:
            raise PlanError(f"soft pin above its rule's sparsity, the most the layer may lose: {over[:4]}; lower the "
                            "pin or raise the rule's sparsity")
        layers = [layer for t in self.targets for layer in _layers_of(t)]
        unmatched = [p for p in self.config.pin if not any(fnmatch.fnmatchcase(layer, p) for layer in layers)]
        if unmatched:
            raise PlanError(f"soft pin {unmatched} matches no target layer; the targets' layers: {layers[:8]}"
                            + (" ..." if len(layers) > 8 else ""))
        if example is None:
            if self.config.budget is not None and self.config.budget["kind"] != "params":
                raise BudgetError(
                    f"a {self.config.budget['kind']} budget needs example= (one input batch) to count output positions"
                )
        self.shapes = budget_shapes(model, example, self.config.budget["kind"] if self.config.budget else "params")
        self._check_costed()
        self._refresh_outside()
        self.budget = Budget.from_any(self.config.budget) if self.config.budget is not None else None
        kind = self.budget.kind if self.budget is not None else "params"
        self.kind = kind
        self.latency = latency if latency is not None or kind != "latency" else LatencyTable(self.shapes)
        with torch.no_grad():
            w = {n: self._params[n].detach() for n in self.names}
            self._ids = {t.key: t.structure.group_ids(t.value(w)) for t in self.targets}
            self._index = self._flat_index()
            # a layer both writing and reading one coupled group's channels holds some entries twice
            self._unique = {t.key: torch.unique(self._index[t.key], return_inverse=True) for t in self.targets
                            if isinstance(t, CoupledTarget) and _repeats(self._index[t.key])}
            self._weights = self._group_weights(entry_costs(self.shapes, kind, self.latency))
            self.Z = {n: w[n].clone() for n in self.names}
            self.U = {n: torch.zeros_like(w[n]) for n in self.names}
        self.strength = self.config.strength
        self.rho = self.config.rho
        self.schedule = self.config.schedule
        self.dense_cost = structured_cost(self.shapes, {}, kind, self.latency)
        # the model as it comes (an earlier stage may have pruned it): where the budget ramp starts
        self.start_cost = self._cost(w)
        self.target_cost: float | None = None
        self.final_cost: float | None = None
        self.outcome: dict[str, Any] = {}
        if self.budget is not None:
            self.target_cost = self.budget.resolve(self.dense_cost)
            least = self._cost(self._prox(w, math.inf)[0])
            if least > self.target_cost * (1 + 1e-9):
                raise BudgetError(
                    f"budget {self.budget.to_dict()} = {self.target_cost:g} {kind} is below the least this plan allows "
                    f"({least:g} of {self.dense_cost:g}: layers without a rule (as earlier stages left them), pins, "
                    "bounds and one group kept per target); raise the budget or add/loosen rules"
                )
        self._refresh_anchors()

    @classmethod
    def preflight(cls, model: torch.nn.Module, targets: list, config: SoftConfig,
                  example: Any | None) -> None:
        """A params or MACs budget the plan cannot meet is refused before training (a latency budget is checked
        when its phase starts: its table is measured then)."""
        if config.budget is not None and config.budget["kind"] in ("params", "macs"):
            cls(model, targets, config, example=example)  # the constructor checks the budget against the model

    @classmethod
    def from_config(cls, model: torch.nn.Module, targets: list[Target], config: SoftConfig,
                    context: DriverContext) -> SoftThreshold:
        return cls(model, targets, config, example=context.example, frozen=context.frozen, updates=context.updates)

    @classmethod
    def check_targets(cls, targets: list) -> None:
        bad = [t.key for t in targets if t.structure.quantizes or t.structure.kind not in ROW_KINDS + COLUMN_KINDS]
        if bad:
            raise PlanError(
                f"method soft prunes rows and columns (structures filter, column, channel, heads); targets {bad} "
                "have other structures: give them to another stage"
            )
        blocked = [t.key for t in targets if isinstance(t.structure, BlockFilter)]
        if blocked:
            raise PlanError(
                f"method soft cannot keep equal channel counts per conv group (grouped convs) for {blocked}; "
                "prune those layers with method admm"
            )

    # --- setup ---------------------------------------------------------------------------
    def _check_costed(self) -> None:
        """Every pruned GEMM weight must have a cost, or pruning it would be free against the budget."""
        if self.config.budget is not None:
            check_costed(self.model, self.names, self.shapes, self.config.budget["kind"])

    @torch.no_grad()
    def _refresh_outside(self) -> None:
        """The pattern of every costed layer outside the targets that is not dense: the zeros an earlier stage
        left (its frozen masks, the weights it pruned) count as removed in every cost, not as dense."""
        frozen = self.frozen.masks if self.frozen is not None else {}
        targeted = set(self.names)
        self._outside: dict[str, torch.Tensor] = {}
        for param, s in self.shapes.items():
            if param in targeted:
                continue
            pattern = self._params[param].detach() != 0
            if param in frozen:
                pattern = pattern & frozen[param].to(pattern.device)
            if kept_rows_cols(pattern) != (s.rows, s.cols):  # a dense layer needs no pattern (and no memory)
                self._outside[param] = pattern

    def _pin(self, t: Target) -> float | None:
        for pattern, rate in self.config.pin.items():
            if any(fnmatch.fnmatchcase(layer, pattern) for layer in _layers_of(t)):
                return float(rate)
        return None

    def _flat_index(self) -> dict[str, torch.Tensor]:
        """Per target: where each entry of its GEMM (or virtual, coupled) matrix lies in the flat buffer.

        The touched parameters are laid end to end after one slot (0) that always holds zero, so a coupled
        target's padding reads slot 0. One gather then gives a target's matrix and one indexed write scales it.
        """
        positions, offset = {}, 1
        for n in self.names:
            p = self._params[n]
            positions[n] = torch.arange(offset, offset + p.numel(), dtype=torch.float64).view(p.shape)
            offset += p.numel()
        return {t.key: t.value(positions).long().reshape(self._ids[t.key][0].shape) for t in self.targets}

    def _flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        first = tensors[self.names[0]]
        return torch.cat([first.new_zeros(1)] + [tensors[n].detach().reshape(-1) for n in self.names])

    def _unflat(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 1
        for n in self.names:
            shape = self._params[n].shape
            out[n] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return out

    def _matrix(self, t: Target, flat: torch.Tensor) -> torch.Tensor:
        """``t``'s GEMM matrix in ``flat``: a view for a plain target, a gather for a coupled one."""
        if isinstance(t, CoupledTarget):
            return flat[self._index[t.key]]
        start = int(self._index[t.key].reshape(-1)[0])
        rows, cols = self._ids[t.key][0].shape
        return flat[start : start + rows * cols].view(rows, cols)

    def _norms(self, t: Target, flat: torch.Tensor) -> torch.Tensor:
        ids, n = self._ids[t.key]
        m = self._matrix(t, flat).double().pow(2)
        if _is_row(t):  # rows (filters, coupled channel groups, heads of consecutive rows): no scatter needed
            return m.sum(dim=1).view(n, -1).sum(dim=1).sqrt()
        if t.structure.kind == "column":
            return m.sum(dim=0).sqrt()
        return _group_sum(m, ids, n).sqrt()

    def _group_weights(self, cost_per_weight: dict[str, float]) -> dict[str, torch.Tensor]:
        """``w_g`` per target: sqrt(real entries of g) x (g's mean cost per weight / the overall mean)."""
        costs = {n: torch.full_like(self._params[n], cost_per_weight.get(n, 0.0)) for n in self.names}
        ones = {n: torch.ones_like(self._params[n]) for n in self.names}
        sizes, means = {}, {}
        for t in self.targets:
            ids, n = self._ids[t.key]
            size = _group_sum(t.value(ones), ids, n)
            sizes[t.key] = size
            means[t.key] = _group_sum(t.value(costs), ids, n) / size.clamp_min(1)
        total = sum(float((means[k] * sizes[k]).sum()) for k in sizes)
        overall = total / max(1.0, sum(float(s.sum()) for s in sizes.values()))
        out = {}
        for key, size in sizes.items():
            if self.config.weighting == "none":
                out[key] = torch.ones_like(size)
            elif self.config.weighting == "sqrt" or overall <= 0:
                out[key] = size.sqrt()
            else:
                out[key] = size.sqrt() * means[key] / overall
        return out

    # --- the prox -----------------------------------------------------------------------
    @torch.no_grad()
    def _prox(self, values: dict[str, torch.Tensor], strength: float) -> tuple[dict[str, torch.Tensor], dict]:
        """``Z`` = sequential exact group soft-threshold of ``values`` (rows, then columns), and the zero groups."""
        flat = self._flat(values)
        for t in self.targets:
            ids, n = self._ids[t.key]
            norms = self._norms(t, flat)
            pin = self.pins[t.key]
            if pin is not None:
                factor = top_groups(norms, kept_count(n, pin)).to(norms.dtype)
            else:
                weights = self._weights[t.key].to(norms.dtype)
                threshold = strength * weights / self.rho
                factor = torch.where(norms > threshold, 1 - threshold / norms.clamp_min(1e-300), 0.0)
                factor = torch.nan_to_num(factor, nan=0.0)  # inf / inf at strength = inf
                most = n - kept_count(n, t.structure.target_sparsity)  # the rule's sparsity bounds the layer
                if int((factor == 0).sum()) > most:
                    factor = _capped_factor(norms, weights, most)
            self._scale(t, flat, factor)
        zeros = {t.key: self._norms(t, flat) == 0 for t in self.targets}
        return self._unflat(flat), zeros

    def _scale(self, t: Target, flat: torch.Tensor, factor: torch.Tensor) -> None:
        """Multiply every group of ``t`` (in the flat buffer) by its factor; slot 0 stays zero."""
        factor = factor.to(flat.dtype)
        if isinstance(t, CoupledTarget):
            index = self._index[t.key]
            per_entry = _per_row(t, factor).unsqueeze(1).expand(index.shape)
            if t.key in self._unique:  # an entry in two groups (a row and a column) takes both factors
                where, inverse = self._unique[t.key]
                combined = torch.ones(len(where), dtype=flat.dtype)
                combined.scatter_reduce_(0, inverse.reshape(-1), per_entry.reshape(-1), reduce="prod")
                flat[where] = flat[where] * combined
            else:
                flat[index] = flat[index] * per_entry
        elif _is_row(t):
            self._matrix(t, flat).mul_(factor.unsqueeze(1))  # a view: scales flat in place
        elif t.structure.kind == "column":
            self._matrix(t, flat).mul_(factor.unsqueeze(0))
        else:
            view = self._matrix(t, flat)
            view.mul_(factor[self._ids[t.key][0]])

    def _cost(self, z: dict[str, torch.Tensor]) -> float:
        """The budget's count of the model with the targets' weights at ``z`` (zeros removed)."""
        return self._pattern_cost({n: t != 0 for n, t in z.items()})

    def _pattern_cost(self, patterns: dict[str, torch.Tensor]) -> float:
        """The budget's count with the targets at ``patterns`` and every other layer as it now is."""
        return structured_cost(self.shapes, self._counted(patterns), self.kind, self.latency)

    def _counted(self, patterns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the budget counts: the targets' ``patterns`` over the other layers' current ones, less the channels
        nobody reads (compaction removes them with their producers)."""
        return drop_unread_channels(self.targets, {**self._outside, **patterns})

    def _meet(self, values: dict[str, torch.Tensor], budget: float) -> tuple[float, dict, dict]:
        """The smallest strength (geometric bisection) whose prox of ``values`` costs at most ``budget``."""
        z, zeros = self._prox(values, 0.0)
        if self._cost(z) <= budget:
            return 0.0, z, zeros
        flat = self._flat(values)
        top = 0.0
        for t in self.targets:  # above this strength every first-pass group is zero
            ratio = self._norms(t, flat) / self._weights[t.key].clamp_min(1e-300)
            top = max(top, float(ratio.max()) * self.rho)
        hi, lo = top * 1.01 + 1e-300, top * 1e-9
        if 0 < self.strength < hi:  # warm start: bracket the last strength, widening until it holds
            a, b = self.strength / 2, min(hi, self.strength * 2)
            while a > lo and self._cost(self._prox(values, a)[0]) <= budget:
                a /= 4
            while b < hi and self._cost(self._prox(values, b)[0]) > budget:
                b = min(hi, b * 4)
            lo, hi = max(lo, a), b
        hi, best = self._bisect(values, budget, lo, hi, self._prox(values, hi))
        if any(isinstance(t, CoupledTarget) for t in self.targets):
            hi, best = self._step_down(values, budget, hi, best)
        return hi, best[0], best[1]

    def _bisect(self, values: dict[str, torch.Tensor], budget: float, lo: float, hi: float,
                best: tuple[dict, dict]) -> tuple[float, tuple[dict, dict]]:
        """Geometric bisection between ``lo`` (misses the budget) and ``hi`` (meets it, its prox ``best``)."""
        while hi / lo > 1 + _PRECISION:
            mid = math.sqrt(lo * hi)
            z, zeros = self._prox(values, mid)
            if self._cost(z) <= budget:
                hi, best = mid, (z, zeros)
            else:
                lo = mid
        return hi, best

    def _step_down(self, values: dict[str, torch.Tensor], budget: float, hi: float,
                   best: tuple[dict, dict]) -> tuple[float, tuple[dict, dict]]:
        """The smallest strength meeting the budget below the bisection's ``hi``, where the cost is not monotone.

        With coupled targets the groups a rule's bound keeps are the largest after the row pass, so which
        channels they read changes with the strength, and the channels nobody reads (removed with their
        producers) come and go: the cost flips between levels under tiny changes of the strength, and the
        bisection can settle in a bump above smaller strengths that meet the budget (and shrink less). Smaller
        strengths are tried down a geometric grid (steps of 3%, until 16 in a row miss); the lowest one that meets
        the budget is bisected against the grid point below it. A window narrower than one step can be missed.
        """
        lowest, misses, strength = None, 0, hi
        while misses < _STEP_DOWN_MISSES:
            strength *= _STEP_DOWN
            z, zeros = self._prox(values, strength)
            if self._cost(z) <= budget:
                lowest, misses = (strength, (z, zeros)), 0
            else:
                misses += 1
        if lowest is None:
            return hi, best
        return self._bisect(values, budget, lowest[0] * _STEP_DOWN, lowest[0], lowest[1])

    def budget_at(self, iteration: int) -> float | None:
        """The budget of update ``iteration`` (1-based): from the cost the model had when the stage began (dense,
        unless an earlier stage pruned it) to the target over the first ``ramp`` of the updates."""
        if self.target_cost is None:
            return None
        span = self.config.ramp * self.updates
        progress = 1.0 if span <= 0 else min(1.0, iteration / span)
        start = max(self.start_cost, self.target_cost)  # a model already within budget is not squeezed further
        return start - (start - self.target_cost) * (1 - (1 - progress) ** 3)

    # --- the driver protocol ------------------------------------------------------------
    def _refresh_anchors(self) -> None:
        self._anchors = {n: (self.Z[n] - self.U[n]).detach() for n in self.names}

    def penalty(self) -> torch.Tensor:
        """``rho/2 * sum ||W - Z + U||^2`` over every parameter a target touches (differentiable)."""
        total = torch.zeros(())
        for n in self.names:
            total = total + (self._params[n] - self._anchors[n]).pow(2).sum()
        return 0.5 * self.rho * total

    @torch.no_grad()
    def step(self) -> dict[str, Any]:
        """Z = prox(W + U) at the (adapted) strength, U += W - Z; returns the log entry."""
        w = {n: self._params[n].detach() for n in self.names}
        v = {n: w[n] + self.U[n] for n in self.names}
        self._refresh_outside()  # the other layers as training left them (frozen zeros stay zero)
        budget = self.budget_at(self.iteration + 1)
        if budget is None:
            self.Z, zeros = self._prox(v, self.strength)
        else:
            self.strength, self.Z, zeros = self._meet(v, budget)
        for n in self.names:
            self.U[n] += w[n] - self.Z[n]
        self.iteration += 1
        entry = {
            "iteration": self.iteration,
            "strength": self.strength,
            "rho": self.rho,
            "cost": self._cost(self.Z),
            "budget": budget,
            "zero_groups": {k: int(z.sum()) for k, z in zeros.items()},
            "residual": {n: _relative(w[n] - self.Z[n], w[n]) for n in self.names},
        }
        self.history.append(entry)
        scale = self.schedule.dual_scale(self.rho)
        if scale != 1.0:
            for n in self.names:
                self.U[n] *= scale
        self.rho = self.schedule.next(self.rho)
        self._refresh_anchors()
        return entry

    def progress(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"residual": last.get("residual", {}), "strength": self.strength}

    @torch.no_grad()
    def finalize(self) -> MaskSet:
        """Prune the groups whose Z is zero; meet the budget by a final cut (or fill) of single groups.

        If the last ``Z`` misses the budget, more groups are cut by the same weighted soft threshold on ``W``
        (a weighted-norm top-k). If it undershoots by more than ``fill`` (one group can be several percent
        of a small model), the zeroed groups the threshold would keep first are restored while the cost
        stays within the budget. Both counts are in ``summary()``.
        """
        w = {n: self._params[n].detach().clone() for n in self.names}
        self._refresh_outside()
        # without a Z-step yet (a phase of no updates), the prox of W itself: pins hold, nothing else is zero
        soft = self._zero_groups(self.Z) if self.iteration else self._prox(w, self.strength)[1]
        final, restored = soft, 0
        if self.target_cost is not None:
            if self._cost(self._masked(w, soft)) > self.target_cost:
                _, _, final = self._meet(self._masked(w, soft), self.target_cost)
            final, restored = self._fill(w, final)
        masks = carry(self.frozen)  # an earlier stage's quantized values stay held
        for t in self.targets:
            for name, mask in self._masks(t, ~final[t.key]).items():
                masks.intersect(name, mask)
        masks.apply(self.model)
        self._drop_unread(masks)
        self.final_cost = self._cost({n: self._params[n].detach() for n in self.names})
        self.outcome = {**self._count(soft, final), "restored_by_fill": restored}
        return masks

    def _drop_unread(self, masks: MaskSet) -> None:
        """Mask the producer rows of channels nobody reads: the budget counts them removed and compaction removes
        them, so the masked model, the rates table and the compacted model agree (the output is unchanged)."""
        nonzero = {n: self._params[n].detach() != 0 for n in self.names}
        kept = self._counted(nonzero)
        for n in self.names:
            dropped = nonzero[n] & ~kept[n]
            if bool(dropped.any()):
                masks.intersect(n, ~dropped)
                self._params[n].data.mul_(~dropped)

    def _masked(self, w: dict[str, torch.Tensor], zeros: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        flat = self._flat(w)
        for t in self.targets:
            self._scale(t, flat, (~zeros[t.key]).to(flat.dtype))
        return self._unflat(flat)

    def _fill(self, w: dict[str, torch.Tensor], zeros: dict[str, torch.Tensor]) -> tuple[dict, int]:
        """Restore zeroed groups (largest ``||W_g|| / w_g`` first) while the cost stays within the budget."""
        budget = self.target_cost
        zeros = {k: z.clone() for k, z in zeros.items()}
        keeps = {t.key: self._masks(t, ~zeros[t.key]) for t in self.targets}  # per target: keep-mask by param
        nonzero = {n: w[n] != 0 for n in self.names}

        def pattern(name: str) -> torch.Tensor:
            out = nonzero[name]
            for maps in keeps.values():
                if name in maps:
                    out = out & maps[name]
            return out

        patterns = {n: pattern(n) for n in nonzero}
        cost = self._pattern_cost(patterns)
        if cost >= budget * (1 - FILL_TOLERANCE):
            return zeros, 0
        by_key = {t.key: t for t in self.targets}
        flat = self._flat(w)
        candidates = []
        for t in self.targets:
            if self.pins[t.key] is not None:
                continue
            score = self._norms(t, flat) / self._weights[t.key].clamp_min(1e-300)
            candidates += [(float(score[g]), t.key, g) for g in torch.nonzero(zeros[t.key]).flatten().tolist()]
        restored = 0
        for score, key, g in sorted(candidates, key=lambda c: -c[0])[:_FILL_TRIES]:
            if score <= 0 or cost >= budget * (1 - FILL_TOLERANCE):
                break
            zeros[key][g] = False
            old = keeps[key]
            keeps[key] = self._masks(by_key[key], ~zeros[key])
            trial_patterns = {**patterns, **{n: pattern(n) for n in keeps[key] if n in patterns}}
            trial = self._pattern_cost(trial_patterns)
            if cost < trial <= budget:  # a group whose restoring changes nothing physical stays pruned
                cost, patterns, restored = trial, trial_patterns, restored + 1
            else:
                zeros[key][g], keeps[key] = True, old
        return zeros, restored

    def _zero_groups(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        flat = self._flat(z)
        return {t.key: self._norms(t, flat) == 0 for t in self.targets}

    def _masks(self, t: Target, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(t, CoupledTarget):
            return t.masks_for_channels(self._params, _per_row(t, keep))
        ids, _ = self._ids[t.key]
        return {t.param_name: keep[ids].reshape(self._params[t.param_name].shape)}

    def _count(self, soft: dict, final: dict) -> dict[str, Any]:
        free = [t.key for t in self.targets if self.pins[t.key] is None]
        by_soft = sum(int((soft[k] & final[k]).sum()) for k in free)  # restored groups are not pruned
        by_cut = sum(int((final[k] & ~soft[k]).sum()) for k in free)
        pruned = by_soft + by_cut
        by_key = {t.key: t for t in self.targets}
        # targets whose rule's sparsity bound capped the strength: their rates are the plan's, not the threshold's
        at_bound = []
        for k in free:
            n = self._ids[k][1]
            most = n - kept_count(n, by_key[k].structure.target_sparsity)
            if most > 0 and int(soft[k].sum()) >= most:
                at_bound.append(k)
        return {
            "groups": sum(self._ids[k][1] for k in free),
            "zeroed_by_soft_threshold": by_soft,  # of the pruned groups: zero in the last Z
            "cut_by_final_topk": by_cut,
            "targets": len(free),
            "targets_at_bound": len(at_bound),
            "zeroed_at_bound": sum(int((soft[k] & final[k]).sum()) for k in at_bound),
            "pinned_pruned": sum(int(final[t.key].sum()) for t in self.targets if self.pins[t.key] is not None),
            "share_soft_threshold": by_soft / pruned if pruned else 1.0,
        }

    @torch.no_grad()
    def rates(self) -> dict[str, dict[str, int]]:
        """Kept / total rows and columns of every Linear/Conv layer, as the budget counts them (current weights;
        a channel nobody reads is removed with its producer rows, as compaction removes it)."""
        counted = self._counted({n: self._params[n].detach() != 0 for n in self.shapes})
        out = {}
        for name, s in self.shapes.items():
            r, c = kept_rows_cols(counted[name])
            out[s.name] = {"rows_kept": r, "rows": s.rows, "cols_kept": c, "cols": s.cols}
        return out

    def summary(self) -> dict[str, Any]:
        budget = None
        if self.budget is not None:
            budget = {**self.budget.to_dict(), "dense": self.dense_cost, "start": self.start_cost,
                      "target": self.target_cost, "final": self.final_cost}
        return {"soft": {"strength": self.strength, "budget": budget, **self.outcome, "rates": self.rates(),
                         "history": self.history}}

    # --- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "strength": self.strength,
            "rho": self.rho,
            "start_cost": self.start_cost,
            "history": list(self.history),
            "Z": {n: z.clone() for n, z in self.Z.items()},
            "U": {n: u.clone() for n, u in self.U.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.names) - set(state["Z"]))
        extra = sorted(set(state["Z"]) - set(self.names))
        if missing or extra:
            raise ValueError(f"soft state does not match the plan: missing {missing}, unexpected {extra}")
        for n in self.names:
            if state["Z"][n].shape != self.Z[n].shape:
                raise ValueError(f"soft state for {n}: shape {tuple(state['Z'][n].shape)}, the model has "
                                 f"{tuple(self.Z[n].shape)}; was the model changed?")
        self.iteration = int(state["iteration"])
        self.strength = float(state["strength"])
        self.rho = float(state.get("rho", self.config.rho))  # states saved before rho could grow: constant
        # the ramp starts where the stage began, not where a resume finds the model
        self.start_cost = float(state.get("start_cost", self.start_cost))
        self.history = list(state["history"])
        self.Z = {n: state["Z"][n].clone() for n in self.names}
        self.U = {n: state["U"][n].clone() for n in self.names}
        self._refresh_anchors()


def group_soft_threshold(
    matrix: torch.Tensor, ids: torch.Tensor, n: int, threshold: torch.Tensor | float
) -> torch.Tensor:
    """Exact prox of ``sum_g t_g ||V_g||_2`` over disjoint groups: ``max(0, 1 - t_g / ||V_g||) V_g``.

    >>> group_soft_threshold(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.tensor([[0, 0], [1, 1]]), 2, 1.0)
    tensor([[2.4000, 3.2000],
            [0.0000, 0.0000]])
    """
    norms = _group_sum(matrix.pow(2), ids, n).sqrt()
    t = torch.as_tensor(threshold, dtype=norms.dtype)
    factor = torch.where(norms > t, 1 - t / norms.clamp_min(1e-300), 0.0)
    return matrix * factor.to(matrix.dtype)[ids]


def _repeats(index: torch.Tensor) -> bool:
    """Whether a flat index names one entry twice (slot 0, the padding, aside)."""
    real = index[index > 0]
    return real.numel() > real.unique().numel()


def _is_row(t: Target) -> bool:
    return isinstance(t, CoupledTarget) or t.structure.kind in ROW_KINDS


def _per_row(t: Target, per_group: torch.Tensor) -> torch.Tensor:
    """A row target's per-group values, one per row of its matrix (a head spans ``head_dim`` rows)."""
    width = rows_per_group(t)
    return per_group.repeat_interleave(width) if width > 1 else per_group


def _capped_factor(norms: torch.Tensor, weights: torch.Tensor, most: int) -> torch.Tensor:
    """The group soft-threshold factors of a target whose bound (at most ``most`` zero groups) caps its strength.

    The layer is thresholded at the largest strength that zeroes at most ``most`` groups: the ``most`` groups of
    smallest ``||V_g|| / w_g`` (where each group would reach zero) are zeroed, and every other group is shrunk by
    that strength, ``1 - c w_g / ||V_g||`` with ``c`` the largest ratio among the zeroed ones. Groups keep their
    order (a larger group stays larger), and ``Z`` stays the exact prox of the group lasso at the capped strength
    (the kept groups' factors are held above 0 only against rounding and exact ties at ``c``). A bound that lets
    no group go (``most = 0``) leaves the layer unshrunk: no strength above 0 keeps every group.

    >>> _capped_factor(torch.tensor([1.1, 0.9, 0.5, 0.3], dtype=torch.float64), torch.ones(4), 2).tolist()
    [0.5454545454545454, 0.4444444444444444, 0.0, 0.0]
    """
    ratio = norms / weights.clamp_min(1e-300)
    order = torch.argsort(ratio, stable=True)
    zero = torch.zeros_like(norms, dtype=torch.bool)
    zero[order[:most]] = True
    cap = ratio[order[most - 1]] if most > 0 else torch.zeros((), dtype=norms.dtype)
    shrink = (1 - cap * weights / norms.clamp_min(1e-300)).clamp_min(torch.finfo(norms.dtype).eps)
    return torch.where(zero, torch.zeros_like(shrink), shrink)


def _group_sum(values: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.float64, device=values.device)
    return out.index_add_(0, ids.reshape(-1), values.detach().reshape(-1).to(torch.float64))


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(ref.norm())
    return float(diff.norm()) / denom if denom > 0 else float(diff.norm())


__all__ = ["SoftConfig", "SoftThreshold", "group_soft_threshold"]
