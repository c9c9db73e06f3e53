"""Per-layer rate allocations as plans: the rates SS-Auto found, and the baselines on the same budget.

Every function here ends in a :class:`~admmcompress.plan.Plan` (per-layer ``filter`` / ``column`` /
``channel`` rules at fixed sparsities), so any driver (``admm``, ``gradual``, ``magnitude``, ``soft`` with
pins) reruns the allocation:

- :func:`rates_plan` / :func:`write_rates_plan`: the rates a finished (pruned) model has, as a plan YAML;
- :func:`uniform_plan`: one sparsity for every target, the smallest whose magnitude pruning meets the budget;
- :func:`sensitivity_plan`: prune each target alone over a grid of rates, measure the accuracy, and give each
  the largest rate whose drop stays under one threshold, the threshold bisected to meet the budget;
- :func:`torch_pruning_plan`: Torch-Pruning's global magnitude pruning (``MagnitudePruner`` with
  ``global_pruning=True``, a well-kept library) on a copy, its per-layer filter rates read back.

Budgets are counted as :mod:`admmcompress.drivers.budget` counts them (kept rows x kept columns of the
masks), so every allocation is compared at the same cost.

>>> import torch.nn as nn
>>> from admmcompress.structures import Filter
>>> model = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 2))
>>> plan = uniform_plan(model, Plan([Rule(Filter(sparsity=0.5), match="0")]), {"kind": "params", "fraction": 0.6})
>>> plan.to_dict()["rules"]
[{'match': '0', 'structure': 'filter', 'sparsity': 0.5}]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from admmcompress.atomic import atomic_write
from admmcompress.drivers.budget import (
    Budget,
    BudgetError,
    budget_shapes,
    check_costed,
    drop_unread_channels,
    structured_cost,
)
from admmcompress.drivers.soft import COLUMN_KINDS, ROW_KINDS
from admmcompress.finalize import hard_prune, masks_of
from admmcompress.plan import Plan, Rule, Target, resolve_targets
from admmcompress.plan.coupled import CoupledTarget
from admmcompress.plan.graph import call_model, first_sample
from admmcompress.structures.base import Structure
from admmcompress.structures.groups import group_scores, kept_count
from admmcompress.structures.registry import structure_class
from admmcompress.structures.sparsity import GEMM_MODULES

COSTED_KINDS = ROW_KINDS + COLUMN_KINDS  # what removes whole rows or columns of the GEMM view, as SS-Auto


def _source_layers(t: Target) -> list[tuple[str, str]]:
    """``(layer, structure kind)`` of the plan rules behind ``t`` (a coupled target: every source)."""
    if isinstance(t, CoupledTarget):
        out = []
        for key in t.sources:
            param, kind = key.rsplit(":", 1)
            out.append((param.rsplit(".", 1)[0], kind))
        return out
    return [(t.layer, t.structure.kind)]


def _rule_structure(t: Target, kind: str, rate: float) -> Structure:
    """The plan rule's structure for a source of ``t`` at ``rate``: ``t``'s own, with its options (block size,
    head_dim, per_block); a coupled group's Filter/BlockFilter stands for its sources' rules, so those are rebuilt."""
    cls = structure_class(kind)
    return t.structure.with_sparsity(rate) if type(t.structure) is cls else cls(sparsity=rate)


def plan_from_rates(targets: list[Target], rates: Mapping[str, float], model: nn.Module | None = None) -> Plan:
    """A plan giving every target (by key) its sparsity; targets at rate 0 get no rule (left dense).

    With ``model`` each rate is written as the exact share of groups it removes (``1 - kept / groups``).
    """
    params = dict(model.named_parameters()) if model is not None else None
    # A rule names a layer, so the targets of one layer (a GRU's weight_ih_l0, weight_hh_l0, ...) share its rule
    by_rule: dict[tuple[str, str], list[tuple[Target, float]]] = {}
    for t in targets:
        for source in _source_layers(t):
            by_rule.setdefault(source, []).append((t, float(rates.get(t.key, 0.0))))
    rules = []
    for (layer, kind), entries in by_rule.items():
        asked = {rate for _, rate in entries}
        if len(asked) > 1:
            shown = ", ".join(f"{t.key} {rate:.3g}" for t, rate in entries[:4])
            raise BudgetError(
                f"layer '{layer}' has {len(entries)} targets at different {kind} rates ({shown}): a plan rule gives a "
                "layer one rate; give its targets one rate (e.g. pin the layer in the plan)"
            )
        rate = asked.pop()
        if rate > 0 and params is not None and len(entries) == 1:
            target = entries[0][0]
            n = target.structure.group_ids(target.value(params))[1]
            rate = 1.0 - kept_count(n, rate) / n
        if rate <= 0:
            continue
        rules.append(Rule(_rule_structure(entries[0][0], kind, min(rate, 0.999999)), match=layer))
    if not rules:
        raise BudgetError("every rate is 0: nothing to prune; tighten the budget")
    return Plan(rules)


@torch.no_grad()
def rates_plan(model: nn.Module, targets: list[Target]) -> Plan:
    """The rates the (pruned) ``model`` has: per target, the share of its groups that are all zero."""
    params = dict(model.named_parameters())
    rates = {}
    for t in targets:
        value = t.value(params).detach()
        ids, n = t.structure.group_ids(value)
        rates[t.key] = float((group_scores(value, ids, n) == 0).sum()) / n
    return plan_from_rates(targets, rates)


def write_rates_plan(path: str | Path, plan: Plan, comment: str = "") -> Path:
    """Write ``plan`` as YAML (``rules:``) that ``Plan.from_yaml`` and any run config's ``plan:`` read."""
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    text = header + yaml.safe_dump(plan.to_dict(), sort_keys=False, default_flow_style=None)
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def cost_at_rates(model: nn.Module, targets: list[Target], rates: Mapping[str, float], shapes, kind: str,
                  latency=None) -> float:
    """The budget's count (``"params"``, ``"macs"`` or ``"latency"``) of ``model`` hard-pruned at ``rates``
    (target key -> sparsity; a target not named stays as it is), counted as compaction would leave it (coupled
    targets: a removed filter takes the next layer's columns that read it; a channel nobody reads takes its
    filter). The model is not touched.

    >>> from admmcompress.models import create_model
    >>> from admmcompress.plan import Plan, Rule
    >>> from admmcompress.structures import Filter
    >>> from admmcompress.drivers.budget import gemm_shapes
    >>> model, x = create_model("lenet5"), torch.randn(1, 1, 28, 28)
    >>> targets = Plan([Rule(Filter(sparsity=0.5), match="conv2")]).resolve_coupled(model, x)
    >>> shapes = gemm_shapes(model, x)
    >>> half, dense = (cost_at_rates(model, targets, rates, shapes, "macs") for rates in ({targets[0].key: 0.5}, {}))
    >>> dense - half  # conv2 loses half its filters (800k MACs), fc1 the columns that read them (200k)
    1000000.0
    """
    staged = [t.with_structure(t.structure.with_sparsity(max(1e-9, r))) for t in targets
              if (r := rates.get(t.key, 0.0)) > 0]
    patterns: dict[str, torch.Tensor] = {}
    if staged:  # the hard prune's masks, read off the weights: no model copy per bisection step
        params = dict(model.named_parameters())
        masks = masks_of(params, staged)
        with torch.no_grad():
            patterns = {n: (p != 0) & masks[n] if n in masks else (p != 0) for n, p in params.items()}
    return structured_cost(shapes, drop_unread_channels(targets, patterns), kind, latency)


def _pruning_targets(model: nn.Module, plan: Plan | list[Target]) -> list[Target]:
    """The plan's targets; the baselines allocate sparsities the budget counts, so a quantization rule, or a
    structure that removes no whole row or column (unstructured, block, N:M), is refused in one line."""
    targets = resolve_targets(model, plan, "the allocation baselines")
    quantized = [t.key for t in targets if t.structure.quantizes]
    if quantized:
        raise BudgetError(f"the allocation baselines choose pruning rates; {quantized} quantize: give them to "
                          "another stage")
    # the budget counts kept rows x kept columns of Linear/Conv layers: other structures would look free or useless
    other = [t.key for t in targets if t.structure.kind not in COSTED_KINDS]
    if other:
        raise BudgetError(f"the allocation baselines allocate rates the budget counts (structures "
                          f"{', '.join(COSTED_KINDS)}); targets {other[:6]} have other structures: give them to "
                          "another stage")
    return targets


def _budget_shapes(model: nn.Module, targets: list[Target], budget: Budget, example: Any | None) -> dict:
    """The layers ``budget`` counts; a target's weight it does not count is refused in one line."""
    shapes = budget_shapes(model, example, budget.kind)
    check_costed(model, [n for t in targets for n in t.param_names], shapes, budget.kind)
    return shapes


def _smallest_feasible(cost: Callable[[float], float], budget: float, step: float, top: float,
                       steps: int) -> float:
    """The smallest x on the grid step, 2 step, ..., top with cost(x) <= budget, then bisected within the step below.

    For a cost that is non-increasing only up to some x: Torch-Pruning's global ranking at ratio 0.95 left
    ResNet-20 6.2x smaller where 0.8 made it 14x (it kept some layers whole), so checking the top end alone
    refused an 8x budget that ratio 0.72 meets (2026-12).
    """
    grid = [round(step * i, 10) for i in range(1, int(round(top / step)) + 1)]
    feasible = next((x for x in grid if cost(x) <= budget), None)
    if feasible is None:
        raise BudgetError(f"the budget {budget:g} cannot be met at any rate up to {top:g}; raise the budget")
    return _bisect(cost, budget, max(0.0, feasible - step), feasible, steps=steps)


def _baseline_budget(budget: Budget | Mapping[str, Any], example: Any | None) -> Budget:
    """The budget of a baseline allocation: params or MACs (a latency table is the SS-Auto driver's alone); MACs
    need ``example`` to count output positions."""
    budget = Budget.from_any(budget)
    if budget.kind == "latency":
        raise BudgetError("the allocation baselines take params or macs budgets, got latency; give the same budget "
                          "in MACs, or use method soft for a latency budget")
    if budget.kind == "macs" and example is None:
        raise BudgetError("a macs budget needs example= (one input batch) to count output positions")
    return budget


def _bisect(cost: Callable[[float], float], budget: float, lo: float = 0.0, hi: float = 0.999,
            steps: int = 30) -> float:
    """The smallest x in [lo, hi] with cost(x) <= budget (cost non-increasing in x)."""
    if cost(hi) > budget:
        raise BudgetError(f"the budget {budget:g} cannot be met even at the highest rate; raise the budget")
    for _ in range(steps):
        mid = (lo + hi) / 2
        if cost(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


def uniform_plan(model: nn.Module, plan: Plan | list[Target], budget: Budget | Mapping[str, Any],
                 example: Any | None = None) -> Plan:
    """One sparsity for every target of ``plan``: the smallest whose magnitude pruning meets ``budget``."""
    targets = _pruning_targets(model, plan)
    budget = _baseline_budget(budget, example)
    shapes = _budget_shapes(model, targets, budget, example)
    target = budget.resolve(structured_cost(shapes, {}, budget.kind))
    rate = _bisect(lambda s: cost_at_rates(model, targets, {t.key: s for t in targets}, shapes, budget.kind), target)
    return plan_from_rates(targets, {t.key: rate for t in targets}, model)


def sensitivity_curves(model: nn.Module, targets: list[Target], evaluate: Callable[[nn.Module], float],
                       grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> dict[str, dict]:
    """Accuracy with each target pruned alone (by magnitude) at each rate of ``grid``: ``{key: {rate: acc}}``."""
    curves: dict[str, dict[float, float]] = {}
    for t in targets:
        curves[t.key] = {}
        for rate in grid:
            trial = copy.deepcopy(model)
            hard_prune(trial, [t.with_structure(t.structure.with_sparsity(rate))])
            curves[t.key][rate] = float(evaluate(trial))
    return curves


def sensitivity_plan(model: nn.Module, plan: Plan | list[Target], budget: Budget | Mapping[str, Any],
                     curves: Mapping[str, Mapping[float, float]], example: Any | None = None) -> Plan:
    """Each target's largest grid rate whose accuracy drop is at most ``d``; ``d`` bisected to meet ``budget``.

    ``curves`` come from :func:`sensitivity_curves`. The reference (no loss) is the best accuracy over all the
    curves, one level for every layer, so a drop ``d`` means the same accuracy for each. One ``d`` can move a
    layer with a flat curve far past what the budget needs (its drops are all tiny), overshooting the budget by
    whole grid steps; so the rates at the bisected ``d`` are then lowered one grid step at a time while the
    budget holds, the most accuracy regained per unit of cost added first.
    """
    targets = _pruning_targets(model, plan)
    budget = _baseline_budget(budget, example)
    shapes = _budget_shapes(model, targets, budget, example)
    target = budget.resolve(structured_cost(shapes, {}, budget.kind))
    uncovered = [t.key for t in targets if not (curves.get(t.key) if isinstance(curves, Mapping) else None)]
    if uncovered:
        raise BudgetError(f"the sensitivity curves have no points for targets {uncovered[:6]}; compute them for this "
                          "plan's targets with sensitivity_curves(model, targets, evaluate)")
    reference = max(max(c.values()) for c in curves.values())

    def rates_at(drop: float) -> dict[str, float]:
        out = {}
        for t in targets:
            ok = [r for r, acc in sorted(curves[t.key].items()) if reference - acc <= drop]
            out[t.key] = max(ok) if ok else 0.0
        return out

    top = max(reference - min(c.values()) for c in curves.values()) + 1e-6

    def cost(share: float) -> float:
        return cost_at_rates(model, targets, rates_at(share * top), shapes, budget.kind)

    share = _bisect(cost, target, 0.0, 1.0)

    def rates_cost(rates: Mapping[str, float]) -> float:
        return cost_at_rates(model, targets, rates, shapes, budget.kind)

    return plan_from_rates(targets, _give_back(rates_at(share * top), curves, reference, rates_cost, target), model)


def _give_back(rates: Mapping[str, float], curves: Mapping[str, Mapping[float, float]], reference: float,
               cost: Callable[[Mapping[str, float]], float], budget: float) -> dict[str, float]:
    """Lower targets one grid step at a time while ``cost`` stays within ``budget``, the most accuracy regained per
    unit of cost added first (a step that regains nothing comes last); ``rates`` meet the budget."""
    rates = dict(rates)
    current = cost(rates)
    while True:
        best = None
        for key, rate in rates.items():
            if rate <= 0:
                continue
            lower = [r for r in sorted(curves[key]) if r < rate]
            trial = {**rates, key: lower[-1] if lower else 0.0}
            trial_cost = cost(trial)
            regained = curves[key].get(trial[key], reference) - curves[key].get(rate, reference)
            added = trial_cost - current
            if trial_cost > budget or (added <= 0 and regained <= 0):
                continue
            score = regained / added if added > 0 else math.inf
            if best is None or score > best[0]:
                best = (score, trial, trial_cost)
        if best is None:
            return rates
        _, rates, current = best


def torch_pruning_plan(model: nn.Module, plan: Plan | list[Target], budget: Budget | Mapping[str, Any],
                       example: Any) -> Plan:
    """Torch-Pruning's global magnitude pruning, its ratio bisected to meet ``budget``, as per-layer filter rates.

    Only the layers with a ``filter`` rule in ``plan`` may lose channels (the others are TP's ignored layers);
    the rates are read from the copy TP pruned, so the plan reruns them through any driver.
    """
    import torch_pruning as tp  # optional dependency; Torch-Pruning does the dependency-aware global ranking

    targets = _pruning_targets(model, plan)
    budget = _baseline_budget(budget, example)
    shapes = _budget_shapes(model, targets, budget, example)
    target = budget.resolve(structured_cost(shapes, {}, budget.kind))
    prunable = {layer for t in targets for layer, kind in _source_layers(t) if kind == "filter"}
    modules = dict(model.named_modules())

    def pruned_copy(ratio: float) -> nn.Module:
        trial = copy.deepcopy(model).eval()
        names = {m: n for n, m in trial.named_modules()}
        # every Linear/Conv layer outside the plan, or TP prunes it too and the rates read back miss the budget
        ignored = [m for m in trial.modules() if isinstance(m, GEMM_MODULES) and names[m] not in prunable]
        pruner = tp.pruner.MagnitudePruner(trial, first_sample(example), forward_fn=call_model,
                                           importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=ratio, global_pruning=True, ignored_layers=ignored)
        pruner.step()
        return trial

    def cost(ratio: float) -> float:
        return structured_cost(budget_shapes(pruned_copy(ratio), example, budget.kind), {}, budget.kind)

    ratio = _smallest_feasible(cost, target, step=0.05, top=0.95, steps=10)
    small = dict(pruned_copy(ratio).named_modules())
    rules = []
    for layer in sorted(prunable, key=list(modules).index):
        before, after = modules[layer].weight.shape[0], small[layer].weight.shape[0]
        if after < before:
            rules.append(Rule(structure_class("filter")(sparsity=1 - after / before), match=layer))
    if not rules:
        raise BudgetError("Torch-Pruning removed no channel at this budget; tighten the budget")
    return Plan(rules)


__all__ = [
    "cost_at_rates", "plan_from_rates", "rates_plan", "sensitivity_curves", "sensitivity_plan", "torch_pruning_plan",
    "uniform_plan", "write_rates_plan",
]
